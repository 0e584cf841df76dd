"""Where datasets and model checkpoints live: ``STORAGE_URL``.

By default that is ``DATA_DIR`` itself, as on one machine or a shared volume. It
may instead be any fsspec URL, ``s3://bucket/prefix`` above all (s3fs: credentials,
region and endpoint from the standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for
an S3-compatible store such as MinIO). ``DATA_DIR`` is then each process's own
cache and scratch: no replica or worker needs another's disk.

Rows name objects by key, relative to the store (``datasets/ds-…``,
``models/model-….safetensors``), so the local layout is the same either way. Keys
are never reused or rewritten: an object cached once stays valid.

- ``put``: what a process wrote under its ``DATA_DIR`` (a file, or a folder's
  files) goes to the store; it is complete there before any row names it.
- ``fetch_file`` / ``fetch_folder``: the local copy, fetched into the cache on
  first use (into ``DATA_DIR/tmp``, then renamed into place: a half-fetched copy
  is never seen). Processes that want one key at once fetch it once: the others
  wait on a lock file and find it there.
- ``delete``: the object(s) in the store and the local copy.

Messages name a key and ``STORAGE_URL``, never its value; the log has the store's
own reason.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.errors import UnavailableError

log = logging.getLogger(__name__)


class StorageError(UnavailableError):
    """The object store refused or failed a call (503; the reason is logged)."""

    code = "storage_unavailable"

    def __init__(self, message: str):
        super().__init__(message, retry_after=5)


class ObjectStore:
    def __init__(self, url: str, cache: Path):
        """``url``: an fsspec URL, or empty for ``cache`` itself (``DATA_DIR``)."""
        self.cache = Path(cache)
        self.url = url or str(self.cache)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        if isinstance(self.fs, LocalFileSystem):
            self.fs = LocalFileSystem(auto_mkdir=True)  # put() makes the folders it needs
            # the same folder as the cache: nothing to copy, ever
            self.remote = Path(self.root).resolve() != self.cache.resolve()
        else:
            self.remote = True

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, cache={str(self.cache)!r})"

    def local(self, key: str) -> Path:
        """Where ``key`` is (or will be) on this machine."""
        return self.cache / key

    def location(self, key: str) -> str:
        """``key`` for a message: its local path, or its key in ``STORAGE_URL``."""
        return f"STORAGE_URL/{key}" if self.remote else str(self.local(key))

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- writing ------------------------------------------------------------------------

    def put(self, key: str) -> None:
        """Copy ``local(key)``, a file or a folder's files, to the store."""
        if not self.remote:
            return
        source = self.local(key)
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file())
            targets = [self._path(f"{key}/{p.relative_to(source).as_posix()}") for p in files]
            sources = [str(p) for p in files]
        else:
            sources, targets = [str(source)], [self._path(key)]
        with self._calling("storing", key):
            if sources:
                self.fs.put(sources, targets)
        log.info("stored %s in the object store (%d files)", key, len(sources))

    def delete(self, key: str, *, folder: bool = False) -> None:
        """Remove ``key`` (with ``folder``: everything under it) from this machine and
        from the store; nothing there is not an error. A local copy that cannot be
        removed raises ``OSError``."""
        local = self.local(key)
        if folder:
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        if not self.remote:
            return
        # the inner suppress: never stored, or deleted already
        with self._calling("deleting", key), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key), recursive=folder)

    def discard(self, key: str, *, folder: bool = False) -> None:
        """``delete`` what no row names any more: a failure is logged, not raised
        (what could not be deleted stays, named by nothing)."""
        try:
            self.delete(key, folder=folder)
        except (StorageError, OSError) as e:
            log.warning("could not delete %s (%s); it stays, named by no row", key, e)

    # -- reading ------------------------------------------------------------------------

    def fetch_file(self, key: str) -> Path:
        """The local copy of the file ``key``; ``FileNotFoundError`` if the store has
        none."""
        local = self.local(key)
        if not self.remote or local.is_file():
            if not local.is_file():
                raise FileNotFoundError(f"{self.location(key)} does not exist")
            return local
        with self._fetching(local, folder=False) as staged:
            if staged is not None:
                with self._calling("fetching", key, missing=True):
                    self.fs.get_file(self._path(key), str(staged))
                log.info("fetched %s from the object store", key)
        return local

    def fetch_folder(self, key: str) -> Path:
        """The local copy of the folder ``key``; ``FileNotFoundError`` if the store has
        nothing under it."""
        local = self.local(key)
        if not self.remote or local.is_dir():
            if not local.is_dir():
                raise FileNotFoundError(f"{self.location(key)} does not exist")
            return local
        prefix = self._path(key)
        with self._fetching(local, folder=True) as staged:
            if staged is not None:
                with self._calling("fetching", key, missing=True):
                    self.fs.invalidate_cache(prefix)  # a listing from before it was stored
                    found = self.fs.find(prefix)
                    if not found:
                        raise FileNotFoundError(f"{self.location(key)} does not exist")
                    relative = [posixpath.relpath(p, prefix) for p in found]
                    for name in relative:
                        (staged / name).parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get(found, [str(staged / name) for name in relative])
                log.info("fetched %s from the object store (%d files)", key, len(found))
        return local

    @contextlib.contextmanager
    def _fetching(self, local: Path, *, folder: bool) -> Iterator[Path | None]:
        """Under a lock per key: ``None`` when another process fetched ``local``
        meanwhile, else a path under ``DATA_DIR/tmp`` to fetch into, renamed to
        ``local`` when the block succeeds."""
        scratch = self.cache / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(local).encode()).hexdigest()[:16]
        with open(scratch / f"fetch-{digest}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if local.exists():
                yield None
                return
            staged = scratch / f"fetch-{local.name}-{uuid.uuid4().hex[:8]}"
            if folder:
                staged.mkdir()
            try:
                yield staged
                os.rename(staged, local)
            finally:
                if staged.is_dir():
                    shutil.rmtree(staged, ignore_errors=True)
                else:
                    staged.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _calling(self, doing: str, key: str, *, missing: bool = False) -> Iterator[None]:
        """The store's failures as ``StorageError``; with ``missing``, a missing
        object stays ``FileNotFoundError`` (a missing bucket is a failure either way
        when writing)."""
        try:
            yield
        except FileNotFoundError as e:
            if missing:
                raise FileNotFoundError(f"{self.location(key)} does not exist") from e
            log.error("object store %s: %s %s failed: not found (%s)", self.url, doing, key, e)
            raise StorageError(f"the object store failed {doing} {key} (STORAGE_URL)") from None
        except Exception as e:
            log.error("object store %s: %s %s failed: %s", self.url, doing, key, e)
            raise StorageError(f"the object store failed {doing} {key} (STORAGE_URL)") from e
