"""Pretrained torchvision weights, found in the torch hub cache or downloaded into it.

The cache is torchvision's own (``$TORCH_HOME/hub/checkpoints``), so a machine
that has the file — a Docker image built with ``maskrcnn download`` — works
offline, and a file fetched by torchvision elsewhere is reused.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models import WeightsEnum
from torchvision.models.detection import (
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)

from model.errors import CheckpointError, WeightsUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pretrained:
    name: str
    architecture: str
    weights: WeightsEnum

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.weights.meta["categories"])


PRETRAINED = {
    "coco": Pretrained("coco", "maskrcnn_resnet50_fpn", MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "coco-v2": Pretrained(
        "coco-v2", "maskrcnn_resnet50_fpn_v2", MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1
    ),
}


def cached_weights_path(pretrained: Pretrained) -> Path:
    """Where torchvision keeps (or would keep) this file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pretrained.weights.url)


def download_weights(pretrained: Pretrained) -> Path:
    """Fetch the weights into the hub cache (with torchvision's hash check)."""
    path = cached_weights_path(pretrained)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(pretrained.weights.url, str(path), progress=True)
    except Exception as e:  # urllib raises URLError, socket errors, HTTP errors...
        raise WeightsUnavailableError(
            f"could not download {pretrained.name} weights from {pretrained.weights.url}: {e}. "
            f"On an offline machine, copy the file to {path} (or run `maskrcnn download "
            f"{pretrained.name}` where there is network)."
        ) from e
    return path


def load_pretrained_state(
    pretrained: Pretrained, *, allow_download: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict from the cache, downloading it first if allowed."""
    path = cached_weights_path(pretrained)
    if not path.is_file():
        if not allow_download:
            raise WeightsUnavailableError(
                f"{pretrained.name} weights are not in the torch hub cache ({path}) "
                "and downloading is off"
            )
        log.info("downloading %s weights to %s", pretrained.name, path)
        download_weights(pretrained)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cached {pretrained.name} weights are unreadable: {e}"
        ) from e
