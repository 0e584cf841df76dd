"""``maskrcnn download coco|coco-v2``: pre-fetch torchvision weights into the hub cache."""

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "download",
        help=summary,
        description="Download torchvision COCO weights into $TORCH_HOME/hub/checkpoints so "
        "the server can start offline (used by the Dockerfile at build time).",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="coco or coco-v2")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model import PRETRAINED, download_weights

    unknown = [name for name in args.names if name not in PRETRAINED]
    if unknown:
        print(
            f"maskrcnn download: error: invalid choice: {unknown[0]!r} "
            f"(choose from {', '.join(sorted(PRETRAINED))})",
            file=sys.stderr,
        )
        return 2
    for name in args.names:
        path = download_weights(PRETRAINED[name])
        print(f"{name}: {path}")
    return 0
