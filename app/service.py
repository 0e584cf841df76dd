"""The serving state one app owns: settings, metrics, the predictor and its
batching queue, and readiness.

Life cycle: ``starting`` → ``loading`` (model from settings, in a worker thread)
→ ``warming_up`` (one inference) → ``ready``; ``draining`` after SIGTERM;
``failed`` when the model cannot be loaded or warmed up; ``stopped``.
Only ``ready`` makes ``/readyz`` answer 200.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from app.batching import Batcher
from app.buckets import bucket_key_for
from app.db import Database
from app.metrics import Metrics
from app.settings import Settings
from model.options import PredictOptions

if TYPE_CHECKING:
    from model.predictor import Predictor

log = logging.getLogger(__name__)

PredictorLoader = Callable[[Settings], "Predictor"]


def build_predictor(settings: Settings) -> "Predictor":
    """The predictor ``MASKRCNN_MODEL`` / ``DEVICE`` / ``PRECISION`` ask for."""
    from model.loading import load_model
    from model.predictor import Predictor

    classes_file = str(settings.classes_file) if settings.classes_file else None
    loaded = load_model(settings.model, classes_file=classes_file, device=settings.device)
    device = next(loaded.network.parameters()).device
    return Predictor(loaded.network, loaded.info, device=device, precision=settings.precision)


def warm_up(predictor: "Predictor") -> float:
    """One inference on a synthetic 640×480 image; returns its seconds."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=generator)
    start = time.perf_counter()
    predictor.predict([image], [PredictOptions()])
    return time.perf_counter() - start


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        load_predictor: PredictorLoader | None = None,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.metrics = metrics or Metrics(max_batch_size=settings.max_batch_size)
        self.load_predictor = load_predictor or build_predictor
        self.db = Database(settings.database_url_or_default, data_dir=settings.data_dir)
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.state = "starting"
        self.error: str | None = None
        self.in_flight = 0  # HTTP requests being handled (RequestContextMiddleware)
        self.on_fatal: Callable[[BaseException], None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Load, warm up, start the queue; on failure log, mark ``failed`` and call
        ``on_fatal`` (``maskrcnn serve`` exits)."""
        try:
            self.state = "loading"
            await asyncio.to_thread(self.db.create_schema)
            predictor = await asyncio.to_thread(self.load_predictor, self.settings)
            self._set_state("warming_up")
            seconds = await asyncio.to_thread(warm_up, predictor)
            batcher = self._build_batcher(predictor)
            batcher.record_batch_time(seconds)
            await batcher.start()
            self.predictor, self.batcher = predictor, batcher
            info = predictor.info
            self.metrics.model.labels(info.id, info.architecture, str(predictor.device)).set(1)
            log.info(
                "serving model %r (%s) on %s; warm-up inference took %.0f ms",
                info.id,
                info.architecture,
                predictor.device,
                seconds * 1000,
            )
            self._set_state("ready")
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.critical("cannot serve model %r: %s", self.settings.model, e)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _build_batcher(self, predictor: "Predictor") -> Batcher:
        s = self.settings
        return Batcher(
            predictor,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_size=s.max_queue_size,
            bucket_key=bucket_key_for(getattr(predictor, "network", None)),
            metrics=self.metrics,
        )

    def _set_state(self, state: str) -> None:
        if self.state in ("draining", "stopped"):
            return  # a drain that began during start-up wins
        self.state = state
        self.metrics.ready.set(1 if state == "ready" else 0)

    def begin_drain(self) -> None:
        """``/readyz`` turns 503; requests keep being served until drained."""
        if self.state not in ("stopped", "draining"):
            log.info("draining: %d requests in flight", self.in_flight)
            self.state = "draining"
            self.metrics.ready.set(0)

    def drained(self) -> bool:
        return self.in_flight == 0 and (self.batcher is None or self.batcher.idle)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no request is in flight and the queue is empty (``False`` on timeout)."""
        deadline = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        """Finish queued work and stop the queue's workers."""
        if self.state != "failed":
            self.begin_drain()
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        self.state = "stopped"
        self.metrics.ready.set(0)
        self.db.dispose()
