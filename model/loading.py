"""Turn a model spec (``auto``, ``coco``, ``coco-v2``, ``demo`` or a file
path) into a network with its ``ModelInfo``. (Registry model ids are the
service's business: it looks up their file and passes ``model_id``.)"""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN

from model.checkpoint import load_state, read_checkpoint
from model.errors import CheckpointError, WeightsUnavailableError
from model.info import (
    MODEL_SPECS,
    ModelInfo,
    class_table_from_metadata,
    default_class_table,
    read_classes_file,
    spec_names,
)
from model.networks import build_network
from model.weights import PRETRAINED, load_pretrained_state

log = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).parent / "weights" / "demo.safetensors"


@dataclass
class LoadedModel:
    network: MaskRCNN
    info: ModelInfo


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return resolved


def load_model(
    spec: str,
    *,
    classes_file: str | None = None,
    model_id: str | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
    **network_kwargs,
) -> LoadedModel:
    """Build and load the network ``spec`` names, in eval mode on ``device``.

    ``network_kwargs`` go to the torchvision builder (``min_size``, ``max_size``,
    ...). ``classes_file`` renames the classes of a file checkpoint; ``model_id``
    names a file checkpoint (default: the file name without its suffix).
    """
    if spec == "auto":
        loaded = _load_auto(allow_download=allow_download, **network_kwargs)
    elif spec in PRETRAINED:
        loaded = _load_pretrained(spec, allow_download=allow_download, **network_kwargs)
    elif spec == "demo":
        loaded = _load_demo(**network_kwargs)
    else:
        loaded = load_file(
            Path(spec), classes_file=classes_file, model_id=model_id, **network_kwargs
        )
    device = resolve_device(device) if isinstance(device, str) else device
    loaded.network.to(device).eval()
    return loaded


def _load_auto(*, allow_download: bool, **network_kwargs) -> LoadedModel:
    try:
        return _load_pretrained("coco", allow_download=allow_download, **network_kwargs)
    except WeightsUnavailableError as e:
        log.warning(
            "serving the bundled demo model, which knows only synthetic shapes: COCO's "
            "weights are not cached and could not be fetched (`maskrcnn download coco` "
            "where there is network, or MASKRCNN_MODEL=demo to skip the try)"
        )
        log.debug("COCO weights unavailable: %s", e)
        return _load_demo(**network_kwargs)


def _load_pretrained(name: str, *, allow_download: bool, **network_kwargs) -> LoadedModel:
    pretrained = PRETRAINED[name]
    state = load_pretrained_state(pretrained, allow_download=allow_download)
    categories = pretrained.categories
    network = build_network(
        pretrained.architecture, num_classes=len(categories), **network_kwargs
    )
    load_state(network, state, f"{name} weights")
    info = ModelInfo(
        id=name,
        architecture=pretrained.architecture,
        class_ids=tuple(range(len(categories))),
        class_names=categories,
        metadata={"weights": pretrained.weights.url},
        kind="coco",
    )
    return LoadedModel(network, info)


def _load_demo(**network_kwargs) -> LoadedModel:
    if not DEMO_CHECKPOINT.is_file():
        raise WeightsUnavailableError(
            f"the bundled demo model is missing ({DEMO_CHECKPOINT}); reinstall the package"
        )
    loaded = load_file(DEMO_CHECKPOINT, model_id="demo", **network_kwargs)
    loaded.info = dataclasses.replace(loaded.info, kind="demo")
    return loaded


def load_file(
    path: Path,
    *,
    classes_file: str | None = None,
    model_id: str | None = None,
    **network_kwargs,
) -> LoadedModel:
    """Load our ``.safetensors`` checkpoint or a torchvision ``.pth``/``.pt`` state dict."""
    if not path.is_file():
        raise CheckpointError(
            f"model {str(path)!r}: not {spec_names(MODEL_SPECS)}, nor an existing file"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        loaded = _load_safetensors(path, model_id or path.stem, **network_kwargs)
    elif suffix in (".pth", ".pt"):
        loaded = _load_torch_state(path, model_id or path.stem, **network_kwargs)
    else:
        raise CheckpointError(
            f"{path}: unknown model file type {suffix!r}; expected .safetensors, .pth or .pt"
        )
    if classes_file:
        names = read_classes_file(classes_file, loaded.info.num_classes)
        loaded.info = dataclasses.replace(loaded.info, class_names=names)
    return loaded


def _load_safetensors(path: Path, model_id: str, **network_kwargs) -> LoadedModel:
    state, metadata = read_checkpoint(path)
    kwargs = {**metadata["arch_kwargs"], **network_kwargs}
    network = build_network(metadata["architecture"], **kwargs)
    load_state(network, state, str(path))
    class_ids, class_names = class_table_from_metadata(metadata["classes"])
    if len(class_ids) != kwargs.get("num_classes", len(class_ids)):
        raise CheckpointError(
            f"{path}: metadata lists {len(class_ids) - 1} classes but the network has "
            f"{kwargs['num_classes'] - 1}"
        )
    info = ModelInfo(model_id, metadata["architecture"], class_ids, class_names, metadata)
    return LoadedModel(network, info)


def _load_torch_state(path: Path, model_id: str, **network_kwargs) -> LoadedModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable weights-only PyTorch state dict ({reason})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision reference-script checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise CheckpointError(f"{path}: not a Mask R-CNN state dict (no {key})")
    num_classes = state[key].shape[0]
    architecture = (
        "maskrcnn_resnet50_fpn"
        if "roi_heads.box_head.fc6.weight" in state
        else "maskrcnn_resnet50_fpn_v2"
    )
    network = build_network(architecture, num_classes=num_classes, **network_kwargs)
    load_state(network, state, str(path))
    class_ids, class_names = default_class_table(num_classes)
    info = ModelInfo(model_id, architecture, class_ids, class_names, {"source": str(path)})
    return LoadedModel(network, info)
