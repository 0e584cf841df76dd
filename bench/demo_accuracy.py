"""COCO mAP of a model on freshly generated held-out shapes (the demo model's figures).

    python bench/demo_accuracy.py [--model demo] [--num-images 300] [--seed 1000]
        [--write-metadata model/weights/demo.safetensors]

Generates ``--num-images`` synthetic images with ``--seed`` (the demo model was
trained on seed 0) at the image size the checkpoint was trained on, evaluates
bbox and segm with pycocotools, and prints a Markdown table with the machine.
``--write-metadata FILE`` stores the figures in FILE's metadata under
``metrics.held_out`` (FILE must be the model evaluated).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model.checkpoint import save_checkpoint
from model.inference.predictor import Predictor
from model.loading import load_file, load_model
from model.training.dataset import CocoDataset
from model.training.evaluation import STAT_NAMES, evaluate_predictor
from model.training.synthetic import generate_dataset

STANDARD_KEYS = {"format", "architecture", "arch_kwargs", "classes", "dataset_id", "metrics",
                 "created_at", "sha256"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-metadata", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    size = loaded.info.metadata.get("dataset_info", {}).get("image_size", 256)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, num_images=args.num_images, image_size=size, seed=args.seed)
        predictor = Predictor(loaded.network, loaded.info, device="cpu")
        metrics = evaluate_predictor(predictor, CocoDataset(tmp))
    print(f"{loaded.info.id}: {args.num_images} held-out {size}x{size} images, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| IoU type | " + " | ".join(STAT_NAMES) + " |")
    print("|---" * (len(STAT_NAMES) + 1) + "|")
    for iou_type, stats in metrics.items():
        print(f"| {iou_type} | " + " | ".join(f"{stats[n]:.3f}" for n in STAT_NAMES) + " |")
    if args.write_metadata:
        held_out = {"num_images": args.num_images, "seed": args.seed, "image_size": size,
                    **metrics}
        write_metrics(args.write_metadata, held_out)


def write_metrics(path: Path, held_out: dict) -> None:
    loaded = load_file(path)  # reads the file once, its hash verified
    meta = loaded.info.metadata
    save_checkpoint(
        path, loaded.network, architecture=meta["architecture"], arch_kwargs=meta["arch_kwargs"],
        classes=meta["classes"], dataset_id=meta.get("dataset_id"),
        metrics={**meta.get("metrics", {}), "held_out": held_out},
        extra={k: v for k, v in meta.items() if k not in STANDARD_KEYS},
    )
    print(f"\nwrote metrics.held_out into {path}")


if __name__ == "__main__":
    main()
