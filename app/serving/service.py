"""The serving state one app owns: settings, metrics, the database, the predictor
and its batching queue, readiness, and which model is served.

Life cycle: ``starting`` → ``loading`` (model from settings, in a worker thread)
→ ``warming_up`` (one inference) → ``ready``; ``draining`` after SIGTERM;
``failed`` when the model cannot be loaded or warmed up; ``stopped``.
Only ``ready`` makes ``/readyz`` answer 200.

Switching models (SPEC §6): the active model id lives in the database. At
start-up it overrides ``MASKRCNN_MODEL``. ``activate`` (the admin route) and a
poll of the database every ``MODEL_POLL_S`` (a version activated through another
replica) do the same on this replica: load and warm the new model beside the
old one, swap it into the queue between batches (``Batcher.swap``), and free the
old one after its last batch. Swaps are serialised; a model that fails to load
changes nothing.
"""

import asyncio
import contextlib
import gc
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import torch

from app.errors import NotFoundError, NotReadyError
from app.serving.batching import Batcher
from app.serving.buckets import predictor_bucket_key
from app.serving.metrics import Metrics
from app.serving.stages import release_device_memory
from app.settings import Settings
from app.store import registry
from app.store.db import Database
from app.store.registry import Activation, ActivationError
from app.training.datasets import sweep_staging
from model.inference.options import PredictOptions

if TYPE_CHECKING:
    from model.inference.predictor import Predictor
    from model.info import ModelInfo

log = logging.getLogger(__name__)

PredictorLoader = Callable[[Settings], "Predictor"]

# MODEL_PROCESSES=auto on a GPU. On an H200, r50 fp16, MAX_BATCH_SIZE=8, served/bare
# was 0.74 in process, 0.91 with 2, 1.02 with 3 and 1.05 with 4 (bench/RESULTS.md);
# each child keeps a CPU core busy and holds a CUDA context and a copy of the model.
GPU_MODEL_PROCESSES = 2


def model_processes(settings: Settings) -> int:
    """``MODEL_PROCESSES``, ``auto`` resolved: ``GPU_MODEL_PROCESSES`` when the model
    runs on a GPU, 0 (in this process) on the CPU (no gain measured there)."""
    if settings.model_processes != "auto":
        return settings.model_processes
    device = settings.device
    if device == "auto":  # as model.loading resolves it; creates no CUDA context
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPU_MODEL_PROCESSES if torch.device(device).type == "cuda" else 0


def build_predictor(settings: Settings) -> "Predictor":
    """The predictor ``MASKRCNN_MODEL`` / ``DEVICE`` / ``PRECISION`` ask for; a
    registry model id is served from its checkpoint under its id. With
    ``MODEL_PROCESSES``, that many copies in child processes (``ModelPool``)."""
    if processes := model_processes(settings):  # the children load it, not this process
        from app.serving.modelprocess import ModelPool

        return ModelPool(settings, processes)
    from model.inference.predictor import Predictor
    from model.loading import load_model

    spec, model_id = registry.resolve_model_spec(settings)
    classes_file = str(settings.classes_file) if settings.classes_file else None
    loaded = load_model(spec, classes_file=classes_file, model_id=model_id, device=settings.device)
    device = next(loaded.network.parameters()).device
    return Predictor(loaded.network, loaded.info, device=device, precision=settings.precision)


def warm_up(predictor: "Predictor") -> float:
    """One inference on a synthetic 640×480 image (one per model process: a pool's
    children take turns); returns the last one's seconds."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=generator)
    for _ in range(concurrency(predictor)):
        start = time.perf_counter()
        predictor.predict([image], [PredictOptions()])
    return time.perf_counter() - start


def concurrency(predictor: object) -> int:
    """How many batches ``predictor`` forwards at once (``ModelPool``: its size)."""
    return getattr(predictor, "concurrency", 1)


def free_memory() -> None:
    """Return a retired model's memory: cycles first, then the CUDA cache."""
    gc.collect()
    release_device_memory()


def close_predictor(predictor: object) -> None:
    """Stop a predictor that owns processes (``ModelPool``); others have nothing
    to close. Blocking."""
    close = getattr(predictor, "close", None)
    if close is not None:
        close()


class Service:
    def __init__(self, settings: Settings, *, load_predictor: PredictorLoader | None = None):
        self.settings = settings
        self.metrics = Metrics(max_batch_size=settings.max_batch_size)
        self.load_predictor = load_predictor or build_predictor
        self.db = Database(settings.database_url_or_default, data_dir=settings.data_dir)
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.startup_info: ModelInfo | None = None  # MASKRCNN_MODEL's id and classes
        self.state = "starting"
        self.error: str | None = None
        self.in_flight = 0  # HTTP requests being handled (RequestContextMiddleware)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._swap_lock = asyncio.Lock()
        self._seen: Activation | None = None  # the last activation this replica acted on
        self._poller: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Load, warm up, start the queue and the database poll; on failure log,
        mark ``failed`` and call ``on_fatal`` (``maskrcnn serve`` exits)."""
        predictor = None
        try:
            self.state = "loading"
            await asyncio.to_thread(self.db.create_schema)
            await asyncio.to_thread(sweep_staging, self.settings.data_dir)
            predictor = await self._load_initial()
            self._watch(predictor)
            self._set_state("warming_up")
            seconds = await asyncio.to_thread(warm_up, predictor)
            batcher = self._build_batcher(predictor)
            batcher.record_batch_time(seconds)
            await batcher.start()
            self.predictor, self.batcher = predictor, batcher
            self._show_model(predictor)
            log.info(
                "serving model %r (%s) on %s; warm-up inference took %.0f ms",
                predictor.info.id,
                predictor.info.architecture,
                predictor.device,
                seconds * 1000,
            )
            self._set_state("ready")
            self._poller = asyncio.create_task(self._poll_database(), name="maskrcnn-poll")
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.critical("cannot serve model %r: %s", self.settings.model, e)
            if predictor is not None and self.predictor is None:
                await asyncio.to_thread(close_predictor, predictor)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _watch(self, predictor: "Predictor") -> None:
        """A model in a process of its own may exit (killed, crashed): when the
        served one does, the service fails (``maskrcnn serve`` exits, to be
        restarted); requests waiting on it have already failed with 503."""
        if not hasattr(predictor, "on_exit"):
            return
        loop = asyncio.get_running_loop()
        predictor.on_exit = lambda: loop.call_soon_threadsafe(self._model_exited, predictor)

    def _model_exited(self, predictor: "Predictor") -> None:
        if predictor is not self.predictor or self.state in ("failed", "stopped"):
            return  # a retired model, or the service is already down
        error = RuntimeError(f"the process of model {predictor.info.id!r} exited")
        self.state, self.error = "failed", str(error)
        self.metrics.ready.set(0)
        log.critical("%s; the service stops", error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    async def _load_initial(self) -> "Predictor":
        """The database's active model when there is one (a replica restarted after
        an activation serves it), else ``MASKRCNN_MODEL``."""
        self._seen = await asyncio.to_thread(registry.read_activation, self.db)
        wanted = self._seen.model_id if self._seen else None
        if wanted is not None and wanted != registry.startup_model_id(self.settings.model):
            log.info(
                "serving %r, the active model in the database (it overrides MASKRCNN_MODEL=%r)",
                wanted,
                self.settings.model,
            )
            try:
                settings = await asyncio.to_thread(self._settings_for, wanted)
                predictor = await asyncio.to_thread(self.load_predictor, settings)
            except Exception as e:
                log.error(
                    "cannot load the active model %r (%s); serving MASKRCNN_MODEL=%r instead",
                    wanted,
                    e,
                    self.settings.model,
                )
            else:
                self.startup_info = await asyncio.to_thread(
                    registry.describe_spec, self.settings.model, self.settings.classes_file
                )
                return predictor
        predictor = await asyncio.to_thread(self.load_predictor, self.settings)
        self.startup_info = predictor.info
        return predictor

    def _build_batcher(self, predictor: "Predictor") -> Batcher:
        s = self.settings
        return Batcher(
            predictor,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_size=s.max_queue_size,
            bucket_key=predictor_bucket_key(predictor),
            metrics=self.metrics,
            concurrency=concurrency(predictor),
        )

    def _show_model(self, predictor: "Predictor") -> None:
        info = predictor.info
        self.metrics.model.clear()
        self.metrics.model.labels(info.id, info.architecture, str(predictor.device)).set(1)

    def _set_state(self, state: str) -> None:
        if self.state in ("draining", "stopped"):
            return  # a drain that began during start-up wins
        self.state = state
        self.metrics.ready.set(1 if state == "ready" else 0)

    # -- switching models ---------------------------------------------------------

    @property
    def startup_id(self) -> str | None:
        if self.startup_info is not None:
            return self.startup_info.id
        return registry.startup_model_id(self.settings.model)

    def _settings_for(self, model_id: str) -> Settings:
        """Settings that load ``model_id`` (blocking: may read the database);
        ``NotFoundError`` for an id this replica cannot serve."""
        by_name = self.settings.model_copy(update={"model": model_id, "classes_file": None})
        if model_id in registry.BUILTIN_MODELS:
            return by_name
        if model_id == self.startup_id:
            return self.settings
        if registry.get_record(self.db, model_id):
            return by_name
        raise NotFoundError(
            f"no model with id {model_id!r}; GET /v1/models lists them "
            f"(built-in: {', '.join(registry.BUILTIN_MODELS)})"
        )

    async def activate(self, model_id: str) -> None:
        """Serve ``model_id`` here, then record it so every replica follows.

        ``NotFoundError`` for an unknown id, ``ActivationError`` when it cannot be
        loaded or warmed up (nothing changes then)."""
        settings = await asyncio.to_thread(self._settings_for, model_id)
        async with self._swap_lock:
            self._check_serving()

            async def record() -> None:
                self._seen = await asyncio.to_thread(registry.write_activation, self.db, model_id)

            if self.predictor.info.id == model_id:
                await record()
            else:
                try:
                    # recorded after the warm-up and before the swap: a database that
                    # cannot take the record leaves every replica where it was
                    await self._switch(settings, before_swap=record)
                except NotReadyError:
                    raise
                except Exception as e:
                    self.metrics.model_switches.labels(result="failed").inc()
                    raise ActivationError(
                        f"cannot activate model {model_id!r}: {e}; "
                        f"still serving {self.predictor.info.id!r}"
                    ) from e
        log.info("model %r is now the active model of every replica", model_id)

    def _check_serving(self) -> None:
        if not self.ready or self.predictor is None or self.batcher is None:
            raise NotReadyError(f"cannot switch models now ({self.state})", retry_after=5)

    async def _switch(
        self, settings: Settings, *, before_swap: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Load and warm a model beside the served one, then swap it in between
        batches; the old one is freed after its last batch (in the background).
        ``before_swap`` runs once the new model is warm; if it fails, nothing changes."""
        started = time.perf_counter()
        predictor = None
        try:
            predictor = await asyncio.to_thread(self.load_predictor, settings)
            self._watch(predictor)
            seconds = await asyncio.to_thread(warm_up, predictor)
            self._check_serving()  # a drain may have begun meanwhile
            if before_swap is not None:
                await before_swap()
        except Exception as e:
            # the error's traceback holds frames holding the new model: clear them, or
            # it stays in memory beside the served one for as long as the error lives
            if predictor is not None:
                await asyncio.to_thread(close_predictor, predictor)
            predictor = None
            traceback.clear_frames(e.__traceback__)
            await asyncio.to_thread(free_memory)
            raise
        bucket_key = predictor_bucket_key(predictor)
        old = self.batcher.swap(predictor, bucket_key=bucket_key)
        self.predictor = predictor
        if settings is self.settings:
            self.startup_info = predictor.info
        self._show_model(predictor)
        self.metrics.model_switches.labels(result="ok").inc()
        log.info(
            "switched from model %r to %r in %.1f s (warm-up %.0f ms); in-flight requests "
            "finish on the old one",
            old.info.id,
            predictor.info.id,
            time.perf_counter() - started,
            seconds * 1000,
        )
        if old is not predictor:
            self._retire(old)

    def _retire(self, old: "Predictor") -> None:
        task = asyncio.create_task(self._free_after_last_batch(old), name="maskrcnn-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _free_after_last_batch(self, old: "Predictor") -> None:
        await self.batcher.retire(old)
        model_id = old.info.id
        await asyncio.to_thread(close_predictor, old)
        del old  # the last reference: the queue and the service hold none now
        await asyncio.to_thread(free_memory)
        log.info("freed model %r after its last batch", model_id)

    async def _poll_database(self) -> None:
        """Follow activations made through other replicas; refresh the jobs gauge."""
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                await self.refresh_from_database()
            except Exception as e:  # a database hiccup must not stop the polling
                log.warning("cannot read the database: %s", e)

    async def refresh_from_database(self) -> None:
        """One poll: the jobs gauge, then a switch if another activation was recorded
        since the last one this replica acted on."""
        counts = await asyncio.to_thread(registry.count_jobs, self.db)
        for state, count in counts.items():
            self.metrics.training_jobs.labels(state=state).set(count)
        if await asyncio.to_thread(registry.read_activation, self.db) == self._seen:
            return
        async with self._swap_lock:
            activation = await asyncio.to_thread(registry.read_activation, self.db)
            if activation is None or activation == self._seen or not self.ready:
                return
            self._seen = activation  # a failed load is retried at the next activation only
            if self.predictor.info.id == activation.model_id:
                return
            log.info("model %r was activated; switching to it", activation.model_id)
            try:
                settings = await asyncio.to_thread(self._settings_for, activation.model_id)
                await self._switch(settings)
            except Exception as e:
                self.metrics.model_switches.labels(result="failed").inc()
                log.error(
                    "cannot switch to the activated model %r (%s); still serving %r",
                    activation.model_id,
                    e,
                    self.predictor.info.id,
                )

    # -- shutdown -----------------------------------------------------------------

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
        """Stop following the database, finish queued work, stop the queue's workers."""
        if self.state != "failed":
            self.begin_drain()
        await _cancel(self._poller)
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.predictor is not None:
            await asyncio.to_thread(close_predictor, self.predictor)
        self.state = "stopped"
        self.metrics.ready.set(0)
        self.db.dispose()


async def _cancel(task: Awaitable | None) -> None:
    if isinstance(task, asyncio.Task) and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
