"""Uploaded COCO datasets: validated in full before they are stored.

A zip is extracted into a fresh folder under ``DATA_DIR/tmp/`` (``app.inputs.archive``),
its ``annotations.json`` checked against the files (``model.training.validation``), and
only then renamed, in one atomic step on the same volume, to
``DATA_DIR/datasets/<id>/`` — which ``model.training.dataset.CocoDataset`` reads as is.
On any rejection or error the temporary folder is removed: a refused upload
leaves nothing on disk. These functions block (disk, database); routes call
them from worker threads.
"""

import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select

from app.errors import ConflictError, NotFoundError, QuotaError
from app.inputs.archive import ArchiveLimits, Extracted, extract_zip
from app.settings import Settings
from app.store.db import ACTIVE_STATES, Database, DatasetRecord, TrainingJobRecord, new_id
from app.store.staging import publish, staging
from model import (
    ANNOTATIONS_FILE,
    CocoDataset,
    DatasetError,
    load_coco,
    split_dataset,
    validate_coco,
)

log = logging.getLogger(__name__)

MAX_PROBLEMS = 50
MAX_ANNOTATIONS_BYTES = 512 * 2**20  # json.loads needs several times this in memory
STALE_STAGING_S = 24 * 3600  # far longer than any upload takes to extract and check


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=settings.max_dataset_files,
        max_total_bytes=settings.max_dataset_unpacked_bytes,
        max_problems=MAX_PROBLEMS,
    )


def store_dataset(
    upload: BinaryIO, *, name: str, db: Database, settings: Settings
) -> DatasetRecord:
    """Validate the zip ``upload`` and store it as a new dataset; ``DatasetError``
    (400) lists what is wrong with a refused one; 429 ``too_many_datasets`` when
    ``MAX_DATASETS`` are stored (checked before the upload is read, and again
    before it is stored: a few more may pass when uploads race)."""
    check_dataset_count(db, settings.max_datasets)
    dataset_id = new_id("ds")
    relative = f"datasets/{dataset_id}"
    final = db.objects.local(relative)
    with staging(db.data_dir, f"{dataset_id}-") as staged:
        extracted, coco = check_upload(upload, staged, settings)
        publish(staged, final)
    record = DatasetRecord(
        id=dataset_id,
        name=name,
        path=relative,
        num_images=len(coco["images"]),
        num_annotations=len(coco["annotations"]),
        categories=sorted(
            ({"id": c["id"], "name": c["name"]} for c in coco["categories"]),
            key=lambda c: c["id"],
        ),
        size_bytes=extracted.total_bytes,
    )
    try:
        db.objects.put(relative)  # whole in the store before the row names it
        check_dataset_count(db, settings.max_datasets)
        with db.session() as session:
            session.add(record)
    except BaseException:
        db.objects.discard(relative, folder=True)
        raise
    log.info("dataset %s stored: %d images", dataset_id, record.num_images)
    return record


def check_dataset_count(db: Database, limit: int) -> None:
    with db.session() as session:
        stored = session.scalar(select(func.count()).select_from(DatasetRecord))
    if stored >= limit:
        raise QuotaError(
            f"{stored} datasets are stored; at most {limit} (MAX_DATASETS): delete one "
            "with DELETE /v1/datasets/{id} first",
            code="too_many_datasets",
        )


def check_upload(upload: BinaryIO, staging: Path, settings: Settings) -> tuple[Extracted, dict]:
    """Extract into ``staging`` and check every file and annotation."""
    extracted = extract_zip(upload, staging, archive_limits(settings))
    coco = read_annotations(extracted)
    check_counts(coco, settings)
    problems = validate_coco(
        coco,
        extracted,
        check_images=True,
        max_pixels=settings.max_image_pixels,
        max_problems=MAX_PROBLEMS,
    )
    if problems:
        raise DatasetError("the dataset was rejected", problems)
    return extracted, coco


def check_counts(coco: dict, settings: Settings) -> None:
    """Images, annotations and categories within their settings, before anything
    looks at them one by one."""
    limits = (
        ("images", settings.max_dataset_images, "MAX_DATASET_IMAGES"),
        ("annotations", settings.max_dataset_annotations, "MAX_DATASET_ANNOTATIONS"),
        ("categories", settings.max_dataset_categories, "MAX_DATASET_CATEGORIES"),
    )
    problems = [
        f"{ANNOTATIONS_FILE} lists {len(coco[key])} {key}; at most {limit} ({setting})"
        for key, limit, setting in limits
        if len(coco[key]) > limit
    ]
    if problems:
        raise DatasetError("the dataset was rejected", problems)


def read_annotations(extracted: Extracted) -> dict:
    if not extracted.exists(ANNOTATIONS_FILE):
        nested = sorted(f for f in extracted.files if f.endswith("/" + ANNOTATIONS_FILE))
        hint = (
            f" (found {nested[0]!r}: zip the folder's contents, not the folder)" if nested else ""
        )
        raise DatasetError(f"the zip has no {ANNOTATIONS_FILE} at its root{hint}")
    path = extracted.root / ANNOTATIONS_FILE
    if path.stat().st_size > MAX_ANNOTATIONS_BYTES:
        raise DatasetError(
            f"{ANNOTATIONS_FILE} is {path.stat().st_size} bytes; at most {MAX_ANNOTATIONS_BYTES}"
        )
    try:
        return load_coco(path.read_bytes())
    except ValueError as e:
        raise DatasetError(f"{ANNOTATIONS_FILE}: {e}") from None


def list_datasets(db: Database, *, offset: int, limit: int) -> tuple[list[DatasetRecord], int]:
    """Newest first, and how many there are in all."""
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(DatasetRecord)) or 0
        rows = session.scalars(
            select(DatasetRecord)
            .order_by(DatasetRecord.created_at.desc(), DatasetRecord.id)
            .offset(offset)
            .limit(limit)
        ).all()
    return list(rows), total


def get_dataset(db: Database, dataset_id: str) -> DatasetRecord:
    with db.session() as session:
        record = session.get(DatasetRecord, dataset_id)
    if record is None:
        raise _not_found(dataset_id)
    return record


def delete_dataset(db: Database, dataset_id: str) -> str:
    """Remove the row; returns the key of its files, for ``remove_dataset_files``.
    409 while a queued or running job uses it; finished jobs keep the id as history."""
    with db.session() as session:
        record = session.get(DatasetRecord, dataset_id, with_for_update=True)
        if record is None:
            raise _not_found(dataset_id)
        jobs = session.execute(
            select(TrainingJobRecord.id, TrainingJobRecord.state).where(
                TrainingJobRecord.dataset_id == dataset_id,
                TrainingJobRecord.state.in_(ACTIVE_STATES),
            )
        ).all()
        active = [f"{job_id} ({state})" for job_id, state in jobs]
        if active:
            raise ConflictError(
                f"dataset {dataset_id!r} is used by training job {', '.join(active)}; "
                "cancel the job or wait for it to finish, then delete the dataset"
            )
        session.delete(record)
    return record.path


def validation_image(path: Path, val_fraction: float, seed: int, index: int) -> bytes:
    """The file of the ``index``-th image (wrapping around) of the validation split
    that a job with this ``val_fraction`` and ``seed`` holds out of the dataset at
    ``path`` (the same ``split_dataset`` call as training), or of the whole dataset
    when the job holds nothing out. Blocking: reads the annotations."""
    dataset = CocoDataset(path)  # checked again: a file name cannot leave ``path``
    _, held_out = split_dataset(dataset, val_fraction, seed=seed)
    images = (held_out or dataset).images
    return (path / images[index % len(images)]["file_name"]).read_bytes()


def remove_dataset_files(db: Database, relative: str) -> None:
    """After its row: rename the local copy out of ``datasets/`` first (atomic), so a
    half-deleted folder is never visible under the dataset's path; then the store's
    (a store that fails leaves objects no row names, and says so)."""
    folder = db.objects.local(relative)
    trash: Path | None = db.data_dir / "tmp" / f"deleted-{folder.name}-{new_id('rm')}"
    try:
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, trash)
    except FileNotFoundError:
        trash = None  # not on this machine
    except OSError as e:
        log.warning("could not move %s away for deletion: %s", folder, e)
        trash = folder
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    db.objects.discard(relative, folder=True)


def sweep_staging(data_dir: Path, *, older_than_s: float = STALE_STAGING_S) -> int:
    """Remove what a crashed process left under ``DATA_DIR/tmp/`` (half-extracted
    uploads, half-deleted datasets); returns how many entries went. Only old ones:
    another replica sharing the volume may be extracting an upload right now."""
    root = data_dir / "tmp"
    if not root.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for entry in root.iterdir():
        try:
            if entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError as e:
            log.warning("could not remove the stale %s: %s", entry, e)
    if removed:
        log.info("removed %d stale entries from %s", removed, root)
    return removed


def _not_found(dataset_id: str) -> NotFoundError:
    return NotFoundError(f"no dataset with id {dataset_id!r}; GET /v1/datasets lists them")
