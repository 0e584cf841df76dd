"""One training run from a dataset to a checkpoint, as ``maskrcnn train`` and a
training job's process (``app.training.runner``) both run it: split the dataset,
build the starting network, train (``model.training.loop``), evaluate every epoch
on the validation split, and write the checkpoint with a record of the run
(command, configuration, per-epoch history, metrics, time, machine)."""

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.inference.predictor import Predictor
from model.inference.runtimes import choose_runtime
from model.info import ModelInfo
from model.loading import resolve_device
from model.training.augment import AugmentConfig, TrainAugment
from model.training.dataset import CocoDataset, split_dataset
from model.training.distributed import is_main_rank
from model.training.evaluation import evaluate_predictor
from model.training.loop import ProgressFn, TrainConfig, TrainResult, train
from model.training.transfer import StartingPoint, starting_network


@dataclass(frozen=True)
class TrainingPlan:
    """One training run: what to train on, where from, how, and where the
    checkpoint goes."""

    dataset: str | Path
    out: Path
    config: TrainConfig
    base_model: str = "scratch"  # scratch, coco, coco-v2, demo or a checkpoint file
    architecture: str = "maskrcnn_small_fpn"  # for scratch
    image_size: int | None = None  # shorter side the network resizes to
    annotations: str | None = None
    hflip: float = 0.5
    vflip: float = 0.0
    val_fraction: float = 0.1
    device: str = "auto"
    # what runs validation (model.inference.runtimes): auto is OpenVINO, in float32,
    # where the network trains on the CPU
    runtime: str = "auto"
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
    result: TrainResult


def run_training(
    plan: TrainingPlan,
    *,
    progress: ProgressFn | None = None,
    announce: Callable[[str], None] = print,
    show_validation: bool = True,
) -> TrainingOutcome | None:
    """Split the dataset, build the starting network, train, evaluate each epoch on
    the validation split and write the checkpoint to ``plan.out`` (atomically).

    Returns ``None`` on the non-main ranks of a DDP run (they write nothing).
    """
    augment = TrainAugment(AugmentConfig(hflip=plan.hflip, vflip=plan.vflip))
    full = CocoDataset(plan.dataset, transforms=augment, annotation_file=plan.annotations)
    train_set, val_set = split_dataset(full, plan.val_fraction, seed=plan.config.seed)
    size = (
        {"min_size": plan.image_size, "max_size": round(plan.image_size * 5 / 3)}
        if plan.image_size
        else {}
    )
    start = starting_network(
        plan.base_model, full.categories, architecture=plan.architecture, **size
    )
    device = resolve_device(plan.device)
    announce(
        f"train: {len(train_set)} images, validation: {len(val_set) if val_set else 0} "
        f"(run by {choose_runtime(plan.runtime, device)}), {len(full.categories)} classes, "
        f"{start.architecture} from {start.base_model}, {device}"
    )
    resume_path = plan.out.with_name(plan.out.name + ".resume.safetensors")
    evaluate = None
    if val_set:
        evaluate = make_evaluator(full, val_set, device, plan.runtime, show_validation)
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
    if not is_main_rank():
        return None
    outcome = write_checkpoint(plan, start, full, result)
    resume_path.unlink(missing_ok=True)
    return outcome


def write_checkpoint(
    plan: TrainingPlan, start: StartingPoint, full: CocoDataset, result: TrainResult
) -> TrainingOutcome:
    """The trained network to ``plan.out``, with the run's record and last metrics."""
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
    return TrainingOutcome(metadata, metrics, result)


def make_evaluator(full, val_set, device, runtime: str = "auto", show_progress: bool = True):
    """COCO bbox/segm mAP of a network on ``val_set`` in float32, run by ``runtime``
    (a progress bar on stderr unless ``show_progress`` is off)."""
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
            predictor = Predictor(network, info, device=device, runtime=runtime)
            return evaluate_predictor(predictor, val_set, progress=bar.update)

    return evaluate


def training_record(plan: TrainingPlan, result: TrainResult) -> dict:
    return {
        "command": plan.command,
        "config": dataclasses.asdict(plan.config),
        "history": result.history,
        "steps": result.steps,
        "elapsed_s": round(result.elapsed_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_description(plan.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),  # of each process
        "processes": int(os.environ.get("WORLD_SIZE", "1")),  # under torchrun, all nodes'
    }


def machine_description(device: str) -> str:
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
