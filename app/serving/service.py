"""The serving state one app owns: settings, metrics, the database, the served
model (``app.serving.switching``), readiness and the requests in flight.

Life cycle (``State``): ``starting`` → ``loading`` (the model, in a thread)
→ ``warming_up`` (one inference) → ``ready``; ``draining`` after SIGTERM;
``failed`` when the model cannot be loaded or warmed up, or its process dies;
``stopped``. Only ``ready`` makes ``/readyz`` answer 200.
"""

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.errors import DatabaseUnavailableError, NotReadyError
from app.serving.batching import Batcher
from app.serving.metrics import Metrics
from app.serving.ondemand import OnDemandModels
from app.serving.predictors import ServedPredictor, build_predictor
from app.serving.switching import ModelSwitcher, PredictorLoader
from app.settings import Settings
from app.store import registry
from app.store.db import Database
from model import ModelInfo

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


# a drain or a stop that began during start-up wins over start-up's progress
_FINAL = (State.DRAINING, State.FAILED, State.STOPPED)


class Service:
    def __init__(self, settings: Settings, *, load_predictor: PredictorLoader | None = None):
        self.settings = settings
        self.metrics = Metrics(max_batch_size=settings.max_batch_size)
        self.db = Database.from_settings(settings)
        self.models = ModelSwitcher(
            settings,
            self.db,
            self.metrics,
            load_predictor or functools.partial(build_predictor, settings=settings),
            check_ready=self.check_ready,
            on_exit=self._model_exited,
        )
        self.on_demand = OnDemandModels(self.models, settings.model_cache_size)
        self.state = State.STARTING
        self.error: str | None = None
        self.in_flight = 0  # HTTP requests being handled (RequestContextMiddleware)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._poller: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == State.READY

    @property
    def predictor(self) -> ServedPredictor | None:
        return self.models.predictor

    @property
    def batcher(self) -> Batcher | None:
        return self.models.batcher

    @property
    def startup_info(self) -> ModelInfo | None:
        return self.models.startup_info

    def check_ready(self) -> None:
        """``NotReadyError`` unless serving (no model switch then)."""
        if not self.ready or self.predictor is None or self.batcher is None:
            raise NotReadyError(f"cannot switch models now ({self.state})", retry_after=5)

    def _set_state(self, state: State, error: str | None = None) -> None:
        """The one place the state changes. Start-up's progress never overrides a
        drain, a failure or a stop; ``ready`` is also the metric."""
        if self.state in _FINAL and state in (State.LOADING, State.WARMING_UP, State.READY):
            return
        self.state = state
        if error is not None:
            self.error = error
        self.metrics.ready.set(1 if state == State.READY else 0)

    async def start(self) -> None:
        """Load, warm up, start the queue and the database poll; on failure log,
        mark ``failed`` and call ``on_fatal`` (``maskrcnn serve`` exits)."""
        predictor = None
        try:
            self._set_state(State.LOADING)
            await self._prepare_database()
            predictor = await self.models.load_initial()
            self._set_state(State.WARMING_UP)
            await self.models.serve_initial(predictor)
            self._set_state(State.READY)
            self._poller = asyncio.create_task(self.poll_database(), name="maskrcnn-poll")
        except Exception as e:
            what = f"serve model {self.settings.model!r}"
            if isinstance(e, DatabaseUnavailableError):
                what = "start"
            self._set_state(State.FAILED, f"cannot {what}: {type(e).__name__}: {e}")
            log.critical("%s", self.error)
            if predictor is not None and self.predictor is None:
                await asyncio.to_thread(predictor.close)
            if self.on_fatal is not None:
                self.on_fatal(e)

    async def poll_database(self) -> None:
        """Every ``MODEL_POLL_S``: the training jobs gauge, then activations made
        through other replicas. A database hiccup does not stop the polling."""
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                counts = await self.db.run(registry.count_jobs, self.db)
                for state, count in counts.items():
                    self.metrics.training_jobs.labels(state=state).set(count)
                await self.models.follow_activation()
            except Exception as e:
                self.metrics.database_up.set(0)
                log.warning("cannot read the database: %s", e)
            else:
                self.metrics.database_up.set(1)

    async def _prepare_database(self) -> None:
        """Its tables; a database that cannot be reached is said to be one."""
        try:
            await asyncio.to_thread(self.db.create_schema)
        except SQLAlchemyError as e:
            url = make_url(self.db.url).render_as_string(hide_password=True)  # as configured
            raise DatabaseUnavailableError(
                f"the database at {url} (MASKRCNN_DATABASE_URL) cannot be used: "
                f"{getattr(e, 'orig', None) or e}"
            ) from None

    def _model_exited(self, predictor: ServedPredictor) -> None:
        """A model in a process of its own may exit (killed, crashed): when the
        served one does, the service fails (``maskrcnn serve`` exits, to be
        restarted); requests waiting on it have already failed with 503."""
        if predictor is not self.predictor or self.state in (State.FAILED, State.STOPPED):
            return  # a retired model, or the service is already down
        error = RuntimeError(f"the process of model {predictor.info.id!r} exited")
        self._set_state(State.FAILED, str(error))
        log.critical("%s; the service stops", error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    async def activate(self, model_id: str) -> None:
        """Serve ``model_id`` on every replica (``ModelSwitcher.activate``)."""
        await self.models.activate(model_id)

    # -- shutdown -----------------------------------------------------------------

    def begin_drain(self) -> None:
        """``/readyz`` turns 503; requests keep being served until drained."""
        if self.state not in (State.STOPPED, State.DRAINING):
            log.info("draining: %d requests in flight", self.in_flight)
            self._set_state(State.DRAINING)

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
        """Stop following the database, finish queued work, close the model."""
        if self.state != State.FAILED:
            self.begin_drain()
        await _cancel(self._poller)
        self.on_demand.stop()  # its models close with retired ones, in models.stop
        await self.models.stop()
        self._set_state(State.STOPPED)
        self.db.dispose()


async def _cancel(task: Awaitable | None) -> None:
    if isinstance(task, asyncio.Task) and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
