"""``/v1/models``: what the server serves (the registry of trained versions and
activation arrive with SPEC §6)."""

from fastapi import APIRouter

from app.auth import ApiToken
from app.dependencies import PredictorDep, SettingsDep
from app.errors import NotFoundError
from app.schemas import ClassPublic, ModelPublic, ModelsPublic, error_responses

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[ApiToken],
    responses=error_responses(401, 503),
)


def describe_model(predictor, settings) -> ModelPublic:
    info = predictor.info
    classes = [
        ClassPublic(id=cid, name=name)
        for label, (cid, name) in enumerate(zip(info.class_ids, info.class_names, strict=True))
        if label
    ]
    return ModelPublic(
        id=info.id,
        architecture=info.architecture,
        classes=classes,
        device=str(predictor.device),
        precision=getattr(predictor, "precision", settings.precision),
        active=True,
    )


@router.get("", name="list_models", response_model=ModelsPublic)
async def list_models(predictor: PredictorDep, settings: SettingsDep) -> ModelsPublic:
    """Models this server knows; the active one serves `/v1/segment`."""
    models = [describe_model(predictor, settings)]
    return ModelsPublic(data=models, count=len(models))


@router.get(
    "/{model_id}", name="get_model", response_model=ModelPublic, responses=error_responses(404)
)
async def get_model(model_id: str, predictor: PredictorDep, settings: SettingsDep) -> ModelPublic:
    """One model by id, with its class table."""
    if model_id != predictor.info.id:
        raise NotFoundError(f"no model with id {model_id!r}; GET /v1/models lists them")
    return describe_model(predictor, settings)
