"""``maskrcnn serve``: the HTTP service under uvicorn; SIGTERM drains it
gracefully (``app.server``)."""

import argparse
import sys

from model import MODEL_SPECS, spec_names


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=summary,
        description="Run the HTTP service. Settings come from MASKRCNN_* variables "
        "(and .env); the options below override them.",
    )
    parser.add_argument(
        "--host",
        help="bind address (MASKRCNN_HOST; default 127.0.0.1, this machine only: "
        "0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, help="port (MASKRCNN_PORT; default 8000)")
    parser.add_argument(
        "--model", help=f"{spec_names(MODEL_SPECS)} or a checkpoint (MASKRCNN_MODEL)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.server import run_server
    from app.settings import SettingsError, load_settings

    given = {"model": args.model, "host": args.host, "port": args.port}
    overrides = {name: value for name, value in given.items() if value is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        print(f"maskrcnn serve: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    error = run_server(settings, settings.host, settings.port)
    if error is not None:
        print(
            f"maskrcnn serve: error: {error}",
            file=sys.stderr,
        )
        return 1
    return 0
