"""Models run on request: the ``model`` option of ``/v1/segment*`` names a
registry model (or a built-in) to answer instead of the active one.

Such a model is loaded into this process on first use, warmed up, and kept in a
least-recently-used cache of ``MODEL_CACHE_SIZE`` models. It shares the served
model's queue (``Batcher.admit(predictor=...)``: its requests batch together,
never with another model's, under the same queue limit and deadlines). An
evicted model is closed after its last batch, as a retired model is. Requests
that name no model, or the active one, never come here: the default path reads
no database and loads nothing.
"""

import asyncio
import logging
import time
import traceback
from collections import OrderedDict

from app.errors import BadRequestError, NotFoundError
from app.serving.loading import load_predictor
from app.serving.predictors import InProcessPredictor, ServedPredictor, warm_up
from app.serving.switching import ModelSwitcher

log = logging.getLogger(__name__)


class OnDemandModels:
    """At most ``size`` models besides the served one, least recently used evicted."""

    def __init__(self, switcher: ModelSwitcher, size: int):
        self.switcher = switcher
        self.size = size
        self._loaded: OrderedDict[str, ServedPredictor] = OrderedDict()
        self._loading: dict[str, asyncio.Task] = {}

    async def get(self, model_id: str | None) -> ServedPredictor | None:
        """The model to run a request on: ``None`` means the served one.

        ``BadRequestError`` (``unknown_model``) for an id nothing answers to, or when
        ``MODEL_CACHE_SIZE`` is 0; a load that fails raises its error, and the next
        request tries again."""
        if model_id is None:
            return None
        if self._served(model_id):  # activated since it was loaded: one copy is enough
            if model_id in self._loaded:
                self._evict(self._loaded.pop(model_id))
            return None
        if (predictor := self._loaded.get(model_id)) is not None:
            self._loaded.move_to_end(model_id)
            return predictor
        if self.size == 0:
            raise BadRequestError(
                f"model {model_id!r} is not the served model, and models are not loaded "
                "on request on this server (MASKRCNN_MODEL_CACHE_SIZE=0)",
                code="unknown_model",
            )
        task = self._loading.get(model_id)
        if task is None:  # one load per model, whoever asks meanwhile
            task = asyncio.create_task(self._load(model_id), name=f"maskrcnn-load-{model_id}")
            self._loading[model_id] = task
            task.add_done_callback(lambda done: self._loaded_or_failed(model_id, done))
        # shielded: a request that gives up leaves the load to finish for the next one
        return await asyncio.shield(task)

    def _loaded_or_failed(self, model_id: str, task: asyncio.Task) -> None:
        self._loading.pop(model_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cannot load model %r on request: %s", model_id, task.exception())

    def _served(self, model_id: str) -> bool:
        predictor = self.switcher.predictor
        return predictor is not None and predictor.info.id == model_id

    async def _load(self, model_id: str) -> ServedPredictor:
        started = time.perf_counter()
        try:
            spec = await self.switcher.resolve(model_id)
        except NotFoundError as e:
            raise BadRequestError(str(e), code="unknown_model") from None
        # in this process whatever MODEL_PROCESSES says: one copy per cached model
        predictor = InProcessPredictor(await asyncio.to_thread(load_predictor, spec))
        try:
            await asyncio.to_thread(warm_up, predictor)
        except Exception as e:
            traceback.clear_frames(e.__traceback__)  # its frames hold the model
            raise
        self._loaded[model_id] = predictor
        log.info(
            "loaded model %r on request in %.1f s (%d of MODEL_CACHE_SIZE=%d)",
            model_id,
            time.perf_counter() - started,
            len(self._loaded),
            self.size,
        )
        while len(self._loaded) > self.size:
            self._evict(self._loaded.popitem(last=False)[1])
        return predictor

    def _evict(self, predictor: ServedPredictor) -> None:
        """Closed after its last batch, as a retired served model is."""
        self.switcher.retire(predictor, "closed model %r, no longer cached for the model option")

    def stop(self) -> None:
        """Stop loading and let every cached model go; ``ModelSwitcher.stop``, after
        the queue has drained, waits for them to close."""
        for task in list(self._loading.values()):
            task.cancel()
        while self._loaded:
            self._evict(self._loaded.popitem(last=False)[1])
