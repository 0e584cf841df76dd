"""Start-up and shutdown of one app: stale staging entries of dataset uploads are
swept; the model loads and warms up in the background (so ``/healthz`` answers
and ``/readyz`` says 503 meanwhile); on shutdown the queue finishes its work. The
training worker (``app.training.worker``) runs in a thread meanwhile: claiming
jobs when ``RUN_WORKER`` is on, only failing the jobs of dead workers otherwise;
it stops before the database is closed."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from app.serving.service import Service, State
from app.training.datasets import sweep_staging
from app.training.worker import Worker


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    # what a crashed process left half-extracted or half-deleted (old entries only)
    await asyncio.to_thread(sweep_staging, service.settings.data_dir)
    worker = Worker(
        service.db,
        service.settings,
        claim_jobs=service.settings.run_worker,
        paused=lambda: service.state in (State.DRAINING, State.STOPPED),
    )
    worker.start()
    starting = asyncio.create_task(service.start(), name="maskrcnn-start")
    try:
        yield
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await asyncio.to_thread(worker.stop)
        await service.stop()
