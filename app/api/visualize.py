"""Draw detections on their image (``POST /v1/segment/visualize``): translucent
masks and boxes in one colour per class, and ``name score`` labels that stay
readable on any image.

Labels are sized to the image (about a fortieth of its shorter side, 12 to 48
px), drawn on a solid tag of the class colour with black or white text, which
ever contrasts, and a dark outline; they are kept inside the image and placed
best score first, each moved until it overlaps no label placed before it.
Detections without a mask (``mask_format=none``) get a box and a label only.
"""

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


def luminance(colour: tuple[int, int, int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    r, g, b = (c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background``."""
    light = luminance(background)
    on_black, on_white = (light + 0.05) / 0.05, 1.05 / (light + 0.05)
    return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


def label_size_px(height: int, width: int) -> int:
    return max(12, min(48, round(min(height, width) / 40)))


@dataclass(frozen=True)
class Rect:
    x0: int
    y0: int
    x1: int
    y1: int

    def overlaps(self, other: "Rect") -> bool:
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )

    def moved(self, dx: int, dy: int) -> "Rect":
        return Rect(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)


def place_labels(
    boxes: list[tuple[float, float, float, float]],
    sizes: list[tuple[int, int]],
    image_size: tuple[int, int],
) -> list[Rect]:
    """Where each label goes: ``sizes[i]`` ``(w, h)``, above box ``i``'s top-left
    corner (inside the box when there is no room above), inside the image
    ``(width, height)``, clear of the labels placed before it (moved down, then
    up, a label height at a time; left where it is when the image is full)."""
    width, height = image_size
    placed: list[Rect] = []
    for (x0, y0, _, _), (w, h) in zip(boxes, sizes, strict=True):
        left = int(min(max(x0, 0), max(width - w, 0)))
        top = int(y0) - h if y0 - h >= 0 else int(max(y0, 0))
        start = Rect(left, top, left + w, top + h).moved(0, min(0, height - (top + h)))
        rect = start
        for step in range(1, 2 * (height // max(h, 1)) + 2):
            if not any(rect.overlaps(other) for other in placed):
                break
            shift = (step + 1) // 2 * h * (1 if step % 2 else -1)
            rect = start.moved(0, shift)
            if rect.y0 < 0 or rect.y1 > height:
                rect = start
        placed.append(rect)
    return placed


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
    height, width = image.shape[-2:]
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
    line = max(2, round(min(height, width) / 300))
    image = draw_bounding_boxes(image, boxes, colors=colours, width=line)
    return draw_labels(image, detections, colours)


def draw_labels(
    image: torch.Tensor, detections: "list[Detection]", colours: list[tuple[int, int, int]]
) -> torch.Tensor:
    height, width = image.shape[-2:]
    font = ImageFont.load_default(size=label_size_px(height, width))
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    texts = {i: f"{detections[i].class_name} {detections[i].score:.2f}" for i in order}
    pad = max(2, font.size // 6)
    sizes = []
    for i in order:
        left, top, right, bottom = draw.textbbox((0, 0), texts[i], font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    rects = place_labels([detections[i].box for i in order], sizes, (width, height))
    for i, rect in zip(order, rects, strict=True):
        draw.rectangle(
            (rect.x0, rect.y0, rect.x1 - 1, rect.y1 - 1), fill=colours[i], outline=(0, 0, 0)
        )
        left, top, _, _ = draw.textbbox((0, 0), texts[i], font=font)
        position = (rect.x0 + pad - left, rect.y0 + pad - top)
        draw.text(position, texts[i], font=font, fill=text_colour(colours[i]))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def encode_png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_png(image: torch.Tensor, detections: "list[Detection]") -> bytes:
    return encode_png(draw_detections(image, detections))
