"""``maskrcnn serve``: the HTTP service under uvicorn (SPEC §8).

SIGTERM (or a first Ctrl-C) starts a graceful drain: ``/readyz`` turns 503 at
once while the server keeps answering, in-flight requests and queued images
finish, then uvicorn shuts down. A second signal shuts down without waiting
for the drain.
"""

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import uvicorn

from app.logs import configure_logging
from app.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from app.service import Service

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 5.0  # beyond REQUEST_TIMEOUT_S, the longest a drain may take


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
        timeout = self.service.settings.request_timeout_s + DRAIN_MARGIN_S
        if not await self.service.wait_drained(timeout):
            log.warning("drain did not finish within %.0f s; shutting down anyway", timeout)
        self.should_exit = True

    def _fatal(self, error: BaseException) -> None:
        self.exit_code = 1
        self.should_exit = True


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
        app,
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
