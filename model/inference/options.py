"""Per-image prediction options."""

import math
from dataclasses import dataclass
from typing import Literal

from model.errors import InvalidOptionError

MaskFormat = Literal["rle", "polygon", "none"]
MASK_FORMATS = ("rle", "polygon", "none")


@dataclass(frozen=True)
class PredictOptions:
    """Options applied to one image after the batched forward.

    ``classes`` holds network labels (see ``ModelInfo.resolve_classes``); ``None``
    keeps every class. ``output_size``: ``(height, width)`` of the frame boxes and
    masks are given in, for an image decoded smaller than its file (a JPEG
    reduced as it was decoded); ``None``: the image's own.
    """

    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int = 100
    classes: frozenset[int] | None = None
    mask_format: MaskFormat = "rle"
    output_size: tuple[int, int] | None = None


def check_options(opts: PredictOptions) -> None:
    """Raise ``InvalidOptionError`` naming the first option out of its range."""
    for name in ("score_threshold", "iou_threshold", "mask_threshold"):
        value = getattr(opts, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
            raise InvalidOptionError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (isinstance(opts.max_detections, int) and 0 <= opts.max_detections <= 1000):
        raise InvalidOptionError(
            f"max_detections must be an integer in [0, 1000], got {opts.max_detections!r}"
        )
    size = opts.output_size
    if size is not None and not (
        len(size) == 2 and all(isinstance(side, int) and side >= 1 for side in size)
    ):
        raise InvalidOptionError(f"output_size must be (height, width) in pixels, got {size!r}")
    if opts.mask_format not in MASK_FORMATS:
        raise InvalidOptionError(
            f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {opts.mask_format!r}"
        )
