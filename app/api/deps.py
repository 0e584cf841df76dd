"""What routes get from the app, as ``Annotated`` dependencies (tests override
them). Nothing here builds a model: the lifespan does, once."""

import functools
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from app.errors import NotReadyError
from app.inputs.urlfetch import UrlFetcher
from app.serving.batching import Batcher
from app.serving.predictors import ServedPredictor
from app.serving.service import Service, State
from app.settings import Settings
from app.store.db import Database


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    return service.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_database(service: ServiceDep) -> Database:
    return service.db


DatabaseDep = Annotated[Database, Depends(get_database)]


def within_database_timeout(route: Callable) -> Callable:
    """A plain ``def`` route that takes ``db: DatabaseDep``, run in the database's
    own threads and answered within ``DATABASE_TIMEOUT_S`` (``Database.run``): 503
    ``database_unavailable`` past it, and no thread anything else needs is held."""

    @functools.wraps(route)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await kwargs["db"].run(route, *args, **kwargs)

    return run


# the reason names the server's settings (a database URL, a checkpoint's path): the
# log has it, a client does not
FAILED_TO_START = "the service failed to start; the server log says why"


def _not_ready(service: Service) -> NotReadyError:
    if service.state == State.FAILED:
        return NotReadyError(FAILED_TO_START, retry_after=30)
    return NotReadyError(f"the model is not ready yet ({service.state})", retry_after=5)


async def get_predictor(service: ServiceDep) -> ServedPredictor:
    if service.predictor is None:
        raise _not_ready(service)
    return service.predictor


PredictorDep = Annotated[ServedPredictor, Depends(get_predictor)]


async def get_batcher(service: ServiceDep) -> Batcher:
    """The queue, while it takes work: ready, and also while draining (a load
    balancer may still send a few requests after SIGTERM; they are served)."""
    if service.batcher is None or service.state not in (State.READY, State.DRAINING):
        raise _not_ready(service)
    return service.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


def get_url_fetcher(settings: SettingsDep) -> UrlFetcher:
    """A fetcher bound by ``URL_ALLOW_PRIVATE``, ``URL_ALLOWLIST``, the URL timeouts
    and ``MAX_UPLOAD_MB`` (``app.inputs.urlpolicy``)."""
    return UrlFetcher(settings.fetch_policy())


UrlFetcherDep = Annotated[UrlFetcher, Depends(get_url_fetcher)]
