"""The model registry's read side and the active model.

Ids a replica can serve, and so activate:

* registry ids (``model-…``): trained versions, ``app.store.db.ModelRecord`` rows whose
  checkpoint lies under ``DATA_DIR``;
* the built-in specs ``demo``, ``coco`` and ``coco-v2``;
* the id of the replica's start-up model, ``MASKRCNN_MODEL``: the spec itself, or
  a checkpoint file's name without its suffix (``tiny`` for ``/m/tiny.safetensors``).
  Activating that id loads ``MASKRCNN_MODEL`` again, so it names the same file on
  every replica only where they share that setting (they normally do).

The active model is the ``Meta`` row ``active_model``; ``active_model_changed_at``
changes with every activation, even of the same id, so a replica that failed to
load a version tries again when an operator activates it again.
"""

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.errors import AppError, ConflictError, NotFoundError
from app.settings import Settings
from app.store.db import (
    ACTIVE_STATES,
    JOB_STATES,
    Database,
    DatasetRecord,
    Meta,
    ModelRecord,
    TrainingJobRecord,
    utcnow,
)
from model import (
    BUILTIN_MODELS,
    METADATA_KEY,
    MODEL_SPECS,
    CheckpointError,
    ModelInfo,
    class_table_from_metadata,
    read_classes_file,
    spec_names,
)

log = logging.getLogger(__name__)
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass(frozen=True)
class Activation:
    """One activation recorded in the database: which id, and when."""

    model_id: str
    changed_at: str


def startup_model_id(spec: str) -> str | None:
    """The id a start-up spec is served under (``None`` for ``auto``: ``coco`` or
    ``demo``, known once loaded)."""
    if spec == "auto":
        return None
    path = Path(spec)
    if path.suffix.lower() in _FILE_SUFFIXES or path.is_file():
        return path.stem
    return spec


def read_activation(db: Database) -> Activation | None:
    with db.session() as session:
        rows = dict(
            session.execute(
                select(Meta.key, Meta.value).where(
                    Meta.key.in_(("active_model", "active_model_changed_at"))
                )
            ).all()
        )
    if "active_model" not in rows:
        return None
    return Activation(rows["active_model"], rows.get("active_model_changed_at", ""))


def write_activation(db: Database, model_id: str, *, registered: bool = False) -> Activation:
    """Make ``model_id`` the model every replica serves (one transaction). A
    ``registered`` version must still be there (``NotFoundError`` if it was deleted
    while it loaded here): its row is locked as ``delete_record`` locks it."""
    activation = Activation(model_id, utcnow().isoformat())
    with db.session() as session:
        if registered and session.get(ModelRecord, model_id, with_for_update=True) is None:
            raise NotFoundError(f"model {model_id!r} was deleted while it was being activated")
        session.merge(Meta(key="active_model", value=model_id, updated_at=utcnow()))
        session.merge(
            Meta(key="active_model_changed_at", value=activation.changed_at, updated_at=utcnow())
        )
    return activation


def list_records(db: Database) -> list[ModelRecord]:
    """Registered versions, newest first."""
    with db.session() as session:
        query = select(ModelRecord).order_by(ModelRecord.created_at.desc(), ModelRecord.id)
        return list(session.scalars(query))


def get_record(db: Database, model_id: str) -> ModelRecord | None:
    with db.session() as session:
        return session.get(ModelRecord, model_id)


def delete_record(db: Database, model_id: str) -> str:
    """Remove a registered version's row; returns its checkpoint's key (for
    ``db.objects.discard``). 404 for an id that is no registered version (the
    built-in ones included); 409 while it is the active model or the base of a
    queued or running job."""
    with db.session() as session:
        record = session.get(ModelRecord, model_id, with_for_update=True)
        if record is None:
            raise NotFoundError(
                f"no registered model {model_id!r}; GET /v1/models lists them (the built-in "
                "ones cannot be deleted)"
            )
        active = session.get(Meta, "active_model")
        if active is not None and active.value == model_id:
            raise ConflictError(
                f"model {model_id!r} is the active model; activate another one first"
            )
        waiting = session.scalars(
            select(TrainingJobRecord).where(TrainingJobRecord.state.in_(ACTIVE_STATES))
        )
        using = [f"{j.id} ({j.state})" for j in waiting if j.config.get("base_model") == model_id]
        if using:
            raise ConflictError(
                f"model {model_id!r} is the base model of training job {', '.join(using)}; "
                "cancel the job or wait for it to finish, then delete the model"
            )
        session.delete(record)
    log.info("model %s deleted", model_id)
    return record.path


def count_jobs(db: Database) -> dict[str, int]:
    """Training jobs by state, every state present (zeros included)."""
    with db.session() as session:
        query = select(TrainingJobRecord.state, func.count()).group_by(TrainingJobRecord.state)
        counts = dict(session.execute(query).all())
    return {state: int(counts.get(state, 0)) for state in JOB_STATES}


def resolve_model_spec(
    settings: Settings,
    *,
    model: str | None = None,
    db: Database | None = None,
    names: str = spec_names(MODEL_SPECS),
) -> tuple[str, str | None]:
    """``(spec for model.loading.load_model, model_id)`` of ``model`` (default:
    ``MODEL``): a registry id becomes its checkpoint's path and keeps its id,
    looked up in ``db`` (default: the settings' database, opened for this);
    anything else passes through. ``names``: the names the caller takes, for the
    error about a spec that is none of these."""
    spec = settings.model if model is None else model
    if spec == "auto" or spec in BUILTIN_MODELS or Path(spec).exists():
        return spec, None
    with database(settings, db) as db:
        try:
            record = get_record(db, spec)
        except SQLAlchemyError as e:  # no database or no schema yet: not a registry id
            log.debug("registry lookup of %r failed: %s", spec, e)
            record = None
    if record is None:
        raise CheckpointError(
            f"model {spec!r}: not {names}, an existing file, nor a model id in the registry "
            f"(MASKRCNN_DATABASE_URL, MASKRCNN_DATA_DIR={settings.data_dir})"
        )
    try:
        path = db.objects.fetch_file(record.path)  # into this replica's cache, once
    except FileNotFoundError:
        raise CheckpointError(
            f"model {spec!r}: its checkpoint {db.objects.location(record.path)} is missing; "
            "every replica needs the same store: one STORAGE_URL, or a shared DATA_DIR volume"
        ) from None
    return str(path), record.id


def training_images(settings: Settings, model_id: str, db: Database | None = None) -> Path | None:
    """The folder of the dataset registry model ``model_id`` was trained on, while it
    is still there (``None`` otherwise)."""
    with database(settings, db) as db:
        with db.session() as session:
            record = session.get(ModelRecord, model_id)
            dataset_id = record.dataset_id if record else None
            dataset = session.get(DatasetRecord, dataset_id) if dataset_id else None
        if dataset is None:
            return None
        try:
            return db.objects.fetch_folder(dataset.path)
        except FileNotFoundError:
            return None


@contextlib.contextmanager
def database(settings: Settings, db: Database | None) -> Iterator[Database]:
    """``db``, or the settings' database opened for the block."""
    if db is not None:
        yield db
        return
    own = Database.from_settings(settings)
    try:
        yield own
    finally:
        own.dispose()


def describe_spec(spec: str, classes_file: Path | None = None) -> ModelInfo | None:
    """A start-up spec's id and class table without building its network (to list
    it while another model is served); ``None`` where only loading tells (a
    ``.pth`` file, an unreadable one)."""
    from model import DEMO_CHECKPOINT, PRETRAINED, cached_weights_path

    if spec == "auto":
        spec = "coco" if cached_weights_path(PRETRAINED["coco"]).is_file() else "demo"
    if spec in PRETRAINED:
        pretrained = PRETRAINED[spec]
        ids = tuple(range(len(pretrained.categories)))
        return ModelInfo(spec, pretrained.architecture, ids, pretrained.categories, kind="coco")
    path = DEMO_CHECKPOINT if spec == "demo" else Path(spec)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {})[METADATA_KEY])
        ids, names = class_table_from_metadata(metadata["classes"])
        if classes_file and spec != "demo":
            names = read_classes_file(str(classes_file), len(ids))
        model_id = "demo" if spec == "demo" else path.stem
        kind = "demo" if spec == "demo" else "custom"
        return ModelInfo(model_id, metadata["architecture"], ids, names, kind=kind)
    except Exception as e:  # listing must not fail on a file only loading would judge
        log.debug("cannot describe %s without loading it: %s", path, e)
        return None


class ActivationError(AppError):
    """The model could not be loaded or warmed up; the served one is unchanged."""

    status_code, code = 500, "activation_failed"
