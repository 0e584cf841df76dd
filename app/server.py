"""Serving the app under uvicorn, with a graceful drain.

SIGTERM (or a first Ctrl-C) starts a graceful drain: ``/readyz`` turns 503 at
once while the server keeps answering, in-flight requests and queued images
finish, then uvicorn shuts down. A second signal shuts down without waiting
for the drain.

Behind a load balancer that does not watch ``/readyz`` (nginx's passive health
checks), requests keep arriving while draining, so "nothing in flight" may never
come: the listener stays open at most ``DRAIN_ACCEPT_S``, then closes (the
balancer's next connect is refused and it retries another replica) while what
is in flight still finishes. Responses sent while draining say ``Connection:
close``, so no idle keep-alive connection is left in a balancer's pool when the
listener closes: a request sent on one at that moment would be lost.
"""

import asyncio
import ipaddress
import logging

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.connections import guarded
from app.main import create_app
from app.serving.service import Service, State
from app.settings import Settings

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 5.0  # beyond REQUEST_TIMEOUT_S, the longest a drain may take
# the longest the listener stays open after SIGTERM; longer than nginx's upstream
# keepalive_timeout (deploy/nginx.conf), so its pool holds no connection to us by then
DRAIN_ACCEPT_S = 5.0


def run_server(settings: Settings, host: str, port: int) -> str | None:
    """Serve until SIGTERM/SIGINT (after the drain) or until the model fails;
    returns why the model could not be served, or ``None``."""
    if not is_loopback(host) and not settings.api_tokens:
        log.warning(
            "listening on %s with no MASKRCNN_API_TOKENS: anyone who can reach port %d "
            "of this machine can use the API (docs/security.md)",
            host,
            port,
        )
    app = create_app(settings)
    service: Service = app.state.service
    config = uvicorn.Config(
        CloseWhileDraining(app, service),
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.request_timeout_s + DRAIN_MARGIN_S),
        lifespan="on",
        http=guarded(settings.header_timeout_s, int(settings.max_header_kb * 1024)),
        timeout_keep_alive=settings.keep_alive_s,
    )
    server = DrainingServer(config, service)
    server.run()
    return service.error if server.exit_code else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be any interface
        return False


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains before exiting."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self.service.on_fatal = self._fatal
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._captured_signals.append(sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.service.begin_drain()
        task = self._loop.create_task(self._drain_then_exit())
        self._drain_task = task  # keep a reference

    async def _drain_then_exit(self) -> None:
        """Stop accepting once idle or after ``DRAIN_ACCEPT_S``. uvicorn's shutdown
        then closes the listener, lets every request in flight finish (at most
        ``timeout_graceful_shutdown``), and the lifespan's shutdown empties the queue."""
        if not await self.service.wait_drained(DRAIN_ACCEPT_S):
            log.info(
                "draining: %d requests still in flight after %.0f s; closing the listener, "
                "they finish before exit",
                self.service.in_flight,
                DRAIN_ACCEPT_S,
            )
        self.should_exit = True

    def _fatal(self, error: BaseException) -> None:
        self.exit_code = 1
        self.should_exit = True


class CloseWhileDraining:
    """ASGI wrapper: while the service drains, every response carries ``Connection:
    close``, so clients and proxies stop reusing connections to this server."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.service.state == State.DRAINING:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_closing)
