"""The input size arithmetic of torchvision's ``GeneralizedRCNNTransform``: the
size an image is resized to and the padded size the backbone sees. The serving
queue batches images by it (``app.serving.buckets``), so padding in a batch never
changes an image's detections."""

import math
from dataclasses import dataclass

import torch

from model.errors import InvalidImageError


def resized_size(height: int, width: int, *, min_size: float, max_size: float) -> tuple[int, int]:
    """The size torchvision's ``GeneralizedRCNNTransform`` resizes one image to
    (its ``_resize_image_and_masks``): the shorter side to ``min_size``, unless
    the longer would pass ``max_size``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def padded_input_size(
    height: int, width: int, *, min_size: float, max_size: float, size_divisible: int
) -> tuple[int, int]:
    """The padded size torchvision's ``GeneralizedRCNNTransform`` gives one image
    (same arithmetic as its ``_resize_image_and_masks`` and ``batch_images``)."""
    resized = resized_size(height, width, min_size=min_size, max_size=max_size)
    return tuple(padded_side(s, size_divisible) for s in resized)


def padded_side(size: int, divisor: int) -> int:
    """A side padded as ``GeneralizedRCNNTransform.batch_images`` pads it."""
    return int(math.ceil(float(size) / float(divisor)) * float(divisor))


@dataclass(frozen=True)
class InputGeometry:
    """What decides a torchvision transform's padded input size; picklable, so a
    model in another process can describe it. ``fixed``: every image is resized
    to one size (``fixed_size``)."""

    min_size: float
    max_size: float
    size_divisible: int
    fixed: bool = False

    def check(self, height: int, width: int, name: str = "image") -> None:
        """``InvalidImageError`` for an image so thin that the resize would leave
        less than a pixel across (the network cannot run it)."""
        if self.fixed:
            return
        resized = resized_size(height, width, min_size=self.min_size, max_size=self.max_size)
        if min(resized) < 1:
            raise InvalidImageError(
                f"{name}: a {width}x{height} image is too thin for this model: resized "
                f"(shorter side to {self.min_size:g} px, longer at most {self.max_size:g} px) "
                f"it would be less than a pixel across; the longer side may be at most "
                f"{math.floor(self.max_size):d} times the shorter"
            )

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size the network resizes an image of this size to (not ``fixed``)."""
        return resized_size(height, width, min_size=self.min_size, max_size=self.max_size)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        return padded_input_size(
            height,
            width,
            min_size=self.min_size,
            max_size=self.max_size,
            size_divisible=self.size_divisible,
        )


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
