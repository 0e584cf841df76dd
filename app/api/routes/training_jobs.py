"""``/v1/training-jobs``: queue, list, follow and cancel training jobs.
Admin token required. Jobs run in a worker (``app.training.worker``), possibly on
another replica: everything here reads and writes the shared job store, and the
event stream polls it."""

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, NamedTuple

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.api.auth import AdminToken
from app.api.deps import DatabaseDep, ServiceDep, SettingsDep, within_database_timeout
from app.api.schemas import (
    JobState,
    TrainingJobCreate,
    TrainingJobPublic,
    TrainingJobsPublic,
    error_responses,
)
from app.inputs.decoding import sniff_format
from app.serving.service import Service, State
from app.store.db import FINAL_STATES, Database, TrainingJobRecord
from app.training import jobs
from app.training.datasets import get_dataset, validation_image
from app.training.launch import process_limit

router = APIRouter(
    prefix="/v1/training-jobs",
    tags=["training"],
    dependencies=[AdminToken],
    responses=error_responses(401, 403, 503),
)

POLL_S = 0.5  # how often an event stream looks at the job
KEEPALIVE_S = 15.0  # a comment line on a quiet stream, so proxies keep it open
RETRY_MS = 2000  # how long an EventSource waits before it reconnects


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
@within_database_timeout
def create_training_job(
    body: TrainingJobCreate, db: DatabaseDep, settings: SettingsDep
) -> TrainingJobPublic:
    """Queue a training job on an uploaded dataset; a worker picks it up.

    400 `unknown_dataset` or `unknown_model` when `dataset_id` or `base_model`
    names nothing; 422 for values out of range, `too_many_processes` past what the
    workers can run (`JOB_MAX_PROCESSES`); 429 `too_many_jobs` when
    `MAX_QUEUED_JOBS` wait already."""
    config = body.model_dump(exclude={"dataset_id"})
    job = jobs.create_job(
        db,
        body.dataset_id,
        config,
        max_queued=settings.max_queued_jobs,
        max_processes=process_limit(settings),
    )
    return job_public(job)


@router.get("", name="list_training_jobs", response_model=TrainingJobsPublic)
@within_database_timeout
def list_training_jobs(
    db: DatabaseDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TrainingJobsPublic:
    """Training jobs, newest first, a page at a time (`offset`, `limit`)."""
    found, total = jobs.list_jobs(db, state=state, limit=limit, offset=offset)
    return TrainingJobsPublic(data=[job_public(job) for job in found], count=total)


@router.get(
    "/{job_id}",
    name="get_training_job",
    response_model=TrainingJobPublic,
    responses=error_responses(404),
)
@within_database_timeout
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
@within_database_timeout
def cancel_training_job(job_id: str, db: DatabaseDep) -> TrainingJobPublic:
    """A queued job is `cancelled` at once; a running one gets `cancel_requested` and
    its worker stops it (then `cancelled`); a finished one is a 409."""
    return job_public(jobs.request_cancel(db, job_id))


@router.get(
    "/{job_id}/validation-image",
    name="get_training_job_validation_image",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "the image file as uploaded (JPEG, PNG, WebP or BMP; Content-Type "
            "says which)",
        },
        **error_responses(404),
    },
)
async def get_training_job_validation_image(
    job_id: str,
    db: DatabaseDep,
    index: Annotated[int, Query(ge=0, description="which image (wraps around)")] = 0,
) -> Response:
    """An image of the job's validation split (of its whole dataset when the job
    holds none out): what to try a trained model on. 404 when the job or its
    dataset is gone."""
    job = await db.run(jobs.get_job, db, job_id)
    dataset = await db.run(get_dataset, db, job.dataset_id)
    config = job.config
    folder = await asyncio.to_thread(db.objects.fetch_folder, dataset.path)
    data = await asyncio.to_thread(
        validation_image, folder, config["val_fraction"], config["seed"], index
    )
    found = sniff_format(data)  # one of the four: every image was checked at upload
    return Response(
        data, media_type=f"image/{found.lower()}" if found else "application/octet-stream"
    )


@router.get(
    "/{job_id}/events",
    name="stream_training_job_events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-sent events: `state`, `progress`, `epoch`, then `done`",
        },
        204: {"description": "`Last-Event-ID` is the id of the job's `done`: nothing is left"},
        **error_responses(404),
    },
)
async def stream_training_job_events(
    job_id: str,
    request: Request,
    db: DatabaseDep,
    service: ServiceDep,
    last_event_id: Annotated[
        str | None, Header(description="the `id` of the last event had: resume after it")
    ] = None,
    last_event_id_query: Annotated[
        str | None,
        Query(alias="last_event_id", description="as the header, for clients that cannot set it"),
    ] = None,
) -> Response:
    """Follow a job as server-sent events (`text/event-stream`).

    `state` (`{state, error, model_id}`) first and on every change; `progress`
    (as in the job) when its step moves; `epoch` (one entry of `metrics`) for each
    finished epoch, the earlier ones first; at a final state `done` (the whole
    job), and the stream ends. Comment lines keep a quiet stream open.

    Every event's `id` says what the client has had of the job, so a reconnect
    with `Last-Event-ID` (or `?last_event_id=`; the header wins), to any replica,
    gets only what it missed; an id that is not one of this job's replays all."""
    job = await db.run(jobs.get_job, db, job_id)  # a 404 before streaming
    had = Cursor.parse(last_event_id or last_event_id_query, job_public(job))
    if had.stage == DONE:  # 204 tells an EventSource to stop reconnecting
        return Response(status_code=204)
    events = job_events(job_id, job, had, request, db, service)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def job_events(
    job_id: str,
    job: TrainingJobRecord,
    had: "Cursor",
    request: Request,
    db: Database,
    service: Service,
) -> AsyncIterator[bytes]:
    quiet_since = time.monotonic()
    yield b"retry: %d\n\n" % RETRY_MS
    while True:
        current = job_public(job)
        for name, data, after in changes(had, current):
            yield sse(name, data, after)
            had, quiet_since = after, time.monotonic()
        if current.state in FINAL_STATES:
            return
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        # a draining server ends its streams: the client reconnects to another replica
        if service.state in (State.DRAINING, State.STOPPED) or await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)
        job = await db.run(jobs.get_job, db, job_id)


STAGES = {"queued": 1, "running": 2}  # 0: no state sent yet; 3: a final state
DONE = 4  # the stage after `done`
CURSOR = re.compile(r"([0-9]{1,2})\.([0-9]{1,12})\.([0-9]{1,9})")


class Cursor(NamedTuple):
    """What a client of the event stream has had of one job, and each event's `id`
    (``<stage>.<step>.<epochs>``). It is made of what the job store holds, never of
    what one server remembers, so the replica a client reconnects to knows where to
    go on; each event raises one part and lowers none, so ids only increase."""

    stage: int = 0  # of the last `state` sent (STAGES; 3 final), DONE after `done`
    step: int = 0  # of the last `progress` sent
    epochs: int = 0  # `epoch` events sent: the first entries of `metrics`

    def __str__(self) -> str:
        return f"{self.stage}.{self.step}.{self.epochs}"

    @classmethod
    def parse(cls, text: str | None, now: TrainingJobPublic) -> "Cursor":
        """The cursor ``text`` names; the start (a full replay) when it is missing,
        garbled or could not have come from this job as it is ``now`` (ahead of it,
        or a final state without all that comes before it): replaying too much is
        safe, skipping what the client never had is not."""
        match = CURSOR.fullmatch(text or "")
        if match is None:
            return cls()
        had = cls(*map(int, match.groups()))
        final = now.state in FINAL_STATES
        top = DONE if final else STAGES[now.state]
        complete = (had.step, had.epochs) == (now.progress.step, len(now.metrics))
        if had.stage > top or had.step > now.progress.step or had.epochs > len(now.metrics):
            return cls()
        return had if had.stage < 3 or complete else cls()


def changes(had: Cursor, now: TrainingJobPublic) -> list[tuple[str, object, Cursor]]:
    """The events that take a client from what it ``had`` to ``now``, each with
    what the client has after it."""
    events: list[tuple[str, object, Cursor]] = []
    final = now.state in FINAL_STATES
    state = {"state": now.state, "error": now.error, "model_id": now.model_id}
    # a new non-final state comes first (``running``, then its progress); a final
    # one after the last progress and epoch
    if not final and STAGES[now.state] > had.stage:
        had = had._replace(stage=STAGES[now.state])
        events.append(("state", state, had))
    if now.progress.step > had.step:
        had = had._replace(step=now.progress.step)
        events.append(("progress", now.progress.model_dump(), had))
    for entry in now.metrics[had.epochs :]:
        had = had._replace(epochs=had.epochs + 1)
        events.append(("epoch", entry.model_dump(), had))
    if final and had.stage < 3:
        had = had._replace(stage=3)
        events.append(("state", state, had))
    if final and had.stage < DONE:
        had = had._replace(stage=DONE)
        events.append(("done", now.model_dump(mode="json"), had))
    return events


def sse(event: str, data: object, had: Cursor) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        str(had).encode(),
        event.encode(),
        orjson.dumps(data),
    )
