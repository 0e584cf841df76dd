"""Loading one model into this process, as ``MASKRCNN_MODEL`` / ``DEVICE`` /
``PRECISION`` ask: what the server runs without model processes, and what each
model process runs (``app.serving.modelprocess``). A registry model id is served
from its checkpoint under its id. With ``CUDA_GRAPHS`` on a GPU the static forward
is captured here, before the warm-up, for the configured batch and image sizes."""

import logging
import time

from app.settings import Settings
from app.store import registry
from model import Predictor, load_model

log = logging.getLogger(__name__)


def load_predictor(settings: Settings) -> Predictor:
    spec, model_id = registry.resolve_model_spec(settings)
    classes_file = str(settings.classes_file) if settings.classes_file else None
    loaded = load_model(spec, classes_file=classes_file, model_id=model_id, device=settings.device)
    device = next(loaded.network.parameters()).device
    predictor = Predictor(
        loaded.network,
        loaded.info,
        device=device,
        precision=settings.precision,
        static=settings.static_shapes,
    )
    if predictor.precision != settings.precision:
        log.warning(
            "MASKRCNN_PRECISION=%s has no effect on %s: serving %s",
            settings.precision,
            device,
            predictor.precision,
        )
    capture_graphs(predictor, settings)
    return predictor


def capture_graphs(predictor: Predictor, settings: Settings) -> None:
    """``CUDA_GRAPHS``: ``auto`` captures on a GPU with the static forward on; ``true``
    where that is not so only warns."""
    possible = predictor.static is not None and predictor.device.type == "cuda"
    if settings.cuda_graphs is False or (settings.cuda_graphs == "auto" and not possible):
        return
    if not possible:
        log.warning(
            "MASKRCNN_CUDA_GRAPHS=true needs a GPU and static shapes (MASKRCNN_STATIC_SHAPES); "
            "serving on %s %s static shapes: no graphs captured",
            predictor.device,
            "with" if predictor.static is not None else "without",
        )
        return
    sizes = [
        tuple(int(side) for side in size.split("x"))[::-1] for size in settings.graph_image_sizes
    ]
    start = time.perf_counter()
    predictor.capture_graphs(sizes, settings.graph_batch_sizes)
    log.info(
        "captured CUDA graphs for batches of %s images of %s in %.1f s",
        ",".join(map(str, settings.graph_batch_sizes)),
        ",".join(settings.graph_image_sizes),
        time.perf_counter() - start,
    )
