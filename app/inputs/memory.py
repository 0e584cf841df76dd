"""A memory budget for decoded images, in bytes, decided from their headers
before any of them is decoded (``app.inputs.decoding.decode_all``).

An admitted image holds what decoding it takes at its peak
(``Probe.decoding_bytes``) from admission until its decode ends, then what it
takes decoded (``Probe.decoded_bytes``) until its request ends. A request whose
images have more than ``MAX_REQUEST_PIXELS`` together is refused with 413; one
that would take the server's images past ``MAX_DECODE_MEMORY_MB`` with 503
``busy`` and ``Retry-After``: both at once, on the event loop, before anything of
theirs is decoded. When a request ends early (an error, its deadline, its client
gone), its images not yet decoded never are, and the memory of those being
decoded returns when their decoding really ends.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

from app.errors import PayloadTooLargeError, UnavailableError

MB = 1 << 20


class RequestGone(Exception):
    """A decode that was to start after its request ended: nobody waits for it."""


class DecodeMemory:
    """The server's budget. ``trim``: gives freed memory back to the system, run
    after a request of at least ``trim_after_pixels`` pixels."""

    def __init__(
        self,
        *,
        request_pixels: int,
        limit_bytes: int,
        trim: Callable[[], None] | None = None,
        trim_after_pixels: int = 20_000_000,
    ):
        self.request_pixels, self.limit_bytes = request_pixels, limit_bytes
        self.trim, self.trim_after_pixels = trim, trim_after_pixels
        self.used = 0  # bytes
        self.lock = threading.Lock()  # decoding threads give back


class RequestMemory:
    """One request's share: ``reserve`` it, decode within ``decoding``, ``close``
    when the request ends."""

    def __init__(self, budget: DecodeMemory):
        self.budget = budget
        self.held: list[int] = []  # bytes, per image
        self.decoded: list[int] = []
        self.pixels = 0
        self.running = 0  # decodes in their threads
        self.closed = self.settled = False

    def reserve(self, costs: Sequence[tuple[int, int, int]]) -> None:
        """Admit the request's images, ``(decoding bytes, decoded bytes, pixels)``
        each, or refuse them all."""
        budget = self.budget
        pixels = sum(cost[2] for cost in costs)
        if pixels > budget.request_pixels:
            raise PayloadTooLargeError(
                f"the request's images have {pixels} pixels together; at most "
                f"{budget.request_pixels} (MAX_REQUEST_PIXELS)",
                code="too_many_pixels",
            )
        wanted = sum(cost[0] for cost in costs)
        with budget.lock:
            if budget.used + wanted > budget.limit_bytes:
                raise UnavailableError(
                    f"decoding these images takes {wanted / MB:.0f} MB, and the server's "
                    f"images hold {budget.used / MB:.0f} of {budget.limit_bytes / MB:.0f} MB "
                    "(MAX_DECODE_MEMORY_MB); retry shortly",
                    code="busy",
                    retry_after=1,
                )
            budget.used += wanted
            self.held = [cost[0] for cost in costs]
            self.decoded = [cost[1] for cost in costs]
            self.pixels = pixels

    @contextlib.contextmanager
    def decoding(self, index: int) -> Iterator[None]:
        """Around the decode of image ``index``, in its thread: once it ends, the
        image holds only its decoded bytes, or nothing when its request has ended."""
        with self.budget.lock:
            if self.closed:
                raise RequestGone("the request ended before this image was decoded")
            self.running += 1
        try:
            yield
        finally:
            with self.budget.lock:
                self.running -= 1
                self.budget.used -= self.held[index] - self.decoded[index]
                self.held[index] = self.decoded[index]
                settled = self._settle()
            if settled and self.pixels >= self.budget.trim_after_pixels and self.budget.trim:
                self.budget.trim()  # the request's last decode, after it ended

    def close(self) -> bool:
        """The request has ended: give back its share now, or, while some of its
        images are still being decoded, when the last of them ends. True when
        everything is back."""
        with self.budget.lock:
            self.closed = True
            return self._settle()

    def _settle(self) -> bool:
        if not self.closed or self.running or self.settled:
            return False
        self.budget.used -= sum(self.held)
        self.held = [0] * len(self.held)
        self.settled = True
        return True
