"""``maskrcnn train --dataset DIR_OR_ZIP --out model.safetensors``: offline training.

Shows a progress bar (epoch, loss, learning rate, ETA), evaluates COCO bbox/segm
mAP on a validation split after each epoch, and writes a checkpoint whose
metadata records the command, the dataset's ``info`` (generation parameters for
synthetic data), the metrics, the training time and the machine
(``model.training.pipeline``). With several GPUs visible it restarts itself under
``torchrun`` (DDP).
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from model import BASE_MODELS, spec_names


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    from app.commands.shared import DefaultsShown

    p = subparsers.add_parser(
        "train",
        help=summary,
        description="Train a Mask R-CNN on a COCO instances dataset (a directory or zip "
        "with annotations.json at its root) and write a .safetensors checkpoint.",
        formatter_class=DefaultsShown,
    )
    p.add_argument("--dataset", required=True, help="dataset directory or zip")
    p.add_argument("--annotations", help="COCO annotation file, when not DATASET/annotations.json")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--base-model",
        default="scratch",
        help=f"{spec_names(BASE_MODELS)}, a checkpoint file or a registry model id",
    )
    p.add_argument("--architecture", default="maskrcnn_small_fpn", help="for --base-model scratch")
    p.add_argument("--image-size", type=int, help="shorter side the network resizes images to")
    p.add_argument("--epochs", type=at_least_one, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=at_least_one, default=4, help="images per step")
    p.add_argument("--lr", type=float, default=0.02, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument(
        "--warmup-steps",
        type=int,
        help="steps of linear learning-rate warm-up (default: a tenth of all steps, at most 200)",
    )
    p.add_argument(
        "--schedule", choices=("cosine", "step"), default="cosine", help="learning-rate decay"
    )
    p.add_argument("--clip-grad-norm", type=float, default=10.0, help="0 turns clipping off")
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on the GPU")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="images held out to report mAP on"
    )
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "openvino"],
        help="what runs validation: auto is OpenVINO (float32) when training on the CPU",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--loader-processes",
        "--workers",  # its former name
        type=int,
        default=0,
        help="processes that load and augment images (0: the training process)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT.resume.safetensors when it exists"
    )
    p.add_argument("--no-ddp", action="store_true", help="one process even with several GPUs")
    p.set_defaults(func=run)


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from model import gpus_for_ddp

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
    from app.commands.shared import resolve_model
    from model import TrainConfig, TrainingPlan, is_main_rank, run_training

    base_model, model_id = resolve_model(args.base_model, scratch=True)
    plan = TrainingPlan(
        dataset=args.dataset,
        annotations=args.annotations,
        out=Path(args.out),
        base_model=base_model,
        architecture=args.architecture,
        image_size=args.image_size,
        hflip=args.hflip,
        vflip=args.vflip,
        val_fraction=args.val_fraction,
        device=args.device,
        runtime=args.runtime,
        resume=args.resume,
        command="maskrcnn " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        extra={"base_model": model_id} if model_id else {},
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
            num_workers=args.loader_processes,
            seed=args.seed,
        ),
    )
    bar = ProgressBar(enabled=is_main_rank())
    try:
        outcome = run_training(
            plan, progress=bar.update, announce=lambda line: print(line, file=sys.stderr)
        )
    finally:
        bar.close()
    if outcome is None:
        return 0
    if outcome.metrics:
        from model import format_metrics

        print(format_metrics(outcome.metrics))
    result = outcome.result
    print(
        f"wrote {plan.out} ({result.steps} steps, {result.elapsed_s / 60:.1f} min)", file=sys.stderr
    )
    return 0


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
