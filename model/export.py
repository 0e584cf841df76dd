"""A network as an ONNX file, and as a model folder for Triton's ONNX Runtime
backend.

torchvision's own forward is exported, with the TorchScript exporter (``dynamo=False``),
so the graph does what ``network([image])`` does: one image in, as float32 RGB in
[0, 1] shaped ``(3, height, width)`` of any size; its resize and normalisation,
torchvision's thresholds (scores of at least ``roi_heads.score_thresh``, at most
``roi_heads.detections_per_img`` detections) and soft masks pasted at the image's
size, all inside the graph. Inputs and outputs are named as torchvision names them:
``images`` → ``boxes`` (x1, y1, x2, y2 in the image's pixels), ``labels`` (the
network's label: an index into the class table), ``scores``, ``masks``
(``(n, 1, height, width)`` probabilities; binarise at 0.5).
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from model.info import ModelInfo

ONNX_OPSET = 17
INPUT = "images"
OUTPUTS = ("boxes", "labels", "scores", "masks")
ONNX_FILE = "model.onnx"
CLASSES_FILE = "classes.json"
# the traced example's size; the graph takes any other (dynamic height and width)
EXAMPLE_SIZE = (480, 640)


def export_onnx(network: torch.nn.Module, path: Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write ``network`` (a torchvision Mask R-CNN) to ``path`` as ONNX, atomically:
    a reader never sees half a file."""
    network = network.eval().cpu().float()
    example = torch.rand(3, *EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0))
    dynamic = {INPUT: {1: "height", 2: "width"}} | {name: {0: "detections"} for name in OUTPUTS}
    dynamic["masks"] |= {2: "height", 3: "width"}
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter's notes on shapes it traced as constants: torchvision's own
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            ([example],),
            str(partial),
            opset_version=opset,
            dynamo=False,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes=dynamic,
        )
    os.replace(partial, path)
    return path


def class_table(info: ModelInfo) -> list[dict]:
    """What each output label means: ``{"label", "id", "name"}``, the background first."""
    return [
        {"label": label, "id": class_id, "name": name}
        for label, (class_id, name) in enumerate(zip(info.class_ids, info.class_names, strict=True))
    ]


def write_model_files(network: torch.nn.Module, info: ModelInfo, folder: Path) -> Path:
    """``folder/model.onnx`` and ``folder/classes.json``; returns the ONNX file."""
    onnx_file = export_onnx(network, folder / ONNX_FILE)
    (folder / CLASSES_FILE).write_text(json.dumps(class_table(info), indent=1) + "\n")
    return onnx_file


def triton_config(name: str) -> str:
    """``config.pbtxt`` for the ONNX Runtime backend: one image per request (the
    graph's own batching is one image), dynamic height and width."""
    outputs = {
        "boxes": ("TYPE_FP32", "[ -1, 4 ]"),
        "labels": ("TYPE_INT64", "[ -1 ]"),
        "scores": ("TYPE_FP32", "[ -1 ]"),
        "masks": ("TYPE_FP32", "[ -1, 1, -1, -1 ]"),
    }
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        "max_batch_size: 0",
        f'input [\n  {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ 3, -1, -1 ] }}\n]',
        "output [",
        ",\n".join(
            f'  {{ name: "{output}" data_type: {dtype} dims: {dims} }}'
            for output, (dtype, dims) in outputs.items()
        ),
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    network: torch.nn.Module, info: ModelInfo, repository: Path, name: str
) -> Path:
    """Triton's layout under ``repository``: ``name/config.pbtxt``,
    ``name/1/model.onnx`` and ``name/classes.json``; returns ``repository/name``."""
    folder = repository / name
    version = folder / "1"
    write_model_files(network, info, version)
    shutil.move(version / CLASSES_FILE, folder / CLASSES_FILE)
    (folder / "config.pbtxt").write_text(triton_config(name))
    return folder
