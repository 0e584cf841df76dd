"""Size buckets for the batching queue: images share a batch only when the
network would pad them to the same input size (``model.geometry``), so no image
is padded more in a batch than alone and its detections do not depend on its
neighbours."""

from collections.abc import Callable, Hashable

import torch

from model import InputGeometry


def image_size_key(image: torch.Tensor) -> Hashable:
    return tuple(image.shape[-2:])


def bucket_key_from(geometry: InputGeometry | None) -> Callable[[torch.Tensor], Hashable]:
    """Bucket by the padded network input size ``geometry`` gives (a model's
    ``input_geometry``); by exact image size when it gives none."""
    if geometry is None:
        return image_size_key
    if geometry.fixed:
        return lambda image: "fixed"

    def key(image: torch.Tensor) -> Hashable:
        height, width = image.shape[-2:]
        return geometry.padded_size(int(height), int(width))

    return key
