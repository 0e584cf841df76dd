"""``maskrcnn predict IMAGES... --out results.json``: offline batch prediction
writing the COCO results format."""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

# the options of /v1/segment this command takes, from the same schema
# (app.api.schemas.SegmentOptions): names, defaults, ranges and help alike
OPTIONS = ("score_threshold", "iou_threshold", "mask_threshold", "max_detections", "classes")


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    from app.commands.shared import DefaultsShown, add_model_options

    parser = subparsers.add_parser(
        "predict",
        help=summary,
        formatter_class=DefaultsShown,
        description="Run the model on image files (or directories of them) and write "
        "detections in the COCO results format (bbox as x,y,w,h; RLE segmentation).",
    )
    parser.add_argument("images", nargs="+", help="image files or directories")
    add_model_options(parser)
    parser.add_argument("--out", default="results.json", help="output file (- for stdout)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward")
    from app.api.schemas import SegmentOptions

    for name in OPTIONS:  # strings: the schema reads them as the form's fields are read
        field = SegmentOptions.model_fields[name]
        flag = "--" + name.replace("_", "-")
        repeated = {"action": "append"} if name == "classes" else {}  # a list, as in the form
        parser.add_argument(flag, default=field.default, help=field.description, **repeated)
    parser.add_argument(
        "--annotations",
        help="a COCO annotations file: take image ids from it, matching file names",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.api.schemas import SegmentOptions
    from app.commands.shared import load_predictor_from
    from model import (
        InvalidImageError,
        InvalidOptionError,
        list_images,
        read_image,
        to_coco_results,
    )

    try:
        wanted = SegmentOptions(**{name: getattr(args, name) for name in OPTIONS})
    except ValidationError as e:
        for error in e.errors():
            flag = "--" + str(error["loc"][0]).replace("_", "-")
            print(f"maskrcnn predict: {flag}: {error['msg']}", file=sys.stderr)
        return 2
    paths = list_images(args.images)
    if not paths:
        print("maskrcnn predict: no image files found", file=sys.stderr)
        return 2
    image_ids = resolve_image_ids(paths, args.annotations)
    predictor = load_predictor_from(args)
    try:
        options = wanted.for_model(predictor.info)
    except InvalidOptionError as e:
        print(f"maskrcnn predict: --classes: {e}", file=sys.stderr)
        return 2
    rows, failed = [], 0
    with tqdm(total=len(paths), unit="img", desc=f"predict ({predictor.info.id})") as bar:
        for start in range(0, len(paths), max(1, args.batch_size)):
            chunk = paths[start : start + args.batch_size]
            images, kept = [], []
            for path in chunk:
                try:
                    images.append(read_image(path))
                    kept.append(path)
                except InvalidImageError as e:
                    failed += 1
                    tqdm.write(f"skipped: {e}", file=sys.stderr)
            results = predictor.predict(images, [options] * len(images)) if images else []
            for path, result in zip(kept, results, strict=True):
                rows.extend(to_coco_results(result, image_ids[path], str(path)))
            bar.update(len(chunk))
    if failed == len(paths):  # nothing to write: an earlier OUT stays as it was
        print(f"maskrcnn predict: no image could be read; {args.out} not written", file=sys.stderr)
        return 1
    write_json(rows, args.out)
    print(f"{len(rows)} detections in {len(paths) - failed} images -> {args.out}", file=sys.stderr)
    return 1 if failed else 0


def resolve_image_ids(paths: list[Path], annotations: str | None) -> dict[Path, int]:
    """Ids 1..n in order, or the ids a COCO file gives these file names."""
    from model import InvalidImageError

    if not annotations:
        return {path: i for i, path in enumerate(paths, start=1)}
    with open(annotations, encoding="utf-8") as f:
        images = json.load(f)["images"]
    by_name = {img["file_name"]: img["id"] for img in images}
    by_base = {Path(img["file_name"]).name: img["id"] for img in images}
    ids = {}
    for path in paths:
        match = [by_name.get(str(path)), by_name.get(path.as_posix()), by_base.get(path.name)]
        found = next((m for m in match if m is not None), None)
        if found is None:
            raise InvalidImageError(f"{path}: not listed in {annotations}")
        ids[path] = found
    return ids


def write_json(rows: list[dict], out: str) -> None:
    if out == "-":
        json.dump(rows, sys.stdout)
        return
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(rows), encoding="utf-8")
    tmp.replace(out)
