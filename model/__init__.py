"""Mask R-CNN in tensors: networks, checkpoints and weights, the batched
predictor (``model.inference``), training and evaluation (``model.training``).
No FastAPI and no environment settings: it takes plain arguments.

This is the surface the service (``app/``) uses, and the only one: ``from model
import Predictor``. Names load lazily (PEP 562): ``import model`` imports nothing
else, and each name's module is imported on first use, so a command's ``--help``
or the training worker does not import torch for a name it does not touch.
"""

import importlib
from typing import TYPE_CHECKING, Any

_MODULES = {
    "METADATA_KEY": "model.checkpoint",
    "CheckpointError": "model.errors",
    "DatasetError": "model.errors",
    "InvalidImageError": "model.errors",
    "InvalidOptionError": "model.errors",
    "ModelError": "model.errors",
    "WeightsUnavailableError": "model.errors",
    "ONNX_OPSET": "model.export",
    "export_onnx": "model.export",
    "triton_config": "model.export",
    "write_model_files": "model.export",
    "write_triton_repository": "model.export",
    "InputGeometry": "model.geometry",
    "input_geometry": "model.geometry",
    "list_images": "model.inference.images",
    "pil_to_tensor": "model.inference.images",
    "read_image": "model.inference.images",
    "PredictOptions": "model.inference.options",
    "Detection": "model.inference.predictor",
    "ImageResult": "model.inference.predictor",
    "Predictor": "model.inference.predictor",
    "BASE_MODELS": "model.info",
    "BUILTIN_MODELS": "model.info",
    "MODEL_SPECS": "model.info",
    "ModelInfo": "model.info",
    "spec_names": "model.info",
    "class_table_from_metadata": "model.info",
    "read_classes_file": "model.info",
    "DEMO_CHECKPOINT": "model.loading",
    "load_model": "model.loading",
    "resolve_device": "model.loading",
    "RUNTIMES": "model.inference.runtimes",
    "choose_runtime": "model.inference.runtimes",
    "to_coco_results": "model.training.coco",
    "ANNOTATIONS_FILE": "model.training.dataset",
    "CocoDataset": "model.training.dataset",
    "split_dataset": "model.training.dataset",
    "gpus_for_ddp": "model.training.distributed",
    "is_main_rank": "model.training.distributed",
    "process_capacity": "model.training.distributed",
    "evaluate_predictor": "model.training.evaluation",
    "format_metrics": "model.training.evaluation",
    "TrainConfig": "model.training.loop",
    "TrainingPlan": "model.training.pipeline",
    "run_training": "model.training.pipeline",
    "render_scenes": "model.training.synthetic",
    "load_coco": "model.training.validation",
    "unsafe_path_reason": "model.training.validation",
    "validate_coco": "model.training.validation",
    "PRETRAINED": "model.weights",
    "cached_weights_path": "model.weights",
    "download_weights": "model.weights",
}

__all__ = [
    "ANNOTATIONS_FILE",
    "BASE_MODELS",
    "BUILTIN_MODELS",
    "DEMO_CHECKPOINT",
    "METADATA_KEY",
    "MODEL_SPECS",
    "ONNX_OPSET",
    "PRETRAINED",
    "RUNTIMES",
    "CheckpointError",
    "CocoDataset",
    "DatasetError",
    "Detection",
    "ImageResult",
    "InputGeometry",
    "InvalidImageError",
    "InvalidOptionError",
    "ModelError",
    "ModelInfo",
    "PredictOptions",
    "Predictor",
    "TrainConfig",
    "TrainingPlan",
    "WeightsUnavailableError",
    "cached_weights_path",
    "choose_runtime",
    "class_table_from_metadata",
    "download_weights",
    "evaluate_predictor",
    "export_onnx",
    "format_metrics",
    "gpus_for_ddp",
    "input_geometry",
    "is_main_rank",
    "list_images",
    "load_coco",
    "load_model",
    "pil_to_tensor",
    "process_capacity",
    "read_classes_file",
    "read_image",
    "render_scenes",
    "resolve_device",
    "run_training",
    "spec_names",
    "split_dataset",
    "to_coco_results",
    "triton_config",
    "unsafe_path_reason",
    "validate_coco",
    "write_model_files",
    "write_triton_repository",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from model.checkpoint import METADATA_KEY
    from model.errors import (
        CheckpointError,
        DatasetError,
        InvalidImageError,
        InvalidOptionError,
        ModelError,
        WeightsUnavailableError,
    )
    from model.export import (
        ONNX_OPSET,
        export_onnx,
        triton_config,
        write_model_files,
        write_triton_repository,
    )
    from model.geometry import InputGeometry, input_geometry
    from model.inference.images import list_images, pil_to_tensor, read_image
    from model.inference.options import PredictOptions
    from model.inference.predictor import Detection, ImageResult, Predictor
    from model.inference.runtimes import RUNTIMES, choose_runtime
    from model.info import (
        BASE_MODELS,
        BUILTIN_MODELS,
        MODEL_SPECS,
        ModelInfo,
        class_table_from_metadata,
        read_classes_file,
        spec_names,
    )
    from model.loading import DEMO_CHECKPOINT, load_model, resolve_device
    from model.training.coco import to_coco_results
    from model.training.dataset import ANNOTATIONS_FILE, CocoDataset, split_dataset
    from model.training.distributed import gpus_for_ddp, is_main_rank, process_capacity
    from model.training.evaluation import evaluate_predictor, format_metrics
    from model.training.loop import TrainConfig
    from model.training.pipeline import TrainingPlan, run_training
    from model.training.synthetic import render_scenes
    from model.training.validation import load_coco, unsafe_path_reason, validate_coco
    from model.weights import PRETRAINED, cached_weights_path, download_weights
