"""Training augmentations that move boxes and masks with the image.

Built on ``torchvision.transforms.v2``: the target's boxes and masks are wrapped
as ``tv_tensors`` so every geometric transform applies to them too, and
``SanitizeBoundingBoxes`` drops instances (box, label, mask, area, iscrowd)
that a crop or zoom made degenerate.
"""

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.training.dataset import Sample


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; 0 turns a transform off."""

    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    zoom_out: float = 0.0  # probability of placing the image on a larger canvas
    max_zoom_out: float = 1.5
    iou_crop: float = 0.0  # probability of an SSD-style IoU crop


class TrainAugment:
    """``(uint8 image [3, H, W], target) -> (uint8 image, target)`` as in
    ``model.training.dataset``."""

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()
        self.transform = v2.Compose(_build(self.config))

    def __call__(self, image: torch.Tensor, target: dict[str, torch.Tensor]) -> Sample:
        height, width = image.shape[-2:]
        wrapped = {
            **target,
            "boxes": tv_tensors.BoundingBoxes(
                target["boxes"], format="XYXY", canvas_size=(height, width)
            ),
            "masks": tv_tensors.Mask(target["masks"]),
        }
        image, out = self.transform(tv_tensors.Image(image), wrapped)
        out["boxes"] = out["boxes"].as_subclass(torch.Tensor)
        out["masks"] = out["masks"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), out


def _build(cfg: AugmentConfig) -> list[v2.Transform]:
    steps: list[v2.Transform] = []
    if cfg.zoom_out > 0:
        zoom = v2.RandomZoomOut(fill={tv_tensors.Image: 114, "others": 0},
                                side_range=(1.0, cfg.max_zoom_out))
        steps.append(v2.RandomApply([zoom], p=cfg.zoom_out))
    if cfg.iou_crop > 0:
        steps.append(v2.RandomApply([v2.RandomIoUCrop()], p=cfg.iou_crop))
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    steps.append(v2.SanitizeBoundingBoxes(labels_getter=_instance_fields))
    return steps


def _instance_fields(sample: tuple) -> tuple[torch.Tensor, ...]:
    target = sample[1]
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)
