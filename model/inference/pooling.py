"""Pooling the ROI heads' inputs: each box's features from its FPN level."""

import numpy as np
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales

from model.inference.nms import device_tensor


def pool_rois(
    pooler: MultiScaleRoIAlign,
    features: dict[str, torch.Tensor],
    boxes: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
) -> torch.Tensor:
    """``pooler(features, boxes, image_sizes)`` with one host sync: torchvision
    finds each level's boxes with a ``torch.where`` (a sync per level); here the
    boxes are sorted by level once and the per-level counts read in one transfer.
    Each box is pooled by the same ``roi_align`` call on the same level, so the
    result is the same."""
    levels = _filter_input(features, pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            levels, image_sizes, pooler.canonical_scale, pooler.canonical_level
        )
    rois = roi_table(boxes)
    options = {"output_size": pooler.output_size, "sampling_ratio": pooler.sampling_ratio}
    if len(levels) == 1:
        return roi_align(levels[0], rois, spatial_scale=pooler.scales[0], **options)
    level_of = pooler.map_levels([rois[:, 1:]])  # every box's area at once, not per image
    order = level_of.argsort(stable=True)
    # counted with index_add_: bincount reads the input's range back first (2 syncs)
    counts = (
        torch.zeros(len(levels), dtype=torch.int64, device=level_of.device)
        .index_add_(0, level_of, torch.ones_like(level_of))
        .tolist()
    )
    pooled = torch.cat(
        [
            roi_align(feature, part, spatial_scale=scale, **options)
            for feature, scale, part in zip(
                levels, pooler.scales, rois[order].split(counts), strict=True
            )
        ]
    ).to(levels[0].dtype)
    result = torch.empty_like(pooled)
    result[order] = pooled
    return result


def roi_table(boxes: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's ``_convert_to_roi_format(boxes)``: ``[K, 5]`` rows ``(image
    index, x1, y1, x2, y2)``, the indices made on the host in one transfer rather
    than filled on the device one image at a time."""
    concat = torch.cat(boxes)
    ids = np.repeat(np.arange(len(boxes)), [len(b) for b in boxes])[:, None]
    return torch.cat([device_tensor(ids, concat.device, concat.dtype), concat], 1)
