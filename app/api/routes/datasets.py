"""``/v1/datasets``: upload, list, read and delete COCO datasets (admin).

The endpoints are plain ``def``: FastAPI runs them in threads, so
extraction, validation and database calls never block the event loop.
"""

import asyncio
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from app.api.auth import AdminToken
from app.api.deps import DatabaseDep, SettingsDep, within_database_timeout
from app.api.schemas import (
    ClassPublic,
    DatasetPublic,
    DatasetsPublic,
    Printable,
    error_responses,
)
from app.store.db import DatasetRecord
from app.training import datasets

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[AdminToken],
    responses=error_responses(401, 403, 503),
)


def to_public(record: DatasetRecord) -> DatasetPublic:
    return DatasetPublic(
        id=record.id,
        name=record.name,
        num_images=record.num_images,
        num_annotations=record.num_annotations,
        categories=[ClassPublic(**c) for c in record.categories],
        size_bytes=record.size_bytes,
        created_at=record.created_at,
    )


def default_name(filename: str | None) -> str:
    """The upload's file name without folders and suffix (``shapes.zip`` → ``shapes``)."""
    stem = PurePosixPath((filename or "").replace("\\", "/")).stem.strip()
    return stem[:200] or "dataset"


@router.post(
    "",
    name="create_dataset",
    status_code=201,
    response_model=DatasetPublic,
    responses=error_responses(400, 413, 422),
)
def create_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="a zip: `annotations.json` (COCO instances) at its root and the "
            "JPEG, PNG, WebP or BMP images it names by `file_name`"
        ),
    ],
    response: Response,
    db: DatabaseDep,
    settings: SettingsDep,
    name: Annotated[
        Printable | None,
        Form(min_length=1, max_length=200, description="default: the zip's name"),
    ] = None,
) -> DatasetPublic:
    """Upload a COCO dataset zip. It is checked in full (paths, sizes, every image
    header and annotation) and stored only when it passes; a 400 lists every problem."""
    record = datasets.store_dataset(
        file.file, name=name or default_name(file.filename), db=db, settings=settings
    )
    response.headers["Location"] = f"{router.prefix}/{record.id}"
    return to_public(record)


@router.get("", name="list_datasets", response_model=DatasetsPublic)
@within_database_timeout
def list_datasets(
    db: DatabaseDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetsPublic:
    """Stored datasets, newest first."""
    records, total = datasets.list_datasets(db, offset=offset, limit=limit)
    return DatasetsPublic(data=[to_public(r) for r in records], count=total)


@router.get(
    "/{dataset_id}",
    name="get_dataset",
    response_model=DatasetPublic,
    responses=error_responses(404),
)
@within_database_timeout
def get_dataset(dataset_id: str, db: DatabaseDep) -> DatasetPublic:
    """One dataset by id."""
    return to_public(datasets.get_dataset(db, dataset_id))


@router.delete(
    "/{dataset_id}",
    name="delete_dataset",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409),
)
async def delete_dataset(dataset_id: str, db: DatabaseDep) -> Response:
    """Delete a dataset and its files; 409 while a queued or running training job uses it."""
    key = await db.run(datasets.delete_dataset, db, dataset_id)
    # not under the database's timeout: the object store's calls, after the row
    await asyncio.to_thread(datasets.remove_dataset_files, db, key)
    return Response(status_code=204)
