"""``maskrcnn serve``: the HTTP service under uvicorn; SIGTERM drains it
gracefully (``app.server``)."""

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=summary,
        description="Run the HTTP service. Settings come from MASKRCNN_* variables "
        "(and .env); the options below override them.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--model", help="auto, coco, coco-v2, demo or a checkpoint (MASKRCNN_MODEL)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.server import run_server
    from app.settings import SettingsError, load_settings

    overrides = {"model": args.model} if args.model else {}
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        print(f"maskrcnn serve: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    error = run_server(settings, args.host, args.port)
    if error is not None:
        print(
            f"maskrcnn serve: error: {error}",
            file=sys.stderr,
        )
        return 1
    return 0
