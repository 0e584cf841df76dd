"""Models as files for other engines (``GET /v1/models/{id}/export``): the ONNX
graph and class table ``model.export`` writes, made once per model on the CPU and
kept under ``DATA_DIR/exports``; a Triton model folder is zipped from them."""

import hashlib
import io
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

from app.serving.loading import ModelSpec
from model import load_model, triton_config, write_model_files

ONNX_FILE, CLASSES_FILE = "model.onnx", "classes.json"
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _key(spec: ModelSpec, model_id: str) -> str:
    """The model's name in the cache: its id and source, and the source file's
    size and time when it is one (a start-up file may change between runs)."""
    parts = [model_id, spec.source, spec.classes_file or ""]
    if os.path.isfile(spec.source):
        stat = os.stat(spec.source)
        parts += [str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def exported(spec: ModelSpec, model_id: str, data_dir: Path) -> Path:
    """The folder holding ``model.onnx`` and ``classes.json`` of the model (blocking:
    the first call exports, about 20 s for R50-FPN on a CPU; one at a time per model)."""
    key = _key(spec, model_id)
    folder = data_dir / "exports" / key
    with _locks_lock:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if (folder / ONNX_FILE).is_file():
            return folder
        loaded = load_model(
            spec.source, classes_file=spec.classes_file, model_id=spec.model_id, device="cpu"
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        try:
            write_model_files(loaded.network, loaded.info, partial)
            os.replace(partial, folder)  # whole or not at all, also for other replicas
        except OSError:
            if not (folder / ONNX_FILE).is_file():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def triton_zip(folder: Path, name: str) -> bytes:
    """A Triton model repository entry as a zip: ``name/config.pbtxt``,
    ``name/1/model.onnx``, ``name/classes.json``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}/config.pbtxt", triton_config(name))
        archive.write(folder / ONNX_FILE, f"{name}/1/{ONNX_FILE}")
        archive.write(folder / CLASSES_FILE, f"{name}/{CLASSES_FILE}")
    return buffer.getvalue()
