"""Running one batch on the predictor, in the two stages the queue overlaps:
``forward`` (network and device work) in one worker thread, ``finish`` (mask
string encoding) in another. A device out-of-memory error in ``forward`` splits
the batch in halves and retries; only an image that fails alone gets an error."""

import asyncio
import logging
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from app.errors import UnavailableError
from app.metrics import Metrics
from model.options import PredictOptions

if TYPE_CHECKING:
    from model.predictor import ImageResult

log = logging.getLogger(__name__)


class BatchPredictor(Protocol):
    """The two stages of ``model.predictor.Predictor`` the queue needs."""

    def forward(self, images: list[torch.Tensor], options: list[PredictOptions]) -> Any: ...

    def finish(self, pending: Any) -> "list[ImageResult]": ...


@dataclass
class ItemResult:
    """One image's result and where its time went (seconds)."""

    result: "ImageResult"
    queue_s: float
    inference_s: float
    postprocess_s: float


@dataclass(eq=False)
class WorkItem:
    """One queued image; ``future`` gets its ``ItemResult`` or its error."""

    image: torch.Tensor
    options: PredictOptions
    bucket: Hashable
    deadline: float
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    dispatched_at: float = 0.0


@dataclass
class Forwarded:
    """Items after ``forward``: their pending batch, or the error they fail with."""

    items: list[WorkItem]
    pending: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


def fail(item: WorkItem, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchRunner:
    def __init__(self, predictor: BatchPredictor, metrics: Metrics):
        self.predictor = predictor
        self.metrics = metrics
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="maskrcnn-forward")
        self._finish_pool = ThreadPoolExecutor(1, thread_name_prefix="maskrcnn-finish")

    async def forward(self, items: list[WorkItem]) -> list[Forwarded]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._forward_pool, self._forward, items)
        except BaseException as e:  # the executor itself failed
            return [Forwarded(items, error=e)]

    def _forward(self, items: list[WorkItem]) -> list[Forwarded]:
        """Worker thread: one forward, or halves of it after an out-of-memory error."""
        start = time.perf_counter()
        try:
            pending = self.predictor.forward(
                [item.image for item in items], [item.options for item in items]
            )
        except Exception as e:
            if not is_out_of_memory(e):
                return [Forwarded(items, error=e, seconds=time.perf_counter() - start)]
            release_device_memory()
            self.metrics.oom_retries.inc()
            if len(items) == 1:
                log.error("out of memory on a single image of size %s", items[0].bucket)
                error = UnavailableError(
                    "the image does not fit in the model device's memory", code="out_of_memory"
                )
                return [Forwarded(items, error=error)]
            log.warning("out of memory on a batch of %d; retrying in halves", len(items))
            half = len(items) // 2
            return self._forward(items[:half]) + self._forward(items[half:])
        seconds = time.perf_counter() - start
        self.metrics.forwards.inc()
        self.metrics.images_forwarded.inc(len(items))
        self.metrics.batch_size.observe(len(items))
        self.metrics.inference_seconds.observe(seconds)
        return [Forwarded(items, pending, seconds=seconds)]

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
                self._finish_pool, self.predictor.finish, group.pending
            )
        except Exception as e:
            log.exception("postprocessing a batch of %d failed", len(group.items))
            for item in group.items:
                fail(item, e)
            return None
        seconds = time.perf_counter() - start
        self.metrics.postprocess_seconds.observe(seconds)
        for item, result in zip(group.items, results, strict=True):
            if not item.future.done():
                queue_s = item.dispatched_at - item.enqueued_at
                item.future.set_result(ItemResult(result, queue_s, group.seconds, seconds))
        return seconds

    def shutdown(self) -> None:
        self._forward_pool.shutdown(wait=True)
        self._finish_pool.shutdown(wait=True)
