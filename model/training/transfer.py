"""The network a training run starts from: built from scratch or from a base model.

A base model's tensors are copied wherever name and shape match. The class
predictors (box classifier, box regressor, mask logits) are kept only when the
base model has exactly the dataset's classes (same ids and names, same order);
otherwise they start fresh, sized for the dataset.
"""

import inspect
from dataclasses import dataclass
from typing import Any

from torchvision.models.detection import MaskRCNN

from model.networks import ARCHITECTURES, build_network

DEFAULT_ARCHITECTURE = "maskrcnn_small_fpn"
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


@dataclass
class StartingPoint:
    network: MaskRCNN
    architecture: str
    arch_kwargs: dict[str, Any]  # what the checkpoint records; rebuilds ``network``
    base_model: str
    copied: int  # tensors taken from the base model


def starting_network(
    base_model: str,
    categories: list[dict[str, Any]],
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    **arch_kwargs: Any,
) -> StartingPoint:
    """A network with ``len(categories) + 1`` outputs, in train-ready state.

    ``base_model`` is ``scratch`` (``architecture`` with random weights) or any spec
    ``model.loading.load_model`` accepts (``coco``, ``coco-v2``, ``demo``, a file);
    then its architecture is used and ``arch_kwargs`` (e.g. ``min_size``) override
    the ones it was built with.
    """
    num_classes = len(categories) + 1
    if base_model == "scratch":
        kwargs = {**builder_defaults(architecture), **arch_kwargs, "num_classes": num_classes}
        network = build_network(architecture, **kwargs)
        return StartingPoint(network, architecture, kwargs, "scratch", 0)

    from model.loading import load_model

    base = load_model(base_model, device="cpu")
    recorded = base.info.metadata.get("arch_kwargs", {})
    kwargs = {**recorded, **arch_kwargs, "num_classes": num_classes}
    network = build_network(base.info.architecture, **kwargs)
    same_classes = [
        {"id": cid, "name": name}
        for cid, name in zip(base.info.class_ids[1:], base.info.class_names[1:], strict=True)
    ] == [{"id": c["id"], "name": c["name"]} for c in categories]
    copied = copy_matching(base.network, network, keep_predictors=same_classes)
    return StartingPoint(network, base.info.architecture, kwargs, base_model, copied)


def builder_defaults(architecture: str) -> dict[str, Any]:
    """The keyword defaults of an architecture's builder, recorded in full so that a
    checkpoint still rebuilds its network if a default changes later."""
    builder = ARCHITECTURES.get(architecture)
    if builder is None:
        return {}
    parameters = inspect.signature(builder).parameters.values()
    return {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in parameters
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }


def copy_matching(source: MaskRCNN, target: MaskRCNN, *, keep_predictors: bool) -> int:
    """Copy tensors with the same name and shape; returns how many were copied."""
    theirs = source.state_dict()
    ours = target.state_dict()
    picked = {
        name: tensor
        for name, tensor in theirs.items()
        if name in ours
        and tensor.shape == ours[name].shape
        and (keep_predictors or not name.startswith(PREDICTOR_PREFIXES))
    }
    target.load_state_dict(picked, strict=False)
    return len(picked)
