"""``maskrcnn serve``: the HTTP service under uvicorn (SPEC §8).

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

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import configure_logging
from app.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from app.serving.service import Service

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 5.0  # beyond REQUEST_TIMEOUT_S, the longest a drain may take
# the longest the listener stays open after SIGTERM; longer than nginx's upstream
# keepalive_timeout (deploy/nginx.conf), so its pool holds no connection to us by then
DRAIN_ACCEPT_S = 5.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Settings come from MASKRCNN_* variables "
        "(and .env); the options below override them.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--model", help="auto, coco, coco-v2, demo or a checkpoint (MASKRCNN_MODEL)"
    )
    parser.set_defaults(func=run)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains before exiting."""

    def __init__(self, config: uvicorn.Config, service: "Service"):
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

    def __init__(self, app: ASGIApp, service: "Service"):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.service.state == "draining":
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_closing)


def run(args: argparse.Namespace) -> int:
    from app.main import create_app

    overrides = {"model": args.model} if args.model else {}
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        print(f"maskrcnn serve: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        CloseWhileDraining(app, app.state.service),
        host=args.host,
        port=args.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.request_timeout_s + DRAIN_MARGIN_S),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    if server.exit_code:
        print(
            f"maskrcnn serve: error: cannot serve model {settings.model!r}: "
            f"{app.state.service.error}",
            file=sys.stderr,
        )
    return server.exit_code
