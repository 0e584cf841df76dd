"""Start-up and shutdown of one app: the model loads and warms up in the
background (so ``/healthz`` answers and ``/readyz`` says 503 meanwhile); on
shutdown the queue finishes its work."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from app.service import Service


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    starting = asyncio.create_task(service.start(), name="maskrcnn-start")
    try:
        yield
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await service.stop()
