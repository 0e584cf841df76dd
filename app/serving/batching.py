"""The batching queue: images from any number of requests in, batched
model calls out.

* Work items are images. A batch is sent when its size bucket holds
  ``max_batch_size`` images or when its oldest image has waited
  ``max_batch_delay_s``; images only share a batch with images of the same bucket
  (by default the same padded network input size), so a batch's padding never
  changes an image's detections.
* ``predictor.forward`` runs in one thread, ``predictor.finish`` in another:
  the next batch's forward overlaps the previous batch's postprocessing. A batch
  is taken from the queue only when a forward can start on it, so images that
  arrive meanwhile make the next batch fuller. ``concurrency`` forwards run at
  once (one per model process, ``app.serving.modelprocess.ModelPool``); at most
  ``max_pending`` batches per forward are in flight.
* Admission happens before any heavy work: ``admit(n)`` reserves ``n`` queue
  places or raises ``QueueFullError`` with a ``Retry-After`` estimated from the
  queue depth and the measured batch time.
* An image whose deadline passed, or whose request went away (its ``Ticket`` was
  closed), is dropped before the model.
* The served model can be swapped while work flows (``swap``): a request runs
  wholly on the predictor that was current when it was admitted (its options were
  resolved against that model's classes), so requests admitted before the swap
  finish on the old model and later ones run on the new one; batches never mix
  models. ``retire`` waits for the old model's last request and batch.
* Running a batch (threads, out-of-memory split-and-retry) is ``app.serving.stages``.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence

import torch

from app.errors import (
    DeadlineExceededError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
)
from app.serving.buckets import bucket_key_from, image_size_key
from app.serving.metrics import Metrics
from app.serving.predictors import ServedPredictor
from app.serving.stages import BatchRunner, ItemResult, WorkItem, fail
from app.serving.tickets import Ticket
from app.settings import Settings
from model import PredictOptions

__all__ = ["Batcher", "ItemResult", "Ticket"]

log = logging.getLogger(__name__)


class Batcher:
    """See the module docstring. Use from one event loop; ``start`` before ``admit``."""

    def __init__(
        self,
        predictor: ServedPredictor,
        *,
        max_batch_size: int = 8,
        max_batch_delay_s: float = 0.005,
        max_queue_size: int = 64,
        bucket_key: Callable[[torch.Tensor], Hashable] = image_size_key,
        metrics: Metrics | None = None,
        max_pending: int = 2,
        concurrency: int = 1,
    ):
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_size = max_queue_size
        self.bucket_key = bucket_key
        self.metrics = metrics or Metrics(max_batch_size=max_batch_size)
        self.metrics.queue_depth.set_function(lambda: self.depth)
        self.runner = BatchRunner(self.metrics, concurrency)
        self.concurrency = concurrency
        self.batch_seconds = 0.0  # moving average of one forward + finish
        # keyed by (id of the item's predictor, size bucket): batches never mix models
        self._buckets: dict[Hashable, deque[WorkItem]] = {}
        self._users: Counter = Counter()  # predictor -> open tickets + batches in flight
        self._released = asyncio.Event()  # a predictor's last user went away
        self._waiting = 0
        self._reserved = 0
        self._busy = 0  # items taken from the queue and not answered yet
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_pending * concurrency)
        self._forwarders = asyncio.Semaphore(concurrency)
        self._batches: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._closing = False

    @classmethod
    def from_settings(
        cls, settings: Settings, predictor: ServedPredictor, *, metrics: Metrics
    ) -> "Batcher":
        """The queue ``MAX_BATCH_SIZE``, ``MAX_BATCH_DELAY_MS`` and ``MAX_QUEUE_SIZE``
        describe, on ``predictor``: by its size buckets, forwarding as many batches
        at once as it can."""
        return cls(
            predictor,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            bucket_key=bucket_key_from(predictor.input_geometry),
            metrics=metrics,
            concurrency=predictor.concurrency,
        )

    # -- state ------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Images admitted and not yet sent to the model."""
        return self._waiting + self._reserved

    @property
    def idle(self) -> bool:
        return self.depth == 0 and self._busy == 0

    def estimate_wait_s(self, extra: int = 0) -> float:
        batches = math.ceil((self.depth + extra) / self.max_batch_size) + 1
        seconds = batches * max(self.batch_seconds, 0.05) / self.concurrency
        return seconds + self.max_batch_delay_s

    def record_batch_time(self, seconds: float) -> None:
        a = 0.2 if self.batch_seconds else 1.0
        self.batch_seconds = (1 - a) * self.batch_seconds + a * seconds

    # -- the served model -------------------------------------------------------

    def swap(
        self,
        predictor: ServedPredictor,
        *,
        bucket_key: Callable[[torch.Tensor], Hashable] = image_size_key,
    ) -> ServedPredictor:
        """Serve ``predictor`` (already warm) from the next admitted request on;
        returns the previous one. Requests admitted before keep their model."""
        old, self.predictor, self.bucket_key = self.predictor, predictor, bucket_key
        return old

    async def retire(self, predictor: ServedPredictor) -> None:
        """Wait until no admitted request and no batch in flight uses ``predictor``
        (after ``swap``, this is its last batch; the queue then holds no reference)."""
        while predictor in self._users:
            self._released.clear()
            await self._released.wait()

    def done_with(self, predictor: ServedPredictor) -> None:
        """A closed ticket no longer uses ``predictor`` (``retire`` waits for this)."""
        self._use(predictor, -1)

    def _use(self, predictor: ServedPredictor, delta: int) -> None:
        self._users[predictor] += delta
        if self._users[predictor] <= 0:
            del self._users[predictor]  # keep no reference to a retired model
            self._released.set()

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_loop(), name="maskrcnn-batcher")
        self._task.add_done_callback(_log_crash)

    async def stop(self, *, drain: bool = True) -> None:
        """Finish (``drain``) or fail every queued image, then stop the threads."""
        self._closing = True
        if not drain:
            for bucket in self._buckets.values():
                for item in bucket:
                    fail(item, NotReadyError("the server is shutting down"))
            self._buckets.clear()
            self._waiting = 0
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        self.runner.shutdown()

    # -- admission --------------------------------------------------------------

    def admit(self, n: int, predictor: ServedPredictor | None = None) -> Ticket:
        """Reserve ``n`` queue places (``QueueFullError`` when they are not free) for
        images to run on ``predictor``: by default the served model; another one
        (``app.serving.ondemand``) is batched apart, by its own size buckets."""
        if self._closing or self._task is None:
            raise NotReadyError("the server is shutting down", retry_after=5)
        if n > self.max_queue_size:
            raise PayloadTooLargeError(
                f"{n} images in one request; the queue holds at most {self.max_queue_size}",
                code="too_many_images",
            )
        if self.depth + n > self.max_queue_size:
            raise QueueFullError(
                f"the queue is full ({self.depth} of {self.max_queue_size} images waiting); "
                "retry later",
                retry_after=self.estimate_wait_s(n),
            )
        bucket_key = self.bucket_key
        if predictor is None:
            predictor = self.predictor
        elif predictor is not self.predictor:
            bucket_key = bucket_key_from(predictor.input_geometry)
        self._reserved += n
        self._use(predictor, +1)
        return Ticket(self, n, predictor, bucket_key)

    def enqueue(
        self,
        ticket: Ticket,
        images: Sequence[torch.Tensor],
        options: Sequence[PredictOptions],
        deadline: float,
    ) -> list[WorkItem]:
        """Queue a ticket's images (``Ticket.submit``); their places stay reserved
        until the ticket gives them back (``unreserve``)."""
        if self._closing:
            raise NotReadyError("the server is shutting down", retry_after=5)
        loop = asyncio.get_running_loop()
        items = []
        for image, opts in zip(images, options, strict=True):
            bucket = ticket.bucket_key(image)
            item = WorkItem(image, opts, ticket.predictor, bucket, deadline, loop.create_future())
            self._buckets.setdefault(_queue_key(item), deque()).append(item)
            items.append(item)
        self._waiting += len(items)
        self._wakeup.set()
        return items

    def unreserve(self, places: int) -> None:
        """Give back places ``admit`` reserved: queued meanwhile, or never used."""
        self._reserved -= places

    def withdraw(self, items: list[WorkItem], reason: str) -> None:
        """Take a closed ticket's waiting images out of the queue."""
        for item in items:
            bucket = self._buckets.get(_queue_key(item))
            if bucket is not None and item in bucket:
                bucket.remove(item)
                self._waiting -= 1
                self.metrics.dropped_images.labels(reason=reason).inc()
                if not bucket:
                    del self._buckets[_queue_key(item)]
            if not item.future.done():
                item.future.cancel()
            elif not item.future.cancelled():
                item.future.exception()  # mark it retrieved: the request already failed

    # -- dispatch ---------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while await self._dispatch_next():
            pass

    async def _dispatch_next(self) -> bool:
        """Send one batch; ``False`` once closed and empty. One call per batch, so
        no local outlives it: an idle loop holding the last batch would keep a
        retired model (its items, its outputs) in memory."""
        await self._slots.acquire()
        await self._forwarders.acquire()
        batch = await self._next_batch()
        live = self._drop_dead(batch) if batch is not None else []
        if not live:
            self._forwarders.release()
            self._slots.release()
            return batch is not None
        self._busy += len(live)
        self._use(live[0].predictor, +1)
        task = asyncio.create_task(self._run(live[0].predictor, live))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)
        return True

    async def _next_batch(self) -> list[WorkItem] | None:
        while True:
            bucket, wait = self._pick_bucket(time.monotonic())
            if bucket is not None:
                return self._take(bucket)
            if self._closing and not self._waiting:
                return None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _pick_bucket(self, now: float) -> tuple[Hashable | None, float | None]:
        """The bucket to send now, else how long until one is due (``None``: forever)."""
        if not self._buckets:
            return None, None
        by_age = sorted(self._buckets, key=lambda b: self._buckets[b][0].enqueued_at)
        for key in by_age:
            if len(self._buckets[key]) >= self.max_batch_size:
                return key, None
        oldest = by_age[0]
        due = self._buckets[oldest][0].enqueued_at + self.max_batch_delay_s - now
        if due <= 0 or self._closing:
            return oldest, None
        return None, due

    def _take(self, key: Hashable) -> list[WorkItem]:
        bucket = self._buckets[key]
        batch = [bucket.popleft() for _ in range(min(len(bucket), self.max_batch_size))]
        if not bucket:
            del self._buckets[key]
        self._waiting -= len(batch)
        return batch

    def _drop_dead(self, batch: list[WorkItem]) -> list[WorkItem]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():
                self.metrics.dropped_images.labels(reason="cancelled").inc()
            elif item.deadline <= now:
                self.metrics.dropped_images.labels(reason="deadline").inc()
                fail(item, DeadlineExceededError("the request's deadline passed in the queue"))
            else:
                item.dispatched_at = now
                self.metrics.queue_seconds.observe(now - item.enqueued_at)
                live.append(item)
        return live

    async def _run(self, predictor: ServedPredictor, items: list[WorkItem]) -> None:
        """Forward (the next batch may start once it is done), then finish."""
        try:
            try:
                forwarded = await self.runner.forward(items)
            finally:
                self._forwarders.release()
            for group in forwarded:
                seconds = await self.runner.finish(group)
                if seconds is not None:
                    self.record_batch_time(group.seconds + seconds)
        finally:
            self._busy -= len(items)
            self._use(predictor, -1)
            self._slots.release()


def _queue_key(item: WorkItem) -> Hashable:
    return id(item.predictor), item.bucket


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the batching loop stopped", exc_info=task.exception())
