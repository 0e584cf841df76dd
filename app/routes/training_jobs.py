"""``/v1/training-jobs`` (SPEC §6): queue, list, follow and cancel training jobs.
Admin token required (SPEC §9). Jobs run in a worker (``app.worker``), possibly on
another replica: everything here reads and writes the shared job store, and the
event stream polls it."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app import jobs
from app.auth import AdminToken
from app.db import FINAL_STATES, Database, TrainingJobRecord
from app.dependencies import DatabaseDep, ServiceDep
from app.schemas import (
    JobState,
    TrainingJobCreate,
    TrainingJobPublic,
    TrainingJobsPublic,
    error_responses,
)
from app.service import Service

router = APIRouter(
    prefix="/v1/training-jobs",
    tags=["training"],
    dependencies=[AdminToken],
    responses=error_responses(401, 403),
)

POLL_S = 0.5  # how often an event stream looks at the job
KEEPALIVE_S = 15.0  # a comment line on a quiet stream, so proxies keep it open


def job_public(job: TrainingJobRecord) -> TrainingJobPublic:
    return TrainingJobPublic(
        id=job.id,
        state=job.state,
        dataset_id=job.dataset_id,
        config=job.config,
        progress={"epochs": job.config.get("epochs", 0), **(job.progress or {})},
        metrics=job.metrics or [],
        model_id=job.model_id,
        error=job.error,
        cancel_requested=job.cancel_requested,
        worker_id=job.worker_id,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.post(
    "",
    name="create_training_job",
    status_code=202,
    response_model=TrainingJobPublic,
    responses=error_responses(400, 422),
)
def create_training_job(body: TrainingJobCreate, db: DatabaseDep) -> TrainingJobPublic:
    """Queue a training job on an uploaded dataset; a worker picks it up.

    400 `unknown_dataset` or `unknown_model` when `dataset_id` or `base_model`
    names nothing; 422 for values out of range."""
    config = body.model_dump(exclude={"dataset_id"})
    return job_public(jobs.create_job(db, body.dataset_id, config))


@router.get("", name="list_training_jobs", response_model=TrainingJobsPublic)
def list_training_jobs(
    db: DatabaseDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TrainingJobsPublic:
    """Training jobs, newest first."""
    found = [job_public(job) for job in jobs.list_jobs(db, state=state, limit=limit)]
    return TrainingJobsPublic(data=found, count=len(found))


@router.get(
    "/{job_id}",
    name="get_training_job",
    response_model=TrainingJobPublic,
    responses=error_responses(404),
)
def get_training_job(job_id: str, db: DatabaseDep) -> TrainingJobPublic:
    """One job: state, progress, per-epoch metrics, the model it produced or its error."""
    return job_public(jobs.get_job(db, job_id))


@router.post(
    "/{job_id}/cancel",
    name="cancel_training_job",
    status_code=202,
    response_model=TrainingJobPublic,
    responses=error_responses(404, 409),
)
def cancel_training_job(job_id: str, db: DatabaseDep) -> TrainingJobPublic:
    """A queued job is `cancelled` at once; a running one gets `cancel_requested` and
    its worker stops it (then `cancelled`); a finished one is a 409."""
    return job_public(jobs.request_cancel(db, job_id))


@router.get(
    "/{job_id}/events",
    name="stream_training_job_events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-sent events: `state`, `progress`, `epoch`, then `done`",
        },
        **error_responses(404),
    },
)
async def stream_training_job_events(
    job_id: str, request: Request, db: DatabaseDep, service: ServiceDep
) -> StreamingResponse:
    """Follow a job as server-sent events (`text/event-stream`).

    `state` (`{state, error, model_id}`) first and on every change; `progress`
    (as in the job) when it moves; `epoch` (one entry of `metrics`) for each
    finished epoch, the earlier ones first; at a final state `done` (the whole
    job), and the stream ends. Comment lines keep a quiet stream open."""
    job = await asyncio.to_thread(jobs.get_job, db, job_id)  # a 404 before streaming
    events = job_events(job_id, job, request, db, service)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def job_events(
    job_id: str, job: TrainingJobRecord, request: Request, db: Database, service: Service
) -> AsyncIterator[bytes]:
    sent: TrainingJobPublic | None = None
    number = 0
    quiet_since = time.monotonic()
    yield b"retry: 2000\n\n"
    while True:
        current = job_public(job)
        for name, data in changes(sent, current):
            number += 1
            yield sse(name, data, number)
            quiet_since = time.monotonic()
        sent = current
        if current.state in FINAL_STATES:
            return
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        # a draining server ends its streams: the client reconnects to another replica
        if service.state in ("draining", "stopped") or await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)
        job = await asyncio.to_thread(jobs.get_job, db, job_id)


def changes(before: TrainingJobPublic | None, now: TrainingJobPublic) -> list[tuple[str, object]]:
    """The events that take a client from ``before`` (``None``: nothing sent yet)
    to ``now``."""
    events: list[tuple[str, object]] = []
    if now.progress.step and (before is None or before.progress != now.progress):
        events.append(("progress", now.progress.model_dump()))
    done = len(before.metrics) if before else 0
    events.extend(("epoch", entry.model_dump()) for entry in now.metrics[done:])
    if before is None or (before.state, before.error) != (now.state, now.error):
        state = {"state": now.state, "error": now.error, "model_id": now.model_id}
        # a new non-final state comes first (``running``, then its progress); a final
        # one after the last progress and epoch
        events.insert(len(events) if now.state in FINAL_STATES else 0, ("state", state))
    if now.state in FINAL_STATES:
        events.append(("done", now.model_dump(mode="json")))
    return events


def sse(event: str, data: object, number: int) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (number, event.encode(), orjson.dumps(data))
