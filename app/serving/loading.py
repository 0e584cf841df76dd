"""Loading one model into this process, as ``MASKRCNN_MODEL`` / ``DEVICE`` /
``PRECISION`` ask: what the server runs without model processes, and what each
model process runs (``app.serving.modelprocess``). A registry model id is served
from its checkpoint under its id."""

import logging

from app.settings import Settings
from app.store import registry
from model import Predictor, load_model

log = logging.getLogger(__name__)


def load_predictor(settings: Settings) -> Predictor:
    spec, model_id = registry.resolve_model_spec(settings)
    classes_file = str(settings.classes_file) if settings.classes_file else None
    loaded = load_model(spec, classes_file=classes_file, model_id=model_id, device=settings.device)
    device = next(loaded.network.parameters()).device
    predictor = Predictor(loaded.network, loaded.info, device=device, precision=settings.precision)
    if predictor.precision != settings.precision:
        log.warning(
            "MASKRCNN_PRECISION=%s has no effect on %s: serving %s",
            settings.precision,
            device,
            predictor.precision,
        )
    return predictor
