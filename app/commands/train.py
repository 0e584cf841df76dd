"""``maskrcnn train --dataset DIR_OR_ZIP --out model.safetensors``: offline training.

Shows a progress bar (epoch, loss, learning rate, ETA), evaluates COCO bbox/segm
mAP on a validation split after each epoch, and writes a checkpoint (SPEC §3)
whose metadata records the command, the dataset's ``info`` (generation
parameters for synthetic data), the metrics, the training time and the machine.
With several GPUs visible it restarts itself under ``torchrun`` (DDP).
"""

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a COCO dataset",
        description="Train a Mask R-CNN on a COCO instances dataset (a directory or zip "
        "with annotations.json at its root) and write a .safetensors checkpoint.",
    )
    p.add_argument("--dataset", required=True, help="dataset directory or zip")
    p.add_argument("--annotations", help="COCO annotation file, when not DATASET/annotations.json")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--base-model",
        default="scratch",
        help="scratch, coco, coco-v2, demo or a checkpoint file (default: scratch)",
    )
    p.add_argument("--architecture", default="maskrcnn_small_fpn", help="for --base-model scratch")
    p.add_argument("--image-size", type=int, help="shorter side the network resizes images to")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine")
    p.add_argument("--clip-grad-norm", type=float, default=10.0, help="0 turns clipping off")
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on the GPU")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT.resume.safetensors when it exists"
    )
    p.add_argument("--no-ddp", action="store_true", help="one process even with several GPUs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.distributed import gpus_for_ddp

    gpus = 0 if args.no_ddp or "LOCAL_RANK" in os.environ else gpus_for_ddp()
    if gpus:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={gpus}",
            "-m",
            "app.cli",
            *sys.argv[1:],
        ]
        return subprocess.call(command)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return train_command(args)


def train_command(args: argparse.Namespace) -> int:
    from model.augment import AugmentConfig, TrainAugment
    from model.checkpoint import save_checkpoint
    from model.dataset import CocoDataset, split_dataset
    from model.loading import resolve_device
    from model.training import TrainConfig, train
    from model.transfer import prepare_network

    out = Path(args.out)
    augment = TrainAugment(AugmentConfig(hflip=args.hflip, vflip=args.vflip))
    full = CocoDataset(args.dataset, transforms=augment, annotation_file=args.annotations)
    train_set, val_set = split_dataset(full, args.val_fraction, seed=args.seed)
    size = (
        {"min_size": args.image_size, "max_size": round(args.image_size * 5 / 3)}
        if args.image_size
        else {}
    )
    start = prepare_network(
        args.base_model, full.categories, architecture=args.architecture, **size
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        clip_grad_norm=args.clip_grad_norm or None,
        amp=not args.no_amp,
        num_workers=args.workers,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    is_main = int(os.environ.get("RANK", "0")) == 0
    print(
        f"train: {len(train_set)} images, validation: {len(val_set) if val_set else 0}, "
        f"{len(full.categories)} classes, {start.architecture} from {start.base_model}, "
        f"{device}",
        file=sys.stderr,
    )
    bar = ProgressBar(enabled=is_main)
    result = train(
        start.network,
        train_set,
        config=config,
        device=device,
        progress=bar.update,
        evaluate=make_evaluator(full, val_set, device) if val_set else None,
        state_path=out.with_name(out.name + ".resume.safetensors"),
        resume=args.resume,
    )
    bar.close()
    if not is_main:
        return 0
    metrics = (result.history[-1].get("metrics") or {}) if result.history else {}
    save_checkpoint(
        out,
        start.network,
        architecture=start.architecture,
        arch_kwargs=start.arch_kwargs,
        classes=full.categories,
        dataset_id=full.dataset_id,
        metrics=metrics,
        extra={
            "training": training_record(args, config, result),
            "dataset_info": full.coco_dict().get("info"),
        },
    )
    out.with_name(out.name + ".resume.safetensors").unlink(missing_ok=True)
    if metrics:
        from model.evaluation import format_metrics

        print(format_metrics(metrics))
    print(f"wrote {out} ({result.steps} steps, {result.elapsed_s / 60:.1f} min)", file=sys.stderr)
    return 0


def make_evaluator(full, val_set, device):
    from model.evaluation import evaluate_predictor
    from model.info import ModelInfo
    from model.predictor import Predictor

    names = ("background", *(c["name"] for c in full.categories))
    info = ModelInfo("validation", "training", tuple(full.label_to_category), names)

    def evaluate(network):
        with tqdm(total=len(val_set), unit="img", desc="validate", leave=False) as bar:
            return evaluate_predictor(
                Predictor(network, info, device=device), val_set, progress=bar.update
            )

    return evaluate


class ProgressBar:
    """tqdm over all steps; one summary line per epoch."""

    def __init__(self, enabled: bool = True):
        self.bar: tqdm | None = None
        self.enabled = enabled

    def update(self, p) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", desc="train")
        if p.event == "step":
            self.bar.set_description(f"epoch {p.epoch}/{p.epochs}")
            self.bar.set_postfix(loss=f"{p.loss:.3f}", lr=f"{p.learning_rate:.4f}", refresh=False)
            self.bar.update(1)
            return
        line = f"epoch {p.epoch}/{p.epochs}: loss {p.losses.get('loss', float('nan')):.3f}"
        if p.metrics:
            line += "".join(
                f", {t} AP {m['AP']:.3f} AP50 {m['AP50']:.3f}" for t, m in p.metrics.items()
            )
        self.bar.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def training_record(args, config, result) -> dict:
    import dataclasses

    import torch

    return {
        "command": "maskrcnn " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        "config": dataclasses.asdict(config),
        "history": result.history,
        "steps": result.steps,
        "elapsed_s": round(result.elapsed_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_description(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {len(os.sched_getaffinity(0))} CPU cores available"
    if torch.cuda.is_available() and device != "cpu":
        text += f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return text
