"""A request's places in the batching queue (``Batcher.admit``), and the four
calls of the queue a ticket makes (``TicketQueue``: what ``Batcher`` offers it)."""

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import torch

from app.serving.predictors import ServedPredictor
from app.serving.stages import ItemResult, WorkItem
from model import PredictOptions


class TicketQueue(Protocol):
    def enqueue(
        self,
        ticket: "Ticket",
        images: Sequence[torch.Tensor],
        options: Sequence[PredictOptions],
        deadline: float,
    ) -> list[WorkItem]: ...

    def unreserve(self, places: int) -> None: ...

    def withdraw(self, items: list[WorkItem], reason: str) -> None: ...

    def done_with(self, predictor: ServedPredictor) -> None: ...


class Ticket:
    """Queue places reserved by ``Batcher.admit``; use it as a context manager.

    Leaving the ``with`` block returns unused places and withdraws images still
    waiting (the request timed out, failed or was cancelled), so they never
    reach the model.

    ``predictor`` is the model the request's images will run on (the one served
    when it was admitted): resolve the request's options against its ``info``.
    """

    def __init__(
        self,
        batcher: TicketQueue,
        reserved: int,
        predictor: ServedPredictor,
        bucket_key: Callable[[torch.Tensor], Hashable],
    ):
        self._batcher = batcher
        self._reserved = reserved
        self._items: list[WorkItem] = []
        self._open = True
        self.predictor = predictor
        self.bucket_key = bucket_key

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        reason = {TimeoutError: "deadline", asyncio.CancelledError: "cancelled"}.get(
            exc_type, "error"
        )
        self.close(reason)

    async def submit(
        self,
        images: Sequence[torch.Tensor],
        options: Sequence[PredictOptions],
        *,
        deadline: float,
    ) -> list[ItemResult]:
        """Queue the images (as many as reserved) and wait for their results, in order.

        ``deadline`` is a ``time.monotonic()`` instant.
        """
        if len(images) != self._reserved:
            raise ValueError(f"reserved {self._reserved} places, got {len(images)} images")
        self._items = self._batcher.enqueue(self, images, options, deadline)
        self._release()
        return list(await asyncio.gather(*(item.future for item in self._items)))

    def close(self, reason: str = "cancelled") -> None:
        self._release()
        self._batcher.withdraw(self._items, reason)
        if self._open:
            self._open = False
            self._batcher.done_with(self.predictor)

    def _release(self) -> None:
        self._batcher.unreserve(self._reserved)
        self._reserved = 0
