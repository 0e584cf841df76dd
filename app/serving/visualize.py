"""Draw detections on their image (``POST /v1/segment/visualize``): translucent
masks, boxes, and ``name score`` labels, with torchvision's drawing utilities."""

import io
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

if TYPE_CHECKING:
    from model import Detection

MASK_ALPHA = 0.5


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour per class id (golden-ratio hue walk)."""
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = Image.new("HSV", (1, 1), (int(hue * 255), 220, 255)).convert("RGB").getpixel((0, 0))
    return int(r), int(g), int(b)


def draw_detections(image: torch.Tensor, detections: "list[Detection]") -> torch.Tensor:
    """``image``: uint8 ``[3, H, W]``; detections with RLE masks (or none)."""
    if not detections:
        return image
    colours = [class_colour(d.class_id) for d in detections]
    with_masks = [
        (d, c) for d, c in zip(detections, colours, strict=True) if isinstance(d.mask, dict)
    ]
    if with_masks:
        rles = [d.mask for d, _ in with_masks]
        masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)))
        image = draw_segmentation_masks(
            image, masks.bool(), alpha=MASK_ALPHA, colors=[c for _, c in with_masks]
        )
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
    labels = [f"{d.class_name} {d.score:.2f}" for d in detections]
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=2)


def encode_png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_png(image: torch.Tensor, detections: "list[Detection]") -> bytes:
    return encode_png(draw_detections(image, detections))
