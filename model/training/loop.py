"""The training loop: SGD with warm-up and a step or cosine schedule.

``train`` runs a torchvision ``MaskRCNN`` over a ``CocoDataset``-like dataset
(samples ``(uint8 image [3, H, W], target)``), clipping gradients, with AMP on
CUDA and DDP when started by ``torchrun`` with several processes (see
``model.training.distributed``). After every epoch it can write a resume state (weights,
SGD momentum, step, RNG, history) to one ``.safetensors`` file; ``resume=True``
picks up from it. The learning rate is a pure function of the step, so the
schedule needs no state of its own.
"""

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from model.errors import ModelError
from model.training import distributed
from model.training.resume import load_resume_state, save_resume_state


class TrainingError(ModelError):
    """Training cannot go on (diverged, bad configuration, unreadable resume state)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 4
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # None: a tenth of all steps, at most 200
    warmup_factor: float = 0.001
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.75, 0.9)  # fractions of all steps ("step")
    gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    amp: bool = True  # float16 autocast and loss scaling; CUDA only
    num_workers: int = 0
    seed: int = 0


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback receives after each step (``event="step"``) and
    after each epoch (``event="epoch"``, with that epoch's mean ``losses`` and
    validation ``metrics``). ``loss`` is the mean of the last 20 steps."""

    event: Literal["step", "epoch"]
    epoch: int  # 1-based
    epochs: int
    step: int  # steps done, all epochs
    total_steps: int
    loss: float
    losses: dict[str, float]
    learning_rate: float
    elapsed_s: float
    eta_s: float
    metrics: dict[str, Any] | None = None


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    steps: int = 0
    elapsed_s: float = 0.0


ProgressFn = Callable[[TrainProgress], None]
EvaluateFn = Callable[[nn.Module], dict[str, Any]]


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    """``config.warmup_steps``, or by default a tenth of all steps, at most 200:
    a short fine-tune on a small set leaves its warm-up, a long run warms up for
    200 steps."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return max(1, min(200, total_steps // 10))


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up from ``warmup_factor`` to 1, times the decay schedule."""
    warmup, warmup_steps = 1.0, warmup_steps_for(config, total_steps)
    if step < warmup_steps:
        alpha = step / warmup_steps
        warmup = config.warmup_factor * (1 - alpha) + alpha
    progress = min(step / max(total_steps, 1), 1.0)
    if config.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif config.schedule == "step":
        decay = config.gamma ** sum(progress >= m for m in config.milestones)
    else:
        raise TrainingError(f"schedule must be 'cosine' or 'step', got {config.schedule!r}")
    return config.learning_rate * warmup * decay


def collate(batch: list) -> tuple[tuple, tuple]:
    images, targets = zip(*batch, strict=True)
    return images, targets


def train(
    network: nn.Module,
    dataset: Dataset,
    *,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    evaluate: EvaluateFn | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``network`` in place and return the per-epoch history.

    ``evaluate(network)`` runs after each epoch (on rank 0, eval mode) and its
    result goes in the history and the epoch progress. ``state_path``: where the
    resume state is written after each epoch; with ``resume`` the run continues
    from it when it exists.
    """
    if len(dataset) == 0:
        raise TrainingError("the training set has no images")
    ctx = distributed.context(torch.device(device))
    network.to(ctx.device)
    optimizer, result, start_epoch = _start(network, config, state_path if resume else None)
    model = ctx.wrap(network)
    loader = ctx.loader(dataset, config, collate)
    total_steps = config.epochs * len(loader)
    use_amp = config.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    clock = _Clock(result.steps, total_steps)
    for epoch in range(start_epoch, config.epochs):
        ctx.set_epoch(loader, epoch)
        model.train()
        sums: dict[str, float] = {}
        for images, targets in loader:
            lr = learning_rate_at(result.steps, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = _step(model, optimizer, scaler, images, targets, ctx.device, config, use_amp)
            result.steps += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            if progress and ctx.is_main:
                progress(clock.report("step", epoch, config.epochs, result.steps, losses, lr))
        entry = {"epoch": epoch + 1, "losses": {k: v / len(loader) for k, v in sums.items()}}
        if evaluate is not None and ctx.is_main:
            network.eval()
            entry["metrics"] = evaluate(network)
        result.history.append(entry)
        if state_path and ctx.is_main:
            save_resume_state(
                state_path, network, optimizer, epoch=epoch + 1, step=result.steps,
                history=result.history, config=asdict(config),
            )
        if progress and ctx.is_main:
            report = clock.report("epoch", epoch, config.epochs, result.steps, entry["losses"], lr)
            progress(_with_metrics(report, entry.get("metrics")))
        ctx.barrier()
    network.eval()
    result.elapsed_s = clock.elapsed()
    return result


def _start(
    network: nn.Module, config: TrainConfig, resume_from: str | Path | None
) -> tuple[torch.optim.Optimizer, TrainResult, int]:
    """The optimizer, the result so far and the first epoch to run: from the resume
    state at ``resume_from`` when it exists, else fresh (seeded)."""
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    result = TrainResult()
    if resume_from and Path(resume_from).is_file():
        saved = load_resume_state(resume_from, network, optimizer, config=asdict(config))
        result.steps, result.history = saved["step"], saved["history"]
        return optimizer, result, saved["epoch"]
    torch.manual_seed(config.seed)
    return optimizer, result, 0


def _step(model, optimizer, scaler, images, targets, device, config, use_amp) -> dict[str, float]:
    images = [image.to(device, non_blocking=True).float() / 255 for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
    if not torch.isfinite(loss):
        values = {k: round(v.item(), 4) for k, v in loss_dict.items()}
        raise TrainingError(f"loss is not finite ({values}); lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.clip_grad_norm:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    values = {k: v.item() for k, v in loss_dict.items()}
    values["loss"] = loss.item()
    return values


class _Clock:
    """Elapsed time, ETA from the steps run in this process, and a smoothed loss."""

    def __init__(self, done: int, total: int):
        self.start, self.first_step, self.total = time.monotonic(), done, total
        self.recent: deque[float] = deque(maxlen=20)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def report(self, event, epoch, epochs, step, losses, lr) -> TrainProgress:
        if event == "step":
            self.recent.append(losses["loss"])
        elapsed, run = self.elapsed(), step - self.first_step
        eta = elapsed / run * (self.total - step) if run else float("nan")
        return TrainProgress(
            event=event, epoch=epoch + 1, epochs=epochs, step=step, total_steps=self.total,
            loss=sum(self.recent) / max(len(self.recent), 1), losses=dict(losses),
            learning_rate=lr, elapsed_s=elapsed, eta_s=eta,
        )


def _with_metrics(report: TrainProgress, metrics: dict | None) -> TrainProgress:
    return TrainProgress(**{**report.__dict__, "metrics": metrics})
