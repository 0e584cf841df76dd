"""What a client may hold of the server before it has sent a request: uvicorn's
HTTP/1.1 protocol (h11) with the limits it lacks.

* Headers: at most ``MAX_HEADER_KB`` in all, request line included (a larger
  block is a 400 as soon as it passes the limit), and complete within
  ``HEADER_TIMEOUT_S`` of a
  connection's first byte or of the first byte of its next request; a
  connection that sends nothing at all is closed after the same time. A
  client past the deadline gets a 408 and the connection is closed.
* Idle keep-alive connections close after ``KEEP_ALIVE_S`` (uvicorn's own).
* The 400s the protocol sends itself (malformed requests, oversized headers) are
  in the service's error shape, not plain text.
* Such an answer is followed by a lingering close: the write side is shut and
  what the client still sends is read and dropped for ``LINGER_S``, so closing
  with its bytes unread does not reset the connection before the client has
  read the answer.

The body's own deadline (``BODY_TIMEOUT_S`` between two of its chunks) is the
request middleware's (``app.api.middleware``)."""

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 1.0


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the error shape, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message, "request_id": ""}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedProtocol(H11Protocol):
    """See the module docstring; ``header_timeout_s`` is set by ``guarded``."""

    header_timeout_s = 10.0
    max_header_bytes = 16 * 1024

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)
        self._head = b""  # the bytes of a request's head seen so far (up to the limit)
        self._lingering: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # answered and closing: dropped
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self.send_400_response(
                f"the request's headers pass {self.max_header_bytes // 1024} KB (MAX_HEADER_KB)"
            )
            return
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)
        elif not waiting and self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        if not waiting:
            self._head = b""

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the head (request line and headers) passes the limit, counting
        only up to its blank line: a body in the same packet does not count."""
        self._head += data[: self.max_header_bytes + 4]
        end = self._head.find(b"\r\n\r\n")
        size = end + 4 if end >= 0 else len(self._head)
        return size > self.max_header_bytes

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_deadline, self._lingering):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _answer_and_close(self, response: bytes) -> None:
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._lingering = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        message = f"the request's headers did not arrive within {self.header_timeout_s:g} s"
        self._answer_and_close(error_bytes(408, "Request Timeout", "request_timeout", message))

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(error_bytes(400, "Bad Request", "bad_request", msg))


def guarded(header_timeout_s: float, max_header_bytes: int) -> type[GuardedProtocol]:
    """The protocol class uvicorn builds per connection, with these limits."""
    limits = {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes}
    return type("GuardedProtocol", (GuardedProtocol,), limits)
