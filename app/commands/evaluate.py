"""``maskrcnn evaluate --model M --dataset D``: COCO bbox and segm mAP (pycocotools).

Predicts every image of the dataset through the same ``Predictor`` as
``maskrcnn predict`` (score threshold 0.05, 100 detections per image) and prints
the 12 COCOeval statistics per IoU type; ``--out`` also writes them as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    from app.commands.shared import DefaultsShown, add_model_options

    p = subparsers.add_parser(
        "evaluate",
        help=summary,
        formatter_class=DefaultsShown,
        description="Evaluate a model on a COCO instances dataset (a directory or zip with "
        "annotations.json at its root) with pycocotools COCOeval.",
    )
    add_model_options(p)
    p.add_argument("--dataset", required=True, help="dataset directory or zip")
    p.add_argument(
        "--annotations",
        help="COCO annotation file, when it is not DATASET/annotations.json "
        "(torchvision layout: --dataset val2017 --annotations instances_val2017.json)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward")
    p.add_argument("--threads", type=int, help="CPU threads (torch's and OpenVINO's)")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from app.commands.shared import load_predictor_from
    from model import CocoDataset, evaluate_predictor, format_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = CocoDataset(args.dataset, annotation_file=args.annotations)
    predictor = load_predictor_from(args)
    check_classes(predictor.info, dataset)
    with tqdm(total=len(dataset), unit="img", desc=f"evaluate ({predictor.info.id})") as bar:
        metrics = evaluate_predictor(
            predictor, dataset, batch_size=args.batch_size, progress=bar.update
        )
    print(format_metrics(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def check_classes(info, dataset) -> None:
    """Warn when the model predicts no category id the dataset knows (mAP would be 0)."""
    model_ids = set(info.class_ids[1:])
    dataset_ids = {c["id"] for c in dataset.categories}
    if not model_ids & dataset_ids:
        print(
            f"maskrcnn evaluate: warning: model {info.id!r} has no category id in common "
            f"with the dataset (model {sorted(model_ids)[:10]}, dataset "
            f"{sorted(dataset_ids)[:10]}); every AP will be 0",
            file=sys.stderr,
        )
