"""``maskrcnn export --model ID|PATH|demo --out DIR [--triton NAME]``: the model as
ONNX (``model.export``), for ONNX Runtime, or as a Triton model folder."""

import argparse
import re
import sys

from model import MODEL_SPECS, spec_names


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    from app.commands.shared import DefaultsShown

    parser = subparsers.add_parser(
        "export",
        help=summary,
        formatter_class=DefaultsShown,
        description="Write the model as ONNX (DIR/model.onnx and DIR/classes.json), or "
        "with --triton NAME as a Triton model repository (DIR/NAME/config.pbtxt, "
        "DIR/NAME/1/model.onnx, DIR/NAME/classes.json). docs/export.md says how to run it.",
    )
    parser.add_argument(
        "--model",
        default="demo",
        help=f"{spec_names(MODEL_SPECS)}, a checkpoint file or a registry model id",
    )
    parser.add_argument("--classes-file", help="class names, one per line (background first)")
    parser.add_argument("--out", required=True, help="the folder to write into")
    parser.add_argument("--triton", metavar="NAME", help="write a Triton model folder NAME")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.api.schemas import TRITON_NAME_PATTERN
    from app.commands.shared import resolve_model
    from model import load_model, write_model_files, write_triton_repository

    if args.triton is not None and not re.fullmatch(TRITON_NAME_PATTERN, args.triton):
        print(
            f"maskrcnn export: --triton {args.triton!r}: letters, digits, '_', '.' and '-', "
            "at most 64",
            file=sys.stderr,
        )
        return 2
    spec, model_id = resolve_model(args.model)
    loaded = load_model(spec, classes_file=args.classes_file, model_id=model_id, device="cpu")
    out = Path(args.out)
    if args.triton is not None:
        folder = write_triton_repository(loaded.network, loaded.info, out, args.triton)
        print(f"{loaded.info.id}: Triton model {args.triton} in {folder}", file=sys.stderr)
    else:
        onnx_file = write_model_files(loaded.network, loaded.info, out)
        print(f"{loaded.info.id}: {onnx_file}", file=sys.stderr)
    return 0
