"""``python -m app.training.runner JOB_ID WORKER_ID``: one training job, in its own process.

A worker (``app.training.worker``) starts it for a job it claimed, heartbeats the job while
it runs, stops it on cancel and records a crash. This process does the training
(``model.training.pipeline.run_training``, as ``maskrcnn train`` does), writes progress
to the job row at most every ``PROGRESS_INTERVAL_S`` plus every epoch's losses and
validation mAP, and on success writes the checkpoint to
``DATA_DIR/models/<model id>.safetensors``, copies it to the store when that is
elsewhere (``STORAGE_URL``: the dataset was fetched from there too), and
registers it in the transaction that marks the job ``succeeded``.

A job of several ``processes`` runs one of these a process under torchrun
(``app.training.launch``), as one DDP run: rank 0 alone writes progress, validates,
writes the checkpoint and registers it; any rank records the failure it meets.

It stops by itself when the job is cancelled or stops being its worker's (seen at
the next progress write), and exits at once when its worker dies: its stdin is a
pipe from the worker, which the kernel closes whatever way the worker ends.

A database that refuses or drops its writes is waited out for up to
``JOB_HEARTBEAT_TIMEOUT_S`` (``app.store.db.retrying``); past that the job fails
with the database named as the reason, recorded here or, when the database is
still away, by the worker (exit code ``EXIT_DATABASE``).
"""

import argparse
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from app.errors import AppError
from app.logs import configure_logging
from app.settings import Settings, load_settings
from app.store.db import (
    Database,
    DatabaseUnreachable,
    DatasetRecord,
    ModelRecord,
    retrying,
)
from app.training import jobs
from model import ModelError

log = logging.getLogger("app.training.runner")

PROGRESS_INTERVAL_S = 0.5
EXIT_STOPPED = 3  # cancel requested, or the job is no longer this worker's
EXIT_ORPHANED = 4  # the worker went away
EXIT_DATABASE = 5  # the database stayed unreachable: the worker records the failure


class JobStopped(Exception):
    """The job was cancelled or taken from this worker while it ran."""


class JobError(Exception):
    """The job cannot run; the message is the reason its record shows."""


def job_threads(settings: Settings) -> int:
    """Torch CPU threads for one job: ``JOB_THREADS``, or half the cores available,
    since the API server (embedded mode) shares the machine."""
    return settings.job_threads or max(1, len(os.sched_getaffinity(0)) // 2)


class ProgressReporter:
    """The training loop's progress callback for one job."""

    def __init__(self, db: Database, job_id: str, worker_id: str, *, outage_s: float):
        """``outage_s``: how long a write waits out an unreachable database."""
        self.db, self.job_id, self.worker_id = db, job_id, worker_id
        self.outage_s = outage_s
        self.epochs: list[dict[str, Any]] = []
        self.last_write = 0.0

    def __call__(self, p) -> None:  # a model.training.loop.TrainProgress
        progress = {
            "epoch": p.epoch,
            "epochs": p.epochs,
            "step": p.step,
            "total_steps": p.total_steps,
            "loss": p.loss,
            "eta_s": p.eta_s,
        }
        now = time.monotonic()
        epochs = None
        if p.event == "epoch":
            self.epochs.append({"epoch": p.epoch, "losses": p.losses, **(p.metrics or {})})
            epochs = self.epochs
        elif now - self.last_write < PROGRESS_INTERVAL_S and p.step != p.total_steps:
            return
        going = retrying(
            lambda: jobs.record_progress(self.db, self.job_id, self.worker_id, progress, epochs),
            within_s=self.outage_s,
            what="writing the job's progress",
        )
        self.last_write = now
        if not going:
            raise JobStopped(f"job {self.job_id} was cancelled or is no longer this worker's")


def run_job(db: Database, settings: Settings, job_id: str, worker_id: str) -> None:
    """Train the job's model and register it; raises on failure (nothing registered)."""
    # here, not at the top: the worker imports this module for its constants and
    # must not pay for torch
    from model import TrainConfig, TrainingPlan, process_capacity, resolve_device, run_training

    job = jobs.get_job(db, job_id)
    config = job.config
    processes = config.get("processes", 1)
    capacity = process_capacity(resolve_device(settings.device))
    if processes > capacity:
        raise JobError(
            f"the job asks for {processes} processes; this worker runs at most {capacity} "
            "(one a GPU when training on CUDA, one a core on the CPU)"
        )
    with db.session() as session:
        dataset = session.get(DatasetRecord, job.dataset_id)
    if dataset is None:
        raise JobError(f"dataset {job.dataset_id} no longer exists")
    out = db.objects.local(jobs.checkpoint_path(job_id))
    out.parent.mkdir(parents=True, exist_ok=True)
    model_id = jobs.model_id_for(job_id)
    plan = TrainingPlan(
        dataset=db.objects.fetch_folder(dataset.path),
        out=out,
        config=TrainConfig(
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            seed=config["seed"],
        ),
        base_model=jobs.resolve_base_model(db, config["base_model"]),
        image_size=config.get("image_size"),
        val_fraction=config["val_fraction"],
        device=settings.device,
        runtime=settings.runtime,
        save_resume_state=False,
        dataset_id=dataset.id,
        extra={"job_id": job_id, "model_id": model_id, "base_model": config["base_model"]},
    )
    outage_s = settings.job_heartbeat_timeout_s
    reporter = ProgressReporter(db, job_id, worker_id, outage_s=outage_s)
    outcome = run_training(plan, progress=reporter, announce=log.info, show_validation=False)
    if outcome is None:
        return  # a rank other than 0 of a job of several processes: rank 0 registers
    db.objects.put(jobs.checkpoint_path(job_id))  # whole in the store before its row
    model = ModelRecord(
        id=model_id,
        architecture=outcome.metadata["architecture"],
        path=jobs.checkpoint_path(job_id),
        classes=outcome.metadata["classes"],
        metrics=jobs.finite(outcome.metrics),
        base_model=config["base_model"],
        job_id=job_id,
        dataset_id=dataset.id,
    )
    completed = retrying(
        lambda: jobs.complete_job(db, job_id, worker_id, model),
        within_s=outage_s,
        what="registering the model",
    )
    if not completed:
        raise JobStopped(f"job {job_id} was cancelled or taken over before it was registered")
    log.info("job %s succeeded: model %s", job_id, model_id)


def when_parent_exits(action: Callable[[], object]) -> None:
    """Call ``action`` (on a thread of its own) once stdin, a pipe from the worker,
    reaches end of file: the kernel closes it whatever way the worker ends."""
    if not stat.S_ISFIFO(os.fstat(0).st_mode):
        return  # started by hand

    def watch() -> None:
        while os.read(0, 4096):
            pass
        action()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_now() -> None:
    log.error("the worker went away; stopping")
    os._exit(EXIT_ORPHANED)


def discard_checkpoint(db: Database, job_id: str) -> None:
    """Remove the job's checkpoint: rank 0's to write, so its to remove (another
    rank failing late must not remove what rank 0 registered)."""
    from model import is_main_rank

    if is_main_rank():
        jobs.remove_checkpoint(db, job_id)


def describe(error: BaseException) -> str:
    """The reason a failed job shows: the message of the errors raised on purpose
    (bad dataset, unavailable weights, diverged loss), the type too for the others."""
    if isinstance(error, JobError | ModelError | AppError | DatabaseUnreachable):
        return str(error)
    return f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.training.runner", description=__doc__)
    parser.add_argument("job_id")
    parser.add_argument("worker_id")
    args = parser.parse_args(argv)
    when_parent_exits(exit_now)
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    import torch

    torch.set_num_threads(job_threads(settings))
    db = Database.from_settings(settings, background=True)
    try:
        run_job(db, settings, args.job_id, args.worker_id)
        return 0
    except JobStopped as e:
        log.info("%s; stopping", e)
        discard_checkpoint(db, args.job_id)
        return EXIT_STOPPED
    except Exception as e:
        log.exception("job %s failed", args.job_id)
        discard_checkpoint(db, args.job_id)
        reason = describe(e)
        try:
            retrying(
                lambda: jobs.finish_job(db, args.job_id, args.worker_id, "failed", reason),
                within_s=settings.job_heartbeat_timeout_s,
                what="recording the failure",
            )
        except DatabaseUnreachable as unreachable:
            log.error("%s; the worker records the failure", unreachable)
            return EXIT_DATABASE
        return 1
    finally:
        db.dispose()


if __name__ == "__main__":
    sys.exit(main())
