"""``maskrcnn download coco|coco-v2``: pre-fetch torchvision weights into the hub cache."""

import argparse

from model.weights import PRETRAINED, download_weights


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "download",
        help="pre-fetch pretrained weights into the torch hub cache",
        description="Download torchvision COCO weights into $TORCH_HOME/hub/checkpoints so "
        "the server can start offline (used by the Dockerfile at build time).",
    )
    parser.add_argument(
        "names", nargs="+", choices=sorted(PRETRAINED), metavar="NAME", help="coco or coco-v2"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        path = download_weights(PRETRAINED[name])
        print(f"{name}: {path}")
    return 0
