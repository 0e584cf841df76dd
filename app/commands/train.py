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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from model.training.loop import ProgressFn, TrainConfig, TrainResult


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
    from model.training.distributed import gpus_for_ddp

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
    from model.training.loop import TrainConfig

    plan = TrainingPlan(
        dataset=args.dataset,
        annotations=args.annotations,
        out=Path(args.out),
        base_model=args.base_model,
        architecture=args.architecture,
        image_size=args.image_size,
        hflip=args.hflip,
        vflip=args.vflip,
        val_fraction=args.val_fraction,
        device=args.device,
        resume=args.resume,
        command="maskrcnn " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        config=TrainConfig(
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
        ),
    )
    is_main = int(os.environ.get("RANK", "0")) == 0
    bar = ProgressBar(enabled=is_main)
    try:
        outcome = run_training(
            plan, progress=bar.update, announce=lambda line: print(line, file=sys.stderr)
        )
    finally:
        bar.close()
    if outcome is None:
        return 0
    if outcome.metrics:
        from model.training.evaluation import format_metrics

        print(format_metrics(outcome.metrics))
    result = outcome.result
    print(
        f"wrote {plan.out} ({result.steps} steps, {result.elapsed_s / 60:.1f} min)", file=sys.stderr
    )
    return 0


@dataclass(frozen=True)
class TrainingPlan:
    """One training run, as ``maskrcnn train`` and a training job's process both
    describe it: what to train on, where from, how, and where the checkpoint goes."""

    dataset: str | Path
    out: Path
    config: "TrainConfig"
    base_model: str = "scratch"  # scratch, coco, coco-v2, demo or a checkpoint file
    architecture: str = "maskrcnn_small_fpn"  # for scratch
    image_size: int | None = None  # shorter side the network resizes to
    annotations: str | None = None
    hflip: float = 0.5
    vflip: float = 0.0
    val_fraction: float = 0.1
    device: str = "auto"
    resume: bool = False  # continue from OUT.resume.safetensors when it exists
    save_resume_state: bool = True  # write OUT.resume.safetensors after each epoch
    dataset_id: str | None = None  # recorded in the checkpoint; default: the folder name
    command: str | None = None  # recorded in the checkpoint's training record
    extra: dict[str, Any] = field(default_factory=dict)  # more checkpoint metadata


@dataclass
class TrainingOutcome:
    """What a finished run wrote: the checkpoint's metadata, its last validation
    ``metrics`` (``{}`` without a validation split) and the loop's result."""

    metadata: dict[str, Any]
    metrics: dict[str, Any]
    result: "TrainResult"


def run_training(
    plan: TrainingPlan,
    *,
    progress: "ProgressFn | None" = None,
    announce: Callable[[str], None] = print,
    show_validation: bool = True,
) -> TrainingOutcome | None:
    """Split the dataset, build the starting network, train, evaluate each epoch on
    the validation split and write the checkpoint to ``plan.out`` (atomically).

    Returns ``None`` on the non-main ranks of a DDP run (they write nothing).
    """
    from model.checkpoint import save_checkpoint
    from model.loading import resolve_device
    from model.training.augment import AugmentConfig, TrainAugment
    from model.training.dataset import CocoDataset, split_dataset
    from model.training.loop import train
    from model.training.transfer import prepare_network

    augment = TrainAugment(AugmentConfig(hflip=plan.hflip, vflip=plan.vflip))
    full = CocoDataset(plan.dataset, transforms=augment, annotation_file=plan.annotations)
    train_set, val_set = split_dataset(full, plan.val_fraction, seed=plan.config.seed)
    size = (
        {"min_size": plan.image_size, "max_size": round(plan.image_size * 5 / 3)}
        if plan.image_size
        else {}
    )
    start = prepare_network(
        plan.base_model, full.categories, architecture=plan.architecture, **size
    )
    device = resolve_device(plan.device)
    announce(
        f"train: {len(train_set)} images, validation: {len(val_set) if val_set else 0}, "
        f"{len(full.categories)} classes, {start.architecture} from {start.base_model}, "
        f"{device}"
    )
    resume_path = plan.out.with_name(plan.out.name + ".resume.safetensors")
    evaluate = make_evaluator(full, val_set, device, show_validation) if val_set else None
    result = train(
        start.network,
        train_set,
        config=plan.config,
        device=device,
        progress=progress,
        evaluate=evaluate,
        state_path=resume_path if plan.save_resume_state else None,
        resume=plan.resume,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    metrics = (result.history[-1].get("metrics") or {}) if result.history else {}
    metadata = save_checkpoint(
        plan.out,
        start.network,
        architecture=start.architecture,
        arch_kwargs=start.arch_kwargs,
        classes=full.categories,
        dataset_id=plan.dataset_id or full.dataset_id,
        metrics=metrics,
        extra={
            "training": training_record(plan, result),
            "dataset_info": full.coco_dict().get("info"),
            **plan.extra,
        },
    )
    resume_path.unlink(missing_ok=True)
    return TrainingOutcome(metadata, metrics, result)


def make_evaluator(full, val_set, device, show_progress: bool = True):
    from model.inference.predictor import Predictor
    from model.info import ModelInfo
    from model.training.evaluation import evaluate_predictor

    names = ("background", *(c["name"] for c in full.categories))
    info = ModelInfo("validation", "training", tuple(full.label_to_category), names)

    def evaluate(network):
        with tqdm(
            total=len(val_set),
            unit="img",
            desc="validate",
            leave=False,
            disable=not show_progress,
        ) as bar:
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


def training_record(plan: TrainingPlan, result) -> dict:
    import dataclasses

    import torch

    return {
        "command": plan.command,
        "config": dataclasses.asdict(plan.config),
        "history": result.history,
        "steps": result.steps,
        "elapsed_s": round(result.elapsed_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_description(plan.device),
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
