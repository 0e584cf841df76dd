"""Pooling the ROI heads' inputs: each box's features from its FPN level.

``pool_rois`` is torchvision's ``MultiScaleRoIAlign`` with fewer host syncs. On
the CPU it pools by ``gather_pool`` instead of ``roi_align``: torchvision's CPU
kernel runs on one core and reads each channel's plane at scattered places (the
box pooling of 1,000 proposals at 800x1088 took 223 ms with R50-FPN), while the
same bilinear samples, read as rows of channels-last feature maps and summed by
``embedding_bag``, took 22 ms on the same 2-core machine. Every level is read as
one table of rows (``feature_rows``), so all boxes are pooled by one call, in
their own order: no sort by level, no concatenation, no scatter back.
"""

import numpy as np
import torch
import torch.nn.functional as F
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
    boxes are sorted by level once and the per-level counts read in one transfer,
    and each is pooled by the same ``roi_align`` call on the same level: the same
    numbers. On the CPU, ``gather_pool`` pools every box on the same level with
    the same samples and weights, summed in another order (float32 rounding
    apart), into a channels-last result."""
    levels = _filter_input(features, pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            levels, image_sizes, pooler.canonical_scale, pooler.canonical_level
        )
    rois = roi_table(boxes)
    options = {"output_size": pooler.output_size, "sampling_ratio": pooler.sampling_ratio}
    if rois.device.type == "cpu" and pooler.sampling_ratio > 0:
        level_of = None if len(levels) == 1 else pooler.map_levels([rois[:, 1:]])
        return gather_pool(levels, pooler.scales, rois, level_of, **options)
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


def gather_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """``roi_align(features, rois, output_size, spatial_scale, sampling_ratio)``
    (``aligned=False``) by ``gather_pool``: one level."""
    return gather_pool([features], [spatial_scale], rois, None, output_size, sampling_ratio)


def gather_pool(
    levels: list[torch.Tensor],
    scales: list[float],
    rois: torch.Tensor,
    level_of: torch.Tensor | None,
    output_size: int | tuple[int, int],
    sampling_ratio: int,
) -> torch.Tensor:
    """Each box of ``rois`` ``[K, 5]`` pooled from ``levels[level_of[k]]`` (``[N, C,
    H, W]`` at ``scales[...]``; ``level_of`` ``None``: one level) as ``roi_align``
    pools it (``aligned=False``, a fixed ``sampling_ratio`` > 0): ``[K, C, h, w]``,
    channels-last.

    Each output bin is a weighted sum of the features at the four neighbours of
    each of its sampling points, with the weights of torchvision's kernel (its
    sample positions, clamping and out-of-map rule, computed in the same order).
    With the levels as one table of rows of ``C`` values (``feature_rows``), that
    is one ``embedding_bag`` of ``4 * sampling_ratio**2`` rows per bin."""
    height, width = output_size if isinstance(output_size, tuple) else (output_size,) * 2
    rows, places = feature_rows(levels)
    count, channels, device = len(rois), rows.shape[1], rois.device
    if count == 0:
        return rows.new_zeros((0, height, width, channels)).permute(0, 3, 1, 2)
    if level_of is None:
        level_of = torch.zeros(count, dtype=torch.int64, device=device)
    # each box's level: its scale, map height and width, and where its rows are
    table = [
        [scale, level.shape[2], level.shape[3], *place]
        for scale, level, place in zip(scales, levels, places, strict=True)
    ]
    scale, map_h, map_w, first, per_image, per_row, per_column = device_tensor(
        table, device, torch.float64
    )[level_of].unbind(1)
    map_h, map_w = map_h.long(), map_w.long()
    first = first.long() + rois[:, 0].long() * per_image.long()
    coords = rois[:, 1:].float() * scale.float()[:, None]
    # torchvision (aligned=False): a box at least one feature cell wide and high
    box_w = (coords[:, 2] - coords[:, 0]).clamp(min=1.0)
    box_h = (coords[:, 3] - coords[:, 1]).clamp(min=1.0)
    ys, y_weight = _sample_axis(coords[:, 1], box_h / height, height, sampling_ratio, map_h)
    xs, x_weight = _sample_axis(coords[:, 0], box_w / width, width, sampling_ratio, map_w)
    # [K, h, r, w, r, 2, 2]: every bin's samples and their corner neighbours
    per_box = (-1, 1, 1, 1, 1, 1, 1)
    index = (
        first.view(per_box)
        + ys[:, :, :, None, None, :, None] * per_row.long().view(per_box)
        + xs[:, None, None, :, :, None, :] * per_column.long().view(per_box)
    )
    weight = y_weight[:, :, :, None, None, :, None] * x_weight[:, None, None, :, :, None, :]
    # bins together: [K, h, w, (r, r, 2, 2)]
    index = index.permute(0, 1, 3, 2, 4, 5, 6).reshape(-1)
    weight = (weight / sampling_ratio**2).permute(0, 1, 3, 2, 4, 5, 6).reshape(-1)
    offsets = torch.arange(0, index.numel(), 4 * sampling_ratio**2, device=device)
    pooled = F.embedding_bag(
        index, rows, offsets, mode="sum", per_sample_weights=weight.to(rows.dtype)
    )
    return pooled.view(count, height, width, channels).permute(0, 3, 1, 2)


def _sample_axis(
    start: torch.Tensor, bin_size: torch.Tensor, bins: int, ratio: int, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, each box's sampling points' two neighbours ``[K, bins, ratio,
    2]`` (low, high) and their bilinear weights, zero for a point outside ``[-1,
    size]`` (``size`` ``[K]``: each box's map's): torchvision's
    ``pre_calc_for_bilinear_interpolate``."""
    cell = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    step = torch.arange(ratio, dtype=start.dtype, device=start.device)[None, None, :] + 0.5
    bin_size, size = bin_size[:, None, None], size[:, None, None]
    at = start[:, None, None] + cell * bin_size + step * bin_size / ratio
    inside = (at >= -1.0) & (at <= size)
    at = at.clamp(min=0)
    low = at.long()
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, size - 1, low + 1)
    frac = torch.where(last, 0.0, at - low)
    weights = torch.stack([1 - frac, frac], -1) * inside[..., None]
    return torch.stack([low, high], -1), weights


def feature_rows(levels: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The levels ``[N, C, H, W]`` as one table ``[rows, C]`` and, per level, where
    its rows are: ``(first row, rows from one image to the next, from one map row
    to the next, from one column to the next)``. The table is the levels' own
    memory where each position's ``C`` values are contiguous and every level lies
    in one buffer (as the OpenVINO runtime and ``as_row_views`` make them), else a
    copy, level after level."""
    channels = levels[0].shape[1]
    if _in_one_buffer(levels):
        base = min(levels, key=torch.Tensor.data_ptr)
        places, extent = [], 0
        for level in levels:
            first = (level.data_ptr() - base.data_ptr()) // (channels * level.element_size())
            steps = [level.stride(d) // channels for d in (0, 2, 3)]
            dims = (level.shape[0], level.shape[2], level.shape[3])
            places.append((first, *steps))
            reach = sum((n - 1) * step for n, step in zip(dims, steps, strict=True))
            extent = max(extent, first + reach + 1)
        return base.as_strided((extent, channels), (channels, 1)), places
    rows = [level.permute(0, 2, 3, 1).reshape(-1, channels) for level in levels]
    starts = np.cumsum([0, *[len(r) for r in rows[:-1]]]).tolist()
    sizes = [level.shape[2:] for level in levels]
    places = [(first, h * w, w, 1) for first, (h, w) in zip(starts, sizes, strict=True)]
    return torch.cat(rows), places


def _in_one_buffer(levels: list[torch.Tensor]) -> bool:
    first = levels[0]
    channels, storage = first.shape[1], first.untyped_storage().data_ptr()
    return all(
        level.dtype == first.dtype
        and level.untyped_storage().data_ptr() == storage
        and level.stride(1) == 1
        and all(level.stride(d) % channels == 0 for d in (0, 2, 3))
        and (level.data_ptr() - first.data_ptr()) % (channels * level.element_size()) == 0
        for level in levels
    )


def as_row_views(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feature maps copied into one buffer, level after level, channels-last:
    what ``feature_rows`` reads without a copy."""
    channels = next(iter(maps.values())).shape[1]
    rows = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, channels) for m in maps.values()])
    views, start = {}, 0
    for name, m in maps.items():
        n, _, h, w = m.shape
        views[name] = rows[start : start + n * h * w].view(n, h, w, channels).permute(0, 3, 1, 2)
        start += n * h * w
    return views


def image_row_views(
    rows: torch.Tensor, shapes: dict[str, tuple[int, int]], images: int
) -> dict[str, torch.Tensor]:
    """Maps ``{name: [images, C, H, W]}`` (``shapes``: each level's ``(H, W)``) as
    views of the table ``rows`` ``[images * R, C]`` that holds each image's ``R``
    rows together, its levels one after another in ``(y, x)`` order: the layout
    of the OpenVINO runtime, which runs the backbone one image at a time."""
    channels = rows.shape[1]
    per_image = len(rows) // images
    views, start = {}, 0
    for name, (h, w) in shapes.items():
        level = rows.as_strided(
            (images, h, w, channels),
            (per_image * channels, w * channels, channels, 1),
            start * channels,
        )
        views[name] = level.permute(0, 3, 1, 2)
        start += h * w
    return views


def roi_table(boxes: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's ``_convert_to_roi_format(boxes)``: ``[K, 5]`` rows ``(image
    index, x1, y1, x2, y2)``, the indices made on the host in one transfer rather
    than filled on the device one image at a time."""
    concat = torch.cat(boxes)
    ids = np.repeat(np.arange(len(boxes)), [len(b) for b in boxes])[:, None]
    return torch.cat([device_tensor(ids, concat.device, concat.dtype), concat], 1)
