"""``/v1/models``: the models this deployment knows (registry versions, the
start-up model, the served one) and activation."""

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from app.api.auth import AdminToken, ApiToken
from app.api.deps import PredictorDep, ServiceDep
from app.api.schemas import (
    TRITON_NAME_PATTERN,
    ClassPublic,
    ModelPublic,
    ModelsPublic,
    error_responses,
)
from app.errors import NotFoundError
from app.serving.exports import exported, triton_zip
from app.serving.predictors import ServedPredictor
from app.serving.service import Service
from app.store import registry
from app.store.db import ModelRecord
from model import ModelInfo

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[ApiToken],
    responses=error_responses(401, 503),
)


def describe_info(info: ModelInfo, *, active: bool = False, **fields) -> ModelPublic:
    classes = [
        ClassPublic(id=cid, name=name)
        for label, (cid, name) in enumerate(zip(info.class_ids, info.class_names, strict=True))
        if label
    ]
    return ModelPublic(
        id=info.id,
        architecture=info.architecture,
        kind=info.kind,
        classes=classes,
        active=active,
        **fields,
    )


def record_fields(record: ModelRecord | None) -> dict:
    if record is None:
        return {}
    return {
        "metrics": record.metrics,
        "base_model": record.base_model,
        "job_id": record.job_id,
        "dataset_id": record.dataset_id,
        "created_at": record.created_at,
    }


def describe_record(record: ModelRecord) -> ModelPublic:
    return ModelPublic(
        id=record.id,
        architecture=record.architecture,
        kind="custom",
        classes=[ClassPublic(id=c["id"], name=c["name"]) for c in record.classes],
        active=False,
        **record_fields(record),
    )


def known_models(service: Service, predictor: ServedPredictor) -> list[ModelPublic]:
    """Served model first, then the start-up model, then registry versions, newest
    first (blocking: reads the database)."""
    records = {r.id: r for r in registry.list_records(service.db)}
    served = predictor.info
    models = [
        describe_info(
            served,
            active=True,
            device=str(predictor.device),
            precision=predictor.precision,
            runtime=predictor.runtime,
            **record_fields(records.pop(served.id, None)),
        )
    ]
    startup = service.startup_info
    if startup is not None and startup.id != served.id and startup.id not in records:
        models.append(describe_info(startup))
    return models + [describe_record(record) for record in records.values()]


@router.get("", name="list_models", response_model=ModelsPublic)
async def list_models(
    service: ServiceDep,
    predictor: PredictorDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ModelsPublic:
    """Models this deployment knows; `active` marks the one this replica serves. The
    built-in ids `demo`, `coco` and `coco-v2` can be activated even when not listed."""
    models = await service.db.run(known_models, service, predictor)
    return ModelsPublic(data=models[offset : offset + limit], count=len(models))


@router.get(
    "/{model_id}", name="get_model", response_model=ModelPublic, responses=error_responses(404)
)
async def get_model(model_id: str, service: ServiceDep, predictor: PredictorDep) -> ModelPublic:
    """One model by id, with its class table."""
    for model in await service.db.run(known_models, service, predictor):
        if model.id == model_id:
            return model
    raise NotFoundError(f"no model with id {model_id!r}; GET /v1/models lists them")


@router.delete(
    "/{model_id}",
    name="delete_model",
    status_code=204,
    response_class=Response,
    dependencies=[AdminToken],
    responses=error_responses(403, 404, 409),
)
async def delete_model(model_id: str, service: ServiceDep) -> Response:
    """Delete a registered version and its checkpoint (in the object store too). 409
    `conflict` while it is the active model or the base of a queued or running
    training job; 404 for the built-in models. Needs the admin token."""
    key = await service.db.run(registry.delete_record, service.db, model_id)
    # not under the database's timeout: the object store's call, after the row
    await asyncio.to_thread(service.db.objects.discard, key)
    return Response(status_code=204)


@router.post(
    "/{model_id}/activate",
    name="activate_model",
    response_model=ModelPublic,
    dependencies=[AdminToken],
    responses=error_responses(403, 404, 500),
)
async def activate_model(model_id: str, service: ServiceDep) -> ModelPublic:
    """Serve this model on every replica: it is loaded and warmed up here beside the
    current one, swapped in between batches (requests in flight finish on the old
    one, none fails), then recorded so the other replicas follow within
    `MODEL_POLL_S`. A model that fails to load changes nothing (500
    `activation_failed`). Needs the admin token."""
    await service.activate(model_id)
    return await get_model(model_id, service, service.predictor)


_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/{model_id}/export",
    name="export_model",
    response_class=Response,
    dependencies=[AdminToken],
    responses={
        200: {
            "content": {"application/octet-stream": _BINARY, "application/zip": _BINARY},
            "description": "`model.onnx`, or with `triton` a zip of a Triton model folder",
        },
        **error_responses(403, 404),
    },
)
async def export_model(
    model_id: str,
    service: ServiceDep,
    format: Annotated[Literal["onnx"], Query(description="`onnx`, the one format")] = "onnx",
    triton: Annotated[
        str | None,
        Query(
            pattern=TRITON_NAME_PATTERN,
            description="a Triton model name: answer a zip of NAME/config.pbtxt, "
            "NAME/1/model.onnx and NAME/classes.json instead",
        ),
    ] = None,
) -> Response:
    """The model as ONNX, for ONNX Runtime or Triton (docs/export.md): torchvision's
    forward with its resize, normalisation and thresholds, one float32 RGB image
    `(3, height, width)` in [0, 1] in, `boxes`, `labels`, `scores` and `masks` out.
    Exported on the CPU at the first request for a model (about 20 s for R50-FPN;
    one export at a time), then kept. Needs the admin token."""
    spec = await service.models.resolve(model_id)
    data_dir = service.settings.data_dir
    folder = await exported(spec, model_id, data_dir)
    if triton is None:
        onnx_file = folder / "model.onnx"
        binary = "application/octet-stream"
        return FileResponse(onnx_file, media_type=binary, filename=f"{model_id}.onnx")
    zipped = await triton_zip(folder, triton, data_dir)
    return FileResponse(zipped, media_type="application/zip", filename=zipped.name)
