"""Size buckets for the batching queue (SPEC §5): images share a batch only when
the network would pad them to the same input size, so no image is padded more
in a batch than alone and its detections do not depend on its neighbours."""

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from app.serving.batching import image_size_key


def padded_input_size(
    height: int, width: int, *, min_size: float, max_size: float, size_divisible: int
) -> tuple[int, int]:
    """The padded size torchvision's ``GeneralizedRCNNTransform`` gives one image
    (same arithmetic as its ``_resize_image_and_masks`` and ``batch_images``)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    resized = (math.floor(height * scale), math.floor(width * scale))
    return tuple(math.ceil(s / size_divisible) * size_divisible for s in resized)


@dataclass(frozen=True)
class InputGeometry:
    """What decides a torchvision transform's padded input size; picklable, so
    a model in another process (``app.serving.modelprocess``) can describe it."""

    min_size: float
    max_size: float
    size_divisible: int
    fixed: bool = False


def input_geometry(network: torch.nn.Module | None) -> InputGeometry | None:
    """``network``'s transform geometry; ``None`` without a torchvision transform."""
    transform = getattr(network, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        return None
    return InputGeometry(
        min_size=float(transform.min_size[-1]),
        max_size=float(transform.max_size),
        size_divisible=int(transform.size_divisible),
        fixed=bool(getattr(transform, "fixed_size", None)),
    )


def bucket_key_for(network: torch.nn.Module | None) -> Callable[[torch.Tensor], Hashable]:
    """Bucket by padded network input size; by exact image size when ``network``
    has no torchvision transform."""
    return bucket_key_from(input_geometry(network))


def predictor_bucket_key(predictor: object) -> Callable[[torch.Tensor], Hashable]:
    """``bucket_key_for`` the predictor's network, or from the ``input_geometry``
    a predictor in another process reports."""
    if hasattr(predictor, "input_geometry"):
        return bucket_key_from(predictor.input_geometry)
    return bucket_key_for(getattr(predictor, "network", None))


def bucket_key_from(geometry: InputGeometry | None) -> Callable[[torch.Tensor], Hashable]:
    if geometry is None:
        return image_size_key
    if geometry.fixed:
        return lambda image: "fixed"

    def key(image: torch.Tensor) -> Hashable:
        height, width = image.shape[-2:]
        return padded_input_size(
            int(height),
            int(width),
            min_size=geometry.min_size,
            max_size=geometry.max_size,
            size_divisible=geometry.size_divisible,
        )

    return key
