"""Size buckets for the batching queue (SPEC §5): images share a batch only when
the network would pad them to the same input size, so no image is padded more
in a batch than alone and its detections do not depend on its neighbours."""

import math
from collections.abc import Callable, Hashable

import torch

from app.batching import image_size_key


def padded_input_size(
    height: int, width: int, *, min_size: float, max_size: float, size_divisible: int
) -> tuple[int, int]:
    """The padded size torchvision's ``GeneralizedRCNNTransform`` gives one image
    (same arithmetic as its ``_resize_image_and_masks`` and ``batch_images``)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    resized = (math.floor(height * scale), math.floor(width * scale))
    return tuple(math.ceil(s / size_divisible) * size_divisible for s in resized)


def bucket_key_for(network: torch.nn.Module | None) -> Callable[[torch.Tensor], Hashable]:
    """Bucket by padded network input size; by exact image size when ``network``
    has no torchvision transform."""
    transform = getattr(network, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        return image_size_key
    if getattr(transform, "fixed_size", None):
        return lambda image: "fixed"
    min_size = float(transform.min_size[-1])
    max_size = float(transform.max_size)
    divisible = int(transform.size_divisible)

    def key(image: torch.Tensor) -> Hashable:
        height, width = image.shape[-2:]
        return padded_input_size(
            int(height), int(width), min_size=min_size, max_size=max_size, size_divisible=divisible
        )

    return key
