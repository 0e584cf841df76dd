"""One request's trip through the queue: admission, decoding, waiting for the
results under the request's deadline while watching for the client going away."""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from app.api.schemas import SegmentOptions
from app.errors import (
    AppError,
    DeadlineExceededError,
    PayloadTooLargeError,
)
from app.inputs.decoding import Decoded, in_decoder_threads
from app.inputs.memory import DecodeMemory, RequestMemory
from app.serving.batching import Batcher, ItemResult
from app.serving.predictors import ServedPredictor
from app.settings import Settings

T = TypeVar("T")


class ClientDisconnectedError(AppError):
    """The client went away; nobody reads this answer (logged as 499)."""

    status_code, code = 499, "client_closed_request"


def request_deadline(request: Request, settings: Settings) -> float:
    """``time.monotonic()`` instant: arrival plus ``REQUEST_TIMEOUT_S``."""
    started = request.scope.get("state", {}).get("started_at", time.monotonic())
    return started + settings.request_timeout_s


def check_image_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise PayloadTooLargeError(
            f"{count} images in one request; at most {settings.max_images_per_request} "
            "(MAX_IMAGES_PER_REQUEST)",
            code="too_many_images",
        )


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (call only after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # a stray body event; never spin


async def await_or_abort(request: Request, work: Awaitable[T], deadline: float) -> T:
    """``work``'s result; cancels it and raises 504 at ``deadline``, or
    ``ClientDisconnectedError`` when the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        timeout = max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if watcher in done:
            raise ClientDisconnectedError("the client disconnected")
        raise DeadlineExceededError(
            f"no result within the request timeout (REQUEST_TIMEOUT_S="
            f"{request.app.state.service.settings.request_timeout_s:g})"
        )
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def run_images(
    request: Request,
    batcher: Batcher,
    settings: Settings,
    decode: Callable[[ServedPredictor, RequestMemory], Awaitable[Sequence[Decoded]]],
    options: Sequence[SegmentOptions],
) -> list[ItemResult]:
    """Admit ``len(options)`` images, decode them for the predictor that will run
    them (``decode``, their memory counted against the app's ``DecodeMemory``),
    queue them and wait.

    The ticket pins that predictor, the one served at admission, even if another
    is activated meanwhile, or the model the options name (``model``, see
    ``app.serving.ondemand``); the options are resolved against its classes. After
    a request of many pixels, freed memory is given back to the system."""
    budget: DecodeMemory = request.app.state.decode_memory
    memory = RequestMemory(budget)
    try:
        return await queue_images(request, batcher, settings, decode, options, memory)
    finally:
        if memory.close() and memory.pixels >= budget.trim_after_pixels and budget.trim:
            await in_decoder_threads(budget.trim)


async def queue_images(
    request: Request,
    batcher: Batcher,
    settings: Settings,
    decode: Callable,
    options: Sequence[SegmentOptions],
    memory: RequestMemory,
) -> list[ItemResult]:
    deadline = request_deadline(request, settings)
    model = options[0].model if options else None  # one model per request
    predictor = None
    if model is not None:  # loaded on first use, within the request's deadline
        on_demand = request.app.state.service.on_demand
        predictor = await await_or_abort(request, on_demand.get(model), deadline)
    with batcher.admit(len(options), predictor) as ticket:
        info = ticket.predictor.info
        resolved = [opts.for_model(info) for opts in options]
        # under the deadline too: an ended request's images are not decoded
        decoded = await await_or_abort(request, decode(ticket.predictor, memory), deadline)
        images = [d.image for d in decoded]
        resolved = [  # a reduced JPEG's results in its file's frame
            dataclasses.replace(opts, output_size=d.size) if d.size else opts
            for opts, d in zip(resolved, decoded, strict=True)
        ]
        if (geometry := ticket.predictor.input_geometry) is not None:
            for i, image in enumerate(images):  # before the queue: a batch never fails on it
                geometry.check(int(image.shape[-2]), int(image.shape[-1]), f"images[{i}]")
        try:
            return await await_or_abort(
                request, ticket.submit(images, resolved, deadline=deadline), deadline
            )
        except ClientDisconnectedError:
            ticket.close("disconnected")
            raise
        except DeadlineExceededError:
            ticket.close("deadline")
            raise


def encode_segmentation(results: list[ItemResult], started_at: float) -> dict[str, Any]:
    """The ``SegmentationPublic`` JSON body (dataclasses are serialised by orjson).

    ``model`` is the model that produced the results (one per request: a ticket
    pins it), not whichever is served by the time the answer is written."""
    info = results[0].model

    def slowest(stage: str) -> float:
        return round(max((getattr(r, stage) for r in results), default=0.0) * 1000, 3)

    return {
        "model": {"id": info.id, "architecture": info.architecture, "kind": info.kind},
        "results": [r.result for r in results],
        "timing_ms": {
            "queue": slowest("queue_s"),
            "inference": slowest("inference_s"),
            "postprocess": slowest("postprocess_s"),
            "total": round((time.monotonic() - started_at) * 1000, 3),
        },
    }
