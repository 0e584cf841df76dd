"""Which model a replica serves, and switching it without downtime.

The active model id lives in the database. At start-up it overrides
``MASKRCNN_MODEL``. ``activate`` (the admin route) and a poll of the database
every ``MODEL_POLL_S`` (a version activated through another replica) do the same
on this replica: load and warm the new model beside the old one, swap it into
the queue between batches (``Batcher.swap``), and free the old one after its last
batch. Swaps are serialised; a model that fails to load changes nothing.
"""

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable

from app.errors import NotFoundError, NotReadyError
from app.serving.batching import Batcher
from app.serving.buckets import bucket_key_from
from app.serving.device import free_memory
from app.serving.loading import ModelSpec, model_spec
from app.serving.metrics import Metrics
from app.serving.predictors import ServedPredictor, warm_up
from app.settings import Settings
from app.store import registry
from app.store.db import Database
from app.store.registry import Activation, ActivationError
from model import BUILTIN_MODELS, ModelInfo, spec_names

log = logging.getLogger(__name__)

PredictorLoader = Callable[[ModelSpec], ServedPredictor]


class ModelSwitcher:
    """The served predictor and its queue: the first model (``load_initial``,
    ``serve_initial``), switches (``activate``, ``follow_database``), retiring and
    closing models.

    ``check_ready`` raises ``NotReadyError`` while the service is not ready (no
    switch then); ``on_exit`` is called with a served predictor that went away by
    itself (a model process died)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        metrics: Metrics,
        load_predictor: PredictorLoader,
        *,
        check_ready: Callable[[], None],
        on_exit: Callable[[ServedPredictor], None],
    ):
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.load_predictor = load_predictor
        self.predictor: ServedPredictor | None = None
        self.batcher: Batcher | None = None
        self.startup_info: ModelInfo | None = None  # MASKRCNN_MODEL's id and classes
        self._check_ready = check_ready
        self._on_exit = on_exit
        self._swap_lock = asyncio.Lock()
        self._seen: Activation | None = None  # the last activation this replica acted on
        self._retiring: set[asyncio.Task] = set()
        self._startup_spec: ModelSpec | None = None  # MASKRCNN_MODEL's, once resolved

    # -- the first model --------------------------------------------------------------

    async def load_initial(self) -> ServedPredictor:
        """The database's active model when there is one (a replica restarted after
        an activation serves it), else ``MASKRCNN_MODEL``."""
        self._seen = await self.db.run(registry.read_activation, self.db)
        wanted = self._seen.model_id if self._seen else None
        if wanted is not None and wanted != registry.startup_model_id(self.settings.model):
            log.info(
                "serving %r, the active model in the database (it overrides MASKRCNN_MODEL=%r)",
                wanted,
                self.settings.model,
            )
            try:
                spec = await self.resolve(wanted)
                predictor = await self._load(spec)
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
        predictor = await self._load(await asyncio.to_thread(self.startup_spec))
        self.startup_info = predictor.info
        return predictor

    async def serve_initial(self, predictor: ServedPredictor) -> None:
        """Warm ``predictor`` up and start the queue on it."""
        seconds = await asyncio.to_thread(warm_up, predictor)
        batcher = Batcher.from_settings(self.settings, predictor, metrics=self.metrics)
        batcher.record_batch_time(seconds)
        await batcher.start()
        self.predictor, self.batcher = predictor, batcher
        self._show(predictor)
        log.info(
            "serving model %r (%s) on %s with the %s runtime in %s; warm-up inference took %.0f ms",
            predictor.info.id,
            predictor.info.architecture,
            predictor.device,
            predictor.runtime,
            predictor.precision,
            seconds * 1000,
        )

    async def _load(self, spec: ModelSpec) -> ServedPredictor:
        predictor = await asyncio.to_thread(self.load_predictor, spec)
        loop = asyncio.get_running_loop()
        predictor.watch(lambda: loop.call_soon_threadsafe(self._on_exit, predictor))
        return predictor

    def _show(self, predictor: ServedPredictor) -> None:
        info = predictor.info
        self.metrics.model.clear()
        how = (str(predictor.device), predictor.runtime, predictor.precision)
        self.metrics.model.labels(info.id, info.architecture, *how).set(1)

    # -- switching --------------------------------------------------------------------

    @property
    def startup_id(self) -> str | None:
        if self.startup_info is not None:
            return self.startup_info.id
        return registry.startup_model_id(self.settings.model)

    def startup_spec(self) -> ModelSpec:
        """``MASKRCNN_MODEL`` resolved (blocking: a registry id reads the database)."""
        if self._startup_spec is None:
            self._startup_spec = model_spec(self.settings, db=self.db)
        return self._startup_spec

    async def resolve(self, model_id: str) -> ModelSpec:
        """``spec_for`` off the event loop. Not under ``db.run``'s timeout: a
        registry model's checkpoint may be fetched from the object store first
        (``STORAGE_URL``), which can take longer than ``DATABASE_TIMEOUT_S``; its
        database reads have the connection's own timeouts."""
        return await asyncio.to_thread(self.spec_for, model_id)

    def spec_for(self, model_id: str) -> ModelSpec:
        """How to load ``model_id`` (blocking: may read the database); ``NotFoundError``
        for an id this replica cannot serve."""
        if model_id in BUILTIN_MODELS:
            return model_spec(self.settings, model=model_id)
        if model_id == self.startup_id:
            return self.startup_spec()
        if registry.get_record(self.db, model_id):
            return model_spec(self.settings, model=model_id, db=self.db)
        raise NotFoundError(
            f"no model with id {model_id!r}; GET /v1/models lists them "
            f"(built-in: {spec_names(BUILTIN_MODELS)})"
        )

    async def activate(self, model_id: str) -> None:
        """Serve ``model_id`` here, then record it so every replica follows.

        ``NotFoundError`` for an unknown id, ``ActivationError`` when it cannot be
        loaded or warmed up (nothing changes then)."""
        spec = await self.resolve(model_id)
        async with self._swap_lock:
            self._check_ready()

            async def record() -> None:
                self._seen = await self.db.run(
                    registry.write_activation, self.db, model_id, registered=bool(spec.model_id)
                )

            if self.predictor.info.id == model_id:
                await record()
            else:
                try:
                    # recorded after the warm-up and before the swap: a database that
                    # cannot take the record leaves every replica where it was
                    await self._switch(spec, before_swap=record)
                except NotReadyError:
                    raise
                except Exception as e:
                    self.metrics.model_switches.labels(result="failed").inc()
                    raise ActivationError(
                        f"cannot activate model {model_id!r}: {e}; "
                        f"still serving {self.predictor.info.id!r}"
                    ) from e
        log.info("model %r is now the active model of every replica", model_id)

    async def _switch(
        self, spec: ModelSpec, *, before_swap: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Load and warm a model beside the served one, then swap it in between
        batches; the old one is freed after its last batch (in the background).
        ``before_swap`` runs once the new model is warm; if it fails, nothing changes."""
        started = time.perf_counter()
        predictor = None
        try:
            predictor = await self._load(spec)
            seconds = await asyncio.to_thread(warm_up, predictor)
            self._check_ready()  # a drain may have begun meanwhile
            if before_swap is not None:
                await before_swap()
        except Exception as e:
            # the error's traceback holds frames holding the new model: clear them, or
            # it stays in memory beside the served one for as long as the error lives
            if predictor is not None:
                await asyncio.to_thread(predictor.close)
            predictor = None
            traceback.clear_frames(e.__traceback__)
            await asyncio.to_thread(free_memory)
            raise
        old = self.batcher.swap(predictor, bucket_key=bucket_key_from(predictor.input_geometry))
        self.predictor = predictor
        if spec == self._startup_spec:
            self.startup_info = predictor.info
        self._show(predictor)
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
            self.retire(old)

    def retire(self, old: ServedPredictor, message: str = "freed model %r after its last batch"):
        """Close ``old`` and free its memory after its last batch, in the background
        (``stop`` waits for it); then log ``message`` with its id."""
        task = asyncio.create_task(
            self._free_after_last_batch(old, message), name="maskrcnn-retire"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _free_after_last_batch(self, old: ServedPredictor, message: str) -> None:
        await self.batcher.retire(old)
        model_id = old.info.id
        await asyncio.to_thread(old.close)
        del old  # the last reference: the queue and the service hold none now
        await asyncio.to_thread(free_memory)
        log.info(message, model_id)

    # -- activations through other replicas ---------------------------------------------

    async def follow_activation(self) -> None:
        """Switch if another activation was recorded since the last one this replica
        acted on (``Service.poll_database`` asks every ``MODEL_POLL_S``)."""
        if await self.db.run(registry.read_activation, self.db) == self._seen:
            return
        async with self._swap_lock:
            activation = await self.db.run(registry.read_activation, self.db)
            if activation is None or activation == self._seen or not self._ready():
                return
            self._seen = activation  # a failed load is retried at the next activation only
            if self.predictor.info.id == activation.model_id:
                return
            log.info("model %r was activated; switching to it", activation.model_id)
            try:
                spec = await self.resolve(activation.model_id)
                await self._switch(spec)
            except Exception as e:
                self.metrics.model_switches.labels(result="failed").inc()
                log.error(
                    "cannot switch to the activated model %r (%s); still serving %r",
                    activation.model_id,
                    e,
                    self.predictor.info.id,
                )

    def _ready(self) -> bool:
        try:
            self._check_ready()
        except NotReadyError:
            return False
        return True

    # -- shutdown -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Finish queued work, wait for retiring models, close the served one."""
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.predictor is not None:
            await asyncio.to_thread(self.predictor.close)
