"""The job store, dataset records and model registry, in SQLAlchemy.

A SQLite file under ``DATA_DIR`` by default; PostgreSQL when ``DATABASE_URL``
says so (required with several replicas). ``Database.create_schema`` runs at
start-up in every process (API server, worker, training child); it creates
missing tables and records the schema version, refusing a database written by a
newer version of the service.

Files (dataset folders, checkpoints) live under ``DATA_DIR``; rows hold their
paths relative to it, so every replica mounting the same volume finds them.

Times are timezone-aware UTC. Ids carry a prefix saying what they name:
``ds-…`` datasets, ``job-…`` training jobs, ``model-…`` trained model versions.
"""

import asyncio
import contextlib
import fcntl
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from app.errors import DatabaseUnavailableError
from app.settings import Settings
from app.store.objects import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
DEFAULT_TIMEOUT_S = 5.0  # DATABASE_TIMEOUT_S
BACKGROUND_TIMEOUT_S = 30.0  # the training worker and training processes may wait longer
THREADS = 4  # the database's own threads in one process

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATES = ("queued", "running")  # a job in these still needs its dataset and base


class DatabaseUnreachable(Exception):
    """The database refused or dropped every try for as long as a caller could wait."""


def retrying(call: Callable[[], T], *, within_s: float, what: str) -> T:
    """``call()``, tried again with backoff (0.1 s doubling to 2 s) while the
    database refuses, drops or times out, for up to ``within_s``; then
    ``DatabaseUnreachable`` naming ``what`` and the last error. Only for calls
    that may run twice: each of the job store's writes is one conditional
    statement, so a repeat after an answer lost on the way does no harm."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            return call()
        except (OperationalError, InterfaceError, PoolTimeoutError) as e:
            if time.monotonic() + delay > deadline:
                reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                raise DatabaseUnreachable(
                    f"the database was unreachable for {within_s:g} s ({what}): {reason}"
                ) from e
            log.warning("database unavailable (%s); retrying in %.1f s: %s", what, delay, e)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


class UtcDateTime(TypeDecorator):
    """``DateTime(timezone=True)``; SQLite drops the zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {datetime: UtcDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value rows: ``schema_version``, ``active_model`` (the id every replica
    serves) and ``active_model_changed_at``."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DatasetRecord(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text, doc="folder relative to DATA_DIR")
    num_images: Mapped[int] = mapped_column(Integer)
    num_annotations: Mapped[int] = mapped_column(Integer)
    categories: Mapped[list[Any]] = mapped_column(doc="[{id, name}, ...]")
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingJobRecord(Base):
    __tablename__ = "training_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    dataset_id: Mapped[str] = mapped_column(
        String(32), index=True, doc="kept as history after the dataset is deleted"
    )
    config: Mapped[dict[str, Any]] = mapped_column(doc="the request: base_model, epochs, ...")
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[list[Any]] = mapped_column(default=list, doc="one dict per epoch")
    model_id: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelRecord(Base):
    """An immutable trained model version."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    architecture: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="checkpoint relative to DATA_DIR")
    classes: Mapped[list[Any]] = mapped_column(doc="[{id, name}, ...] without background")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    base_model: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    dataset_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SchemaError(RuntimeError):
    """The database was written by a newer version of the service."""


class Database:
    """An engine and a session factory for one ``DATABASE_URL``.

    ``timeout_s`` bounds connecting, waiting for a pooled connection, each
    statement on PostgreSQL, waiting for a lock on SQLite, and every call made through
    ``run``, which the server uses so that a slow or stalled database holds
    none of the threads anything else needs."""

    @classmethod
    def from_settings(cls, settings: Settings, *, background: bool = False) -> "Database":
        """The database ``DATABASE_URL`` names (by default a SQLite file), its files
        under ``DATA_DIR``; a call waits ``DATABASE_TIMEOUT_S``, or in ``background``
        work (the worker, a training process) ``BACKGROUND_TIMEOUT_S``."""
        return cls(
            settings.database_url_or_default,
            data_dir=settings.data_dir,
            timeout_s=BACKGROUND_TIMEOUT_S if background else settings.database_timeout_s,
            storage_url=settings.storage_url,
        )

    def __init__(
        self,
        url: str,
        *,
        data_dir: Path,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        storage_url: str = "",
    ):
        """``storage_url``: where the files its rows name live (``app.store.objects``;
        empty: ``data_dir``)."""
        self.url = url
        self.data_dir = Path(data_dir)
        self.objects = ObjectStore(storage_url, self.data_dir)
        self.timeout_s = timeout_s
        self.engine: Engine = _make_engine(url, timeout_s)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._threads: ThreadPoolExecutor | None = None

    async def run(self, call: Callable, /, *args, **kwargs):
        """``call(*args, **kwargs)`` in the database's own threads (``THREADS``), or
        ``DatabaseUnavailableError`` when it takes longer than ``timeout_s``: the
        caller is answered in time, and a thread stuck on a stalled connection
        stays the database's (calls queued behind it time out too)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="maskrcnn-db")
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._threads, functools.partial(call, *args, **kwargs))
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            raise DatabaseUnavailableError(
                f"the database did not answer within {self.timeout_s:g} s (DATABASE_TIMEOUT_S)"
            ) from None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    def create_schema(self) -> None:
        """Create what is missing and check/record ``SCHEMA_VERSION`` (idempotent,
        safe when several processes start at once)."""
        with self._creation_lock(), Session(self.engine) as session, session.begin():
            if self.is_postgresql:  # serialise concurrent start-ups on one database
                session.execute(text("SET LOCAL statement_timeout = 0"))  # the lock may wait
                session.execute(text("SELECT pg_advisory_xact_lock(724513)"))
            Base.metadata.create_all(session.connection())
            row = session.get(Meta, "schema_version")
            if row is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise SchemaError(
                    f"the database at {self.engine.url.render_as_string()} has schema version "
                    f"{row.value}; this service knows up to {SCHEMA_VERSION}: upgrade the service"
                )

    @contextlib.contextmanager
    def _creation_lock(self) -> Iterator[None]:
        """On SQLite, a file lock beside the database: ``create_all`` checks, then
        creates, so two processes starting at once (an API server and its embedded
        worker) would otherwise both try to create a table. PostgreSQL uses an
        advisory lock inside the transaction instead."""
        if not self.is_sqlite or not self.engine.url.database:
            yield
            return
        path = Path(self.engine.url.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def dispose(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def _make_engine(url: str, timeout_s: float) -> Engine:
    if url.startswith("sqlite"):
        # a writer waits at most timeout_s for another process's lock, so a call that
        # Database.run gave up on does not complete later behind its caller's back
        connect_args = {"check_same_thread": False, "timeout": timeout_s}
        engine = create_engine(url, connect_args=connect_args)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
            cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not psycopg2
    connect_args = {
        "connect_timeout": max(1, math.ceil(timeout_s)),
        "options": f"-c statement_timeout={int(timeout_s * 1000)}",
    }
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=timeout_s,
        connect_args=connect_args,
    )
