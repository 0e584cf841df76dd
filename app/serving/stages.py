"""Running one batch on the predictor, in the two stages the queue overlaps:
``forward`` (network and device work) in one thread, ``finish`` (mask
string encoding) in another. A device out-of-memory error in ``forward`` splits
the batch in halves and retries; only an image that fails alone gets an error.

Every item names the predictor it runs on (the queue pins it when the request is
admitted), so one batch holds one model's items and each result says which model
produced it, even while the served model is being swapped."""

import asyncio
import logging
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from app.errors import UnavailableError
from app.serving.device import is_out_of_memory, release_device_memory
from app.serving.metrics import Metrics
from app.serving.predictors import ServedPredictor
from model import PredictOptions

if TYPE_CHECKING:
    from model import ImageResult, ModelInfo

log = logging.getLogger(__name__)


@dataclass
class ItemResult:
    """One image's result, the model that produced it, and where its time went
    (seconds)."""

    result: "ImageResult"
    model: "ModelInfo"
    queue_s: float
    inference_s: float
    postprocess_s: float


@dataclass(eq=False)
class WorkItem:
    """One queued image; ``future`` gets its ``ItemResult`` or its error.
    ``options`` were resolved against ``predictor.info``, the model it runs on."""

    image: torch.Tensor
    options: PredictOptions
    predictor: ServedPredictor
    bucket: Hashable
    deadline: float
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    dispatched_at: float = 0.0


@dataclass
class Forwarded:
    """Items after ``forward``: their pending batch, or the error they fail with."""

    items: list[WorkItem]
    predictor: ServedPredictor
    pending: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


def fail(item: WorkItem, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


class BatchRunner:
    """Runs batches whose items share one predictor (``items[0].predictor``), up to
    ``concurrency`` forwards and finishes at once (one per model process)."""

    def __init__(self, metrics: Metrics, concurrency: int = 1):
        self.metrics = metrics
        self._forward_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="maskrcnn-forward")
        self._finish_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="maskrcnn-finish")

    async def forward(self, items: list[WorkItem]) -> list[Forwarded]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._forward_pool, self._forward, items)
        except BaseException as e:  # the executor itself failed
            return [Forwarded(items, items[0].predictor, error=e)]

    def _forward(self, items: list[WorkItem]) -> list[Forwarded]:
        """In the forward thread: one forward, or halves of it after an out-of-memory error."""
        predictor = items[0].predictor
        start = time.perf_counter()
        try:
            pending = predictor.forward(
                [item.image for item in items], [item.options for item in items]
            )
        except Exception as e:
            if not is_out_of_memory(e):
                seconds = time.perf_counter() - start
                return [Forwarded(items, predictor, error=e, seconds=seconds)]
            release_device_memory()
            self.metrics.oom_retries.inc()
            if len(items) == 1:
                log.error("out of memory on a single image of size %s", items[0].bucket)
                error = UnavailableError(
                    "the image does not fit in the model device's memory", code="out_of_memory"
                )
                return [Forwarded(items, predictor, error=error)]
            log.warning("out of memory on a batch of %d; retrying in halves", len(items))
            half = len(items) // 2
            return self._forward(items[:half]) + self._forward(items[half:])
        seconds = time.perf_counter() - start
        self.metrics.forwards.inc()
        self.metrics.images_forwarded.inc(len(items))
        self.metrics.batch_size.observe(len(items))
        self.metrics.inference_seconds.observe(seconds)
        return [Forwarded(items, predictor, pending, seconds=seconds)]

    async def finish(self, group: Forwarded) -> float | None:
        """Answer the group's items; returns the finish seconds (``None`` on failure)."""
        if group.error is not None:
            if not isinstance(group.error, UnavailableError):
                log.error("batch of %d failed: %r", len(group.items), group.error)
            for item in group.items:
                fail(item, group.error)
            return None
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._finish_pool, group.predictor.finish, group.pending
            )
        except Exception as e:
            log.exception("postprocessing a batch of %d failed", len(group.items))
            for item in group.items:
                fail(item, e)
            return None
        seconds = time.perf_counter() - start
        self.metrics.postprocess_seconds.observe(seconds)
        model = group.predictor.info
        for item, result in zip(group.items, results, strict=True):
            if isinstance(result, BaseException):  # one the model process could not decode
                fail(item, result)
            elif not item.future.done():
                queue_s = item.dispatched_at - item.enqueued_at
                item.future.set_result(ItemResult(result, model, queue_s, group.seconds, seconds))
        return seconds

    def shutdown(self) -> None:
        self._forward_pool.shutdown(wait=True)
        self._finish_pool.shutdown(wait=True)
