"""Models as files for other engines (``GET /v1/models/{id}/export``): the ONNX
graph and class table ``model.export`` writes, made once per model on the CPU and
kept under ``DATA_DIR/exports``; a Triton model folder is zipped from them once per
name. Exports run one at a time, in a thread of their own: one never holds the
threads that activation and on-demand loading use."""

import asyncio
import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision

from app.serving.loading import ModelSpec
from app.store.staging import publish, staging
from model import ONNX_OPSET, load_model, triton_config, write_model_files

ONNX_FILE, CLASSES_FILE = "model.onnx", "classes.json"
# what the graph depends on besides the model: a new exporter makes new files
EXPORTER = f"opset {ONNX_OPSET}, torch {torch.__version__}, torchvision {torchvision.__version__}"
_EXPORTS = ThreadPoolExecutor(1, thread_name_prefix="maskrcnn-export")


def _stat(path: str | None) -> list[str]:
    if path is None or not os.path.isfile(path):
        return []
    stat = os.stat(path)
    return [str(stat.st_size), str(stat.st_mtime_ns)]


def _key(spec: ModelSpec, model_id: str) -> str:
    """The model's name in the cache: its id, source and classes file (with their
    size and time when they are files: a start-up file may change between runs),
    and the exporter."""
    parts = [model_id, spec.source, *_stat(spec.source), spec.classes_file or ""]
    parts += [*_stat(spec.classes_file), EXPORTER]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _publish(data_dir: Path, folder: Path, write) -> None:
    """``write(staged)`` fills a staging folder, which then becomes ``folder``
    whole; another replica's, if it came first, is kept."""
    with staging(data_dir, f"export-{folder.name}-") as staged:
        write(staged)
        try:
            publish(staged, folder)
        except OSError:
            if not folder.is_dir():
                raise


def _exported(spec: ModelSpec, model_id: str, data_dir: Path) -> Path:
    folder = data_dir / "exports" / _key(spec, model_id)
    if not (folder / ONNX_FILE).is_file():
        loaded = load_model(
            spec.source, classes_file=spec.classes_file, model_id=spec.model_id, device="cpu"
        )
        _publish(data_dir, folder, lambda to: write_model_files(loaded.network, loaded.info, to))
    return folder


def _triton_zip(folder: Path, name: str, data_dir: Path) -> Path:
    """``name/config.pbtxt``, ``name/1/model.onnx`` (stored: float weights do not
    compress) and ``name/classes.json``, zipped next to the export."""
    zipped = folder / "triton" / name / f"{name}.zip"
    if not zipped.is_file():

        def write(to: Path) -> None:
            with zipfile.ZipFile(to / zipped.name, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(f"{name}/config.pbtxt", triton_config(name))
                archive.write(folder / ONNX_FILE, f"{name}/1/{ONNX_FILE}", zipfile.ZIP_STORED)
                archive.write(folder / CLASSES_FILE, f"{name}/{CLASSES_FILE}")

        _publish(data_dir, zipped.parent, write)
    return zipped


async def exported(spec: ModelSpec, model_id: str, data_dir: Path) -> Path:
    """The folder holding ``model.onnx`` and ``classes.json`` of the model; the first
    call exports (about 20 s for R50-FPN on a CPU)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_EXPORTS, _exported, spec, model_id, data_dir)


async def triton_zip(folder: Path, name: str, data_dir: Path) -> Path:
    """The zip of a Triton model folder ``name`` made from an export ``folder``."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_EXPORTS, _triton_zip, folder, name, data_dir)
