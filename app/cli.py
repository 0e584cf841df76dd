"""The ``maskrcnn`` command. Each subcommand lives in ``app/commands/<name>.py``
and exposes ``add_parser(subparsers)``, which registers it and sets ``func``."""

import argparse
import importlib
import logging
import sys

COMMANDS = ("serve", "worker", "predict", "train", "evaluate", "download")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn", description="Mask R-CNN instance segmentation service and tools."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"app.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"app.commands.{name}":
                raise
            continue  # command not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model.errors import ModelError

    try:
        return int(args.func(args) or 0)
    except ModelError as e:
        print(f"maskrcnn {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
