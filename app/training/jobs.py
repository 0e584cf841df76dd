"""The training-job store: every state change a job goes through, as one
short transaction each, so API servers, workers and training processes on any
replica can share one database.

Life cycle: ``queued`` → ``running`` (claimed by exactly one worker) → one final
state: ``succeeded`` (with the model it registered), ``failed`` (with a reason) or
``cancelled``. Every transition out of ``running`` is a conditional update on
``state = 'running' AND worker_id = <owner>``, so a worker that was declared dead
(no heartbeat) can never overwrite what happened meanwhile, and a job ends in
exactly one final state.
"""

import contextlib
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from app.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    QuotaError,
    UnprocessableError,
)
from app.store.db import (
    FINAL_STATES,
    Database,
    DatasetRecord,
    ModelRecord,
    TrainingJobRecord,
    new_id,
    utcnow,
)
from app.store.objects import StorageError
from model import BASE_MODELS

MODELS_DIR = "models"  # checkpoints of trained versions, under DATA_DIR


def heartbeat_clock(db: Database) -> Any:
    """What ``heartbeat_at`` is written with and judged against: the database's
    clock on PostgreSQL, shared by every replica (their own clocks may disagree by
    more than the heartbeat timeout); SQLite serves one machine, so its clock."""
    return func.now() if db.is_postgresql else utcnow()


def model_id_for(job_id: str) -> str:
    """The id the model a job produces gets: derived from the job's, so whoever
    finds the job dead also knows which checkpoint file to clean up."""
    return "model-" + job_id.removeprefix("job-")


def checkpoint_path(job_id: str) -> str:
    """Where a job's checkpoint goes, relative to ``DATA_DIR``."""
    return f"{MODELS_DIR}/{model_id_for(job_id)}.safetensors"


def remove_checkpoint(db: Database, job_id: str) -> None:
    """Delete what a job that did not succeed may have left: its checkpoint (written,
    never registered, here and in the store) and the temporary files of an
    interrupted write."""
    key = checkpoint_path(job_id)
    final = db.objects.local(key)
    for partial in final.parent.glob(f".{final.name}.tmp-*"):
        partial.unlink(missing_ok=True)
    with contextlib.suppress(StorageError):  # logged; the object stays, named by no row
        db.objects.delete(key)


# -- the API's side ------------------------------------------------------------


def create_job(
    db: Database,
    dataset_id: str,
    config: dict[str, Any],
    *,
    max_queued: int,
    max_processes: int | None = None,
) -> TrainingJobRecord:
    """Queue a job after checking that its dataset and base model exist (400 if not),
    that it asks for at most ``max_processes`` processes (422 if not) and that fewer
    than ``max_queued`` jobs wait (429 if not; a few more may pass when requests race)."""
    processes = config.get("processes", 1)
    if max_processes is not None and processes > max_processes:
        raise UnprocessableError(
            f"processes: {processes} asked, at most {max_processes} here (a worker runs one "
            "a GPU when training on CUDA, one a core on the CPU; MASKRCNN_JOB_MAX_PROCESSES)",
            code="too_many_processes",
        )
    with db.session() as session:
        queued = session.scalar(select(func.count()).where(TrainingJobRecord.state == "queued"))
        if queued >= max_queued:
            raise QuotaError(
                f"{queued} training jobs are queued already; at most {max_queued} "
                "(MAX_QUEUED_JOBS): wait for some to start, or cancel some",
                code="too_many_jobs",
            )
        if session.get(DatasetRecord, dataset_id) is None:
            raise BadRequestError(
                f"no dataset with id {dataset_id!r}; upload one with POST /v1/datasets",
                code="unknown_dataset",
            )
        base = config["base_model"]
        # locked as deleting the model locks it: one of the two waits for the other
        if base not in BASE_MODELS and session.get(ModelRecord, base, with_for_update=True) is None:
            raise BadRequestError(
                f"unknown base_model {base!r}: expected {', '.join(BASE_MODELS)} "
                "or a model id from GET /v1/models",
                code="unknown_model",
            )
        job = TrainingJobRecord(
            id=new_id("job"), state="queued", dataset_id=dataset_id, config=config, progress={}
        )
        session.add(job)
    return job


def get_job(db: Database, job_id: str) -> TrainingJobRecord:
    with db.session() as session:
        job = session.get(TrainingJobRecord, job_id)
    if job is None:
        raise NotFoundError(f"no training job with id {job_id!r}")
    return job


def list_jobs(
    db: Database, *, state: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[TrainingJobRecord], int]:
    """One page, newest first, and how many jobs (in ``state``) there are in all."""
    query = select(TrainingJobRecord)
    if state is not None:
        query = query.where(TrainingJobRecord.state == state)
    newest = query.order_by(TrainingJobRecord.created_at.desc(), TrainingJobRecord.id.desc())
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        return list(session.scalars(newest.offset(offset).limit(limit))), total


def request_cancel(db: Database, job_id: str) -> TrainingJobRecord:
    """A queued job is cancelled at once; a running one is flagged, and its worker
    stops the training process; a finished one is a 409."""
    now = utcnow()
    with db.session() as session:
        cancelled = session.execute(
            update(TrainingJobRecord)
            .where(TrainingJobRecord.id == job_id, TrainingJobRecord.state == "queued")
            .values(state="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
        ).rowcount
        if not cancelled:
            session.execute(
                update(TrainingJobRecord)
                .where(TrainingJobRecord.id == job_id, TrainingJobRecord.state == "running")
                .values(cancel_requested=True, updated_at=now)
            )
    job = get_job(db, job_id)
    if not cancelled and job.state in FINAL_STATES:
        raise ConflictError(f"training job {job_id} already {job.state}; it cannot be cancelled")
    return job


# -- the worker's side ---------------------------------------------------------


def claim_next_job(db: Database, worker_id: str) -> TrainingJobRecord | None:
    """Take the oldest queued job for ``worker_id``, or ``None``; a job is claimed by
    exactly one worker however many race for it.

    PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED`` (racing workers take different
    rows without waiting). SQLite: one ``UPDATE … WHERE id = (SELECT …) AND state =
    'queued'``; SQLite runs one writer at a time, so the loser changes no row.
    """
    now = utcnow()
    claimed = {"state": "running", "worker_id": worker_id, "started_at": now}
    claimed |= {"heartbeat_at": heartbeat_clock(db), "updated_at": now}
    oldest = (
        select(TrainingJobRecord.id)
        .where(TrainingJobRecord.state == "queued")
        .order_by(TrainingJobRecord.created_at, TrainingJobRecord.id)
        .limit(1)
    )
    with db.session() as session:
        if db.is_postgresql:
            job_id = session.scalar(oldest.with_for_update(skip_locked=True))
            if job_id is None:
                return None
            session.execute(
                update(TrainingJobRecord).where(TrainingJobRecord.id == job_id).values(**claimed)
            )
        else:
            job_id = session.scalar(
                update(TrainingJobRecord)
                .where(
                    TrainingJobRecord.id == oldest.scalar_subquery(),
                    TrainingJobRecord.state == "queued",
                )
                .values(**claimed)
                .returning(TrainingJobRecord.id)
            )
            if job_id is None:
                return None
        return session.get(TrainingJobRecord, job_id, populate_existing=True)


def _owned(job_id: str, worker_id: str):
    """Rows of ``job_id`` while it runs under ``worker_id``."""
    return update(TrainingJobRecord).where(
        TrainingJobRecord.id == job_id,
        TrainingJobRecord.state == "running",
        TrainingJobRecord.worker_id == worker_id,
    )


def heartbeat(db: Database, job_id: str, worker_id: str) -> str:
    """Record that the worker is alive; answers what it should do with the job:
    ``"run"``, ``"cancel"`` (requested) or ``"drop"`` (no longer its job)."""
    with db.session() as session:
        beat = session.execute(
            _owned(job_id, worker_id)
            .values(heartbeat_at=heartbeat_clock(db))
            .returning(TrainingJobRecord.cancel_requested)
        ).first()
    if beat is None:
        return "drop"
    return "cancel" if beat[0] else "run"


def record_progress(
    db: Database,
    job_id: str,
    worker_id: str,
    progress: dict[str, Any],
    metrics: list[dict[str, Any]] | None = None,
) -> bool:
    """Store the job's progress (and, after an epoch, all its epochs' metrics: the
    training process is their only writer). ``False`` when the job should stop:
    cancel requested, or no longer running under ``worker_id``."""
    values: dict[str, Any] = {"progress": finite(progress), "updated_at": utcnow()}
    if metrics is not None:
        values["metrics"] = finite(metrics)
    with db.session() as session:
        row = session.execute(
            _owned(job_id, worker_id).values(**values).returning(TrainingJobRecord.cancel_requested)
        ).first()
    return row is not None and not row[0]


def finish_job(
    db: Database, job_id: str, worker_id: str, state: str, error: str | None = None
) -> bool:
    """``failed`` or ``cancelled``, if the job still runs under ``worker_id``."""
    assert state in ("failed", "cancelled"), state
    now = utcnow()
    with db.session() as session:
        result = session.execute(
            _owned(job_id, worker_id).values(
                state=state, error=error, finished_at=now, updated_at=now
            )
        )
    return bool(result.rowcount)


def complete_job(db: Database, job_id: str, worker_id: str, model: ModelRecord) -> bool:
    """Register ``model`` and mark the job ``succeeded`` with it, in one transaction,
    if the job still runs under ``worker_id`` and nobody asked to cancel it. True
    also when that transaction already happened (a retry after its answer was lost)."""
    now = utcnow()
    with db.session() as session:
        result = session.execute(
            _owned(job_id, worker_id)
            .where(TrainingJobRecord.cancel_requested.is_(False))
            .values(state="succeeded", model_id=model.id, finished_at=now, updated_at=now)
        )
        if not result.rowcount:
            job = session.get(TrainingJobRecord, job_id)
            return job is not None and job.state == "succeeded" and job.model_id == model.id
        session.add(model)
    return True


def fail_stale_jobs(db: Database, timeout_s: float) -> list[str]:
    """Mark ``failed`` every running job whose worker has not heartbeated for
    ``timeout_s`` (its process died or hangs), and remove any checkpoint it left.
    Returns their ids."""
    cutoff = heartbeat_clock(db) - timedelta(seconds=timeout_s)
    query = select(TrainingJobRecord.id, TrainingJobRecord.worker_id).where(
        TrainingJobRecord.state == "running", TrainingJobRecord.heartbeat_at < cutoff
    )
    with db.session() as session:
        stale = session.execute(query).all()
    failed = []
    for job_id, worker_id in stale:
        now = utcnow()
        with db.session() as session:
            result = session.execute(
                update(TrainingJobRecord)
                .where(
                    TrainingJobRecord.id == job_id,
                    TrainingJobRecord.state == "running",
                    TrainingJobRecord.heartbeat_at < cutoff,
                )
                .values(
                    state="failed",
                    error=f"worker {worker_id} stopped heartbeating "
                    f"(nothing for {timeout_s:g} s): it died or hangs",
                    finished_at=now,
                    updated_at=now,
                )
            )
        if result.rowcount:
            remove_checkpoint(db, job_id)
            failed.append(job_id)
    return failed


def resolve_base_model(db: Database, base_model: str) -> str:
    """What ``model.training.transfer.starting_network`` takes: a built-in name as is, a
    registry id as its checkpoint file."""
    if base_model in BASE_MODELS:
        return base_model
    with db.session() as session:
        record = session.get(ModelRecord, base_model)
    if record is None:
        raise NotFoundError(f"base model {base_model!r} is no longer in the registry")
    return str(db.objects.fetch_file(record.path))


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON columns refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def log_path(db: Database, job_id: str) -> Path:
    """The training process's output (kept for operators; its tail explains a crash)."""
    return db.data_dir / "jobs" / f"{job_id}.log"  # this worker's: never in the store
