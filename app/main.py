"""The FastAPI app: ``create_app`` wires settings, the service state, error
handlers, middleware and routers. Run it with ``maskrcnn serve`` (or
``uvicorn --factory app.main:create_app``)."""

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api.auth import AuthGate
from app.api.console import install_console
from app.api.docs import install_docs
from app.api.error_handlers import install_error_handlers
from app.api.middleware import RequestContextMiddleware
from app.api.openapi import install_openapi
from app.api.responses import OrjsonResponse
from app.api.routes import datasets, health, models, segment, training_jobs
from app.inputs.memory import MB, DecodeMemory
from app.lifespan import lifespan
from app.serving.device import release_host_memory
from app.serving.service import PredictorLoader, Service
from app.settings import Settings, load_settings

VERSION = "0.1.0"


def operation_id(route: APIRoute) -> str:
    return route.name  # stable, readable operationIds: segment, segment_json, ...


def create_app(
    settings: Settings | None = None, *, load_predictor: PredictorLoader | None = None
) -> FastAPI:
    """``settings`` default to the environment; ``load_predictor`` (tests) replaces
    building the predictor from ``settings.model``."""
    settings = settings or load_settings()
    service = Service(settings, load_predictor=load_predictor)
    app = FastAPI(
        title="maskrcnn-service",
        version=VERSION,
        summary="Mask R-CNN instance segmentation with batched inference",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        generate_unique_id_function=operation_id,
        docs_url=None,  # app.api.docs serves the pages without a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.state.decode_memory = DecodeMemory(
        request_pixels=settings.max_request_pixels,
        limit_bytes=int(settings.max_decode_memory_mb * MB),
        trim=release_host_memory,
    )
    install_error_handlers(app, private=[settings.data_dir, settings.openvino_cache])
    install_openapi(app)
    install_docs(app)
    install_console(app)
    app.add_middleware(AuthGate)  # inside RequestContextMiddleware: ids and size caps first
    app.add_middleware(
        RequestContextMiddleware,
        service=service,
        max_body_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        body_limits={datasets.router.prefix: (settings.max_dataset_bytes, "MAX_DATASET_MB")},
    )
    for module in (segment, models, datasets, training_jobs, health):
        app.include_router(module.router)
    return app
