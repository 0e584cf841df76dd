"""A memory budget for decoded images, counted in pixels from their headers
before anything is decoded: at most ``MAX_REQUEST_PIXELS`` in one request (413),
and at most ``MAX_PIXELS_IN_FLIGHT`` decoded or being decoded across the
server at once (503 with ``Retry-After``: the request may succeed a moment
later). A decoded RGB pixel is 3 bytes, and Pillow holds another copy while it
converts: the in-flight limit bounds what images can take of memory."""

import contextlib
import threading
from collections.abc import Iterator

from app.errors import PayloadTooLargeError, UnavailableError


class PixelBudget:
    def __init__(self, *, per_request: int, in_flight: int):
        self.per_request, self.in_flight = per_request, in_flight
        self.used = 0
        self._lock = threading.Lock()  # decoding threads take from it

    @contextlib.contextmanager
    def request(self) -> Iterator["RequestPixels"]:
        """One request's share; all of it is given back when the request is done."""
        pixels = RequestPixels(self)
        try:
            yield pixels
        finally:
            with self._lock:
                self.used -= pixels.taken


class RequestPixels:
    def __init__(self, budget: PixelBudget):
        self.budget, self.taken = budget, 0

    def take(self, pixels: int, name: str) -> None:
        """Count ``pixels`` about to be decoded, or refuse them."""
        budget = self.budget
        with budget._lock:
            if self.taken + pixels > budget.per_request:
                raise PayloadTooLargeError(
                    f"{name}: the request's images have more than {budget.per_request} pixels "
                    "together (MAX_REQUEST_PIXELS)",
                    code="too_many_pixels",
                )
            if budget.used + pixels > budget.in_flight:
                raise UnavailableError(
                    f"{name}: the server is decoding as many pixels as it may hold "
                    "(MAX_PIXELS_IN_FLIGHT); retry shortly",
                    code="busy",
                    retry_after=1,
                )
            budget.used += pixels
            self.taken += pixels
