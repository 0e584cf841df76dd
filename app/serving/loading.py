"""Loading one model into this process: what the server runs without model
processes, and what each model process runs (``app.serving.modelprocess``).

``model_spec`` resolves what the settings (or an activation) ask for into a
``ModelSpec`` in the server's process: a registry model id becomes its
checkpoint's path there, so a model process reads neither the settings nor the
database. ``load_predictor`` builds the predictor a spec describes. With
``CUDA_GRAPHS`` on a GPU the static forward is captured here, before the warm-up,
for the configured batch and image sizes."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.settings import Settings
from app.store import registry
from app.store.db import Database
from model import (
    InvalidOptionError,
    ModelInfo,
    Predictor,
    choose_runtime,
    list_images,
    load_model,
    read_image,
    render_scenes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model and how to run it, resolved (see the module docstring)."""

    source: str  # for model.load_model: auto, coco, coco-v2, demo or a checkpoint file
    model_id: str | None = None  # the id a registry checkpoint is served under
    classes_file: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "auto"  # torch, openvino, or auto (OpenVINO on the CPU)
    openvino_cache: str | None = None  # converted graphs kept across restarts
    threads: int | None = None  # OpenVINO's threads; None: torch's
    static_shapes: bool = False
    cuda_graphs: bool | str = "auto"
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    graph_image_sizes: tuple[str, ...] = ("640x480",)
    calibration: str | None = None  # int8: a folder of images to calibrate on


# int8 calibrates on this many images: on the demo model 32 and 64 gave segm AP
# within 0.002 of each other and of float32 (model.inference.runtimes.quantize)
CALIBRATION_IMAGES = 32


def model_spec(
    settings: Settings,
    *,
    model: str | None = None,
    classes_file: Path | None = None,
    db: Database | None = None,
) -> ModelSpec:
    """``model`` (default ``MODEL``; ``classes_file`` default ``CLASSES_FILE``) run
    as the settings say. Blocking: a registry id is looked up in ``db`` (or the
    settings' database); ``CheckpointError`` when nothing answers to it."""
    if model is None:
        model, classes_file = settings.model, classes_file or settings.classes_file
    source, model_id = registry.resolve_model_spec(settings, model=model, db=db)
    s = settings
    calibration = s.calibration_images
    if s.precision == "int8" and calibration is None and model_id is not None:
        calibration = registry.training_images(s, model_id, db)  # what it was tuned on
    return ModelSpec(
        source=source,
        model_id=model_id,
        classes_file=str(classes_file) if classes_file else None,
        device=s.device,
        precision=s.precision,
        runtime=s.runtime,
        openvino_cache=str(s.openvino_cache),
        static_shapes=s.static_shapes,
        cuda_graphs=s.cuda_graphs,
        graph_batch_sizes=s.graph_batch_sizes,
        graph_image_sizes=s.graph_image_sizes,
        calibration=str(calibration) if calibration else None,
    )


def load_predictor(spec: ModelSpec) -> Predictor:
    started = time.perf_counter()
    loaded = load_model(
        spec.source, classes_file=spec.classes_file, model_id=spec.model_id, device=spec.device
    )
    device = next(loaded.network.parameters()).device
    runtime = choose_runtime(spec.runtime, device)
    precision = spec.precision
    if runtime == "openvino" and precision == "fp16":  # bf16 is the CPU's half precision
        precision = "fp32"
    if precision == "int8" and runtime != "openvino":
        raise InvalidOptionError(
            f"MASKRCNN_PRECISION=int8 runs on the CPU with the openvino runtime, not with "
            f"{runtime} on {device}"
        )
    predictor = Predictor(
        loaded.network,
        loaded.info,
        device=device,
        precision=precision,
        static=spec.static_shapes,
        runtime=runtime,
        threads=spec.threads,
        cache_dir=Path(spec.openvino_cache) if spec.openvino_cache else None,
        calibration=calibration_images(spec, loaded.info) if precision == "int8" else None,
    )
    if predictor.precision != spec.precision:
        log.warning(
            "MASKRCNN_PRECISION=%s has no effect on %s%s: serving %s",
            spec.precision,
            device,
            " with MASKRCNN_RUNTIME=torch" if runtime == "torch" else "",
            predictor.precision,
        )
    log.info(
        "loaded model %r on %s: %s runtime, %s, in %.1f s",
        predictor.info.id,
        device,
        runtime,
        predictor.precision,
        time.perf_counter() - started,
    )
    capture_graphs(predictor, spec)
    return predictor


def calibration_images(spec: ModelSpec, info: ModelInfo) -> list[torch.Tensor]:
    """``CALIBRATION_IMAGES`` images to calibrate int8 on: spread over the spec's
    folder, or, for the bundled demo model, synthetic scenes like those it was
    trained on (another seed)."""
    if spec.calibration:
        paths = list_images([spec.calibration])
        step = max(1, len(paths) // CALIBRATION_IMAGES)
        chosen = paths[::step][:CALIBRATION_IMAGES]
        if chosen:
            return [read_image(path) for path in chosen]
    if info.id == "demo":
        size = info.metadata.get("dataset_info", {}).get("image_size", 256)
        return render_scenes(CALIBRATION_IMAGES, size, seed=2026)
    raise InvalidOptionError(
        f"MASKRCNN_PRECISION=int8 needs images to calibrate model {info.id!r} on: set "
        "MASKRCNN_CALIBRATION_IMAGES to a folder of images like those it will serve "
        f"({CALIBRATION_IMAGES} are used)"
        + (f"; {spec.calibration} holds none" if spec.calibration else "")
    )


def capture_graphs(predictor: Predictor, spec: ModelSpec) -> None:
    """``CUDA_GRAPHS``: ``auto`` captures on a GPU with the static forward on; ``true``
    where that is not so only warns."""
    possible = predictor.static is not None and predictor.device.type == "cuda"
    if spec.cuda_graphs is False or (spec.cuda_graphs == "auto" and not possible):
        return
    if not possible:
        log.warning(
            "MASKRCNN_CUDA_GRAPHS=true needs a GPU and static shapes (MASKRCNN_STATIC_SHAPES); "
            "serving on %s %s static shapes: no graphs captured",
            predictor.device,
            "with" if predictor.static is not None else "without",
        )
        return
    sizes = [tuple(int(side) for side in size.split("x"))[::-1] for size in spec.graph_image_sizes]
    start = time.perf_counter()
    predictor.capture_graphs(sizes, spec.graph_batch_sizes)
    log.info(
        "captured CUDA graphs for batches of %s images of %s in %.1f s",
        ",".join(map(str, spec.graph_batch_sizes)),
        ",".join(spec.graph_image_sizes),
        time.perf_counter() - start,
    )
