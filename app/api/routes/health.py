"""Operations: liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.auth import MetricsToken
from app.api.deps import FAILED_TO_START, ServiceDep
from app.api.schemas import HealthPublic, ModelRefPublic, ReadinessPublic, error_responses
from app.errors import NotReadyError
from app.serving.service import State

router = APIRouter(tags=["operations"])


@router.get("/healthz", name="healthz", response_model=HealthPublic)
async def healthz() -> HealthPublic:
    """Liveness: the process and its event loop answer (the model may still load)."""
    return HealthPublic()


@router.get(
    "/readyz", name="readyz", response_model=ReadinessPublic, responses=error_responses(503)
)
async def readyz(service: ServiceDep) -> ReadinessPublic:
    """200 only when the model is loaded, warmed up, and the server is not draining."""
    if not service.ready or service.predictor is None:
        reason = {
            State.FAILED: FAILED_TO_START,
            State.DRAINING: "the server is shutting down",
        }.get(service.state, f"the model is not ready yet ({service.state})")
        raise NotReadyError(reason, retry_after=5)
    predictor = service.predictor
    info = predictor.info
    return ReadinessPublic(
        model=ModelRefPublic(id=info.id, architecture=info.architecture, kind=info.kind),
        device=str(predictor.device),
        runtime=predictor.runtime,
        precision=predictor.precision,
    )


@router.get(
    "/metrics",
    name="metrics",
    response_class=Response,
    dependencies=[MetricsToken],
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **error_responses(401),
    },
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics of this process (needs an API token where
    `MASKRCNN_PROTECT_METRICS` is true)."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
