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

from app.settings import Settings
from app.store import registry
from app.store.db import Database
from model import Predictor, choose_runtime, load_model

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
    predictor = Predictor(
        loaded.network,
        loaded.info,
        device=device,
        precision=precision,
        static=spec.static_shapes,
        runtime=runtime,
        threads=spec.threads,
        cache_dir=Path(spec.openvino_cache) if spec.openvino_cache else None,
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
