"""The ASGI middleware every request passes: request id, early body-size check,
in-flight count (graceful drain waits for it) and request metrics."""

import asyncio
import re
import time
import uuid
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.error_handlers import error_response, internal_error_response
from app.serving.service import Service

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# in no id, name or parameter of ours; PostgreSQL refuses NUL in text outright
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestContextMiddleware:
    """Sets ``scope["state"]["request_id"]`` (from ``X-Request-ID`` when it is sane)
    and ``scope["state"]["started_at"]`` (``time.monotonic()``), echoes the id in
    the response, refuses a body over ``max_body_bytes`` (413: a declared
    ``Content-Length`` before reading anything, a streamed one while counting), and
    records ``maskrcnn_http_*`` metrics by route template. ``body_limits`` maps a
    path to its own ``(bytes, setting name)`` cap (a dataset zip is no image)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: Service,
        max_body_bytes: int,
        body_limits: dict[str, tuple[int, str]] | None = None,
        body_timeout_s: float = 30.0,
    ):
        self.app = app
        self.service = service  # its in_flight count is what a graceful drain waits for
        self.metrics = service.metrics
        self.max_body_bytes = max_body_bytes
        self.body_limits = dict(body_limits or {})
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["started_at"] = request_id, time.monotonic()
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        default = (self.max_body_bytes, "MAX_UPLOAD_MB")
        limit, setting = self.body_limits.get(scope["path"].rstrip("/"), default)
        self.service.in_flight += 1
        try:
            if _declared_length(headers) > limit:
                message = _too_large(limit, setting)
                response = error_response(413, "payload_too_large", message, request_id)
                await response(scope, receive, send_with_id)
                return
            if _CONTROL.search(scope["path"]) or _CONTROL.search(unquote(_query(scope))):
                message = "the URL holds control characters (NUL, newlines, ...)"
                response = error_response(400, "bad_request", message, request_id)
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive, limit, setting), send_with_id)
        except Exception:
            if started:
                raise
            # answered here rather than by Starlette's outermost error middleware, so
            # the 500 carries the request id like every other answer
            await internal_error_response(scope)(scope, receive, send_with_id)
        finally:
            self.service.in_flight -= 1
            route = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(
                time.monotonic() - state["started_at"]
            )

    def _limited(self, receive: Receive, limit: int, setting: str) -> Receive:
        """``receive`` that raises 413 once the streamed body passes the limit, and
        408 when its next chunk takes longer than ``body_timeout_s`` (FastAPI
        re-raises ``HTTPException`` from body parsing). Once the body is in,
        ``receive`` waits as long as it needs (a disconnect, for a stream)."""
        received, complete = 0, False

        async def receive_limited() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body stalled for {self.body_timeout_s:g} s (BODY_TIMEOUT_S)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, _too_large(limit, setting))
            return message

        return receive_limited


def _too_large(limit: int, setting: str) -> str:
    return f"request body is larger than the {limit / 2**20:g} MB limit ({setting})"


def _declared_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


def route_label(scope: Scope) -> str:
    """The metrics label of a request: its route's path template; for a plain
    Starlette route without parameters (FastAPI's ``/openapi.json``), its path;
    ``unmatched`` for anything else (a 404, a static asset)."""
    if (route := scope.get("route")) is not None:
        return route.path
    if scope.get("endpoint") is not None and not scope.get("path_params"):
        return scope["path"]
    return "unmatched"


def _query(scope: Scope) -> str:
    return scope.get("query_string", b"").decode("latin-1")
