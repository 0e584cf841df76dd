"""The ``maskrcnn`` command. Each subcommand lives in ``app/commands/<name>.py``
and exposes ``add_parser(subparsers, summary)``, which registers it and sets
``func``. Only the command being run is imported (``--help`` and every command's
own ``--help`` answer without torch); the others are listed by their summary."""

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": "run the HTTP service",
    "worker": "run the training worker only",
    "predict": "segment image files and write COCO results JSON",
    "train": "train or fine-tune a model on a COCO dataset",
    "evaluate": "COCO bbox/segm mAP of a model on a COCO dataset",
    "download": "pre-fetch pretrained weights into the torch hub cache",
    "export": "write a model as ONNX, or as a Triton model folder",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with ``command``'s own arguments when it names one."""
    parser = argparse.ArgumentParser(
        prog="maskrcnn", description="Mask R-CNN instance segmentation service and tools."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name == command:
            importlib.import_module(f"app.commands.{name}").add_parser(subparsers, summary)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first positional argument), if any."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--log-level")
    first.add_argument("command", nargs="?")
    known, _ = first.parse_known_args(argv)
    return known.command if known.command in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_in(argv)).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model import ModelError

    try:
        return int(args.func(args) or 0)
    except ModelError as e:
        print(f"maskrcnn {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
