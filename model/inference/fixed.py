"""Fixed-shape steps of the detector's inference, for ``model.inference.static``.

Every tensor's shape here follows from the batch size, the padded canvas and the
fixed sizes (``StaticSizes``), never from the data: what the data decides (how many
proposals survive, which ROIs sit on which pyramid level, how many detections an
image keeps) travels as validity masks. So no step waits for the device, and the
steps can be captured in a CUDA graph. Each step computes what its dynamic
counterpart in ``model.inference.proposals`` / ``model.inference.heads`` computes
for the entries that are valid, with the same float operations in the same order.
"""

import numpy as np
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales

from model.inference.nms import Suppression, device_tensor, iou_threshold_for
from model.inference.proposals import COORDINATE_TRICK_LIMIT, clip_boxes, offset_groups


class Constants:
    """Small index tensors that depend only on shapes, made once per shape: made
    inside a CUDA graph capture they would be host-to-device copies of host
    memory the graph does not own."""

    def __init__(self):
        self._made: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, make) -> torch.Tensor:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def run_suppression(suppression: Suppression, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` rounds (at least 2) of greedy NMS; returns which boxes are kept
    ``[G, n]`` and each group's decided prefix ``[G]``: the position of its first
    valid box that the last round changed (``n`` if none). A box's decision
    depends only on the boxes ahead of it, so a prefix that a round left as it was
    is a fixed point of the prefix alone: greedy NMS's decisions there."""
    groups, n = suppression.valid.shape
    positions = torch.arange(n, device=suppression.valid.device)
    if not suppression.weights:
        return suppression.valid.clone(), positions.new_full((groups,), n)
    suppression.run(max(rounds, 2) - 1)
    before = suppression.keep
    keep = suppression.run(1)
    changed = torch.cat([(k != b)[:, :, 0] for k, b in zip(suppression.keep, before, strict=True)])
    changed &= suppression.valid
    return keep, torch.where(changed, positions, n).amin(1)


def fixed_proposals(
    rpn: RegionProposalNetwork,
    proposals: torch.Tensor,
    objectness: torch.Tensor,
    limits: torch.Tensor,
    per_level: list[int],
    *,
    post_nms_top_n: int,
    rounds: int,
    constants: Constants,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model.inference.proposals.filter_proposals`` with fixed shapes: per image
    the top ``pre_nms_top_n`` anchors of each level, clipped to the image's
    ``limits`` (``[B, 4]``), small and low-scoring ones masked, NMS within each
    level in ``rounds`` rounds, the best ``post_nms_top_n`` kept by score.

    Returns boxes ``[B, P, 4]``, which are valid ``[B, P]`` (an image with fewer
    proposals has masked slots at the end) and per image whether they are exact
    ``[B]``: all from the NMS's decided prefixes (``run_suppression``), that is
    every box still undecided scores below the last one kept."""
    num_images, device = proposals.shape[0], proposals.device
    objectness = objectness.reshape(num_images, -1)
    taken = [min(rpn.pre_nms_top_n(), count) for count in per_level]
    top = rpn._get_top_n_idx(objectness, per_level)
    n, levels = max(taken), len(taken)
    slots, present = level_slots(taken, device, constants)
    index = top[:, slots]
    scores = objectness.gather(1, index).sigmoid().view(num_images, levels, n)
    boxes = proposals.gather(1, index[:, :, None].expand(-1, -1, 4))
    boxes = clip_boxes(boxes, limits).view(num_images, levels, n, 4)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = present & (widths >= rpn.min_size) & (heights >= rpn.min_size)
    valid &= scores >= rpn.score_thresh
    group = torch.arange(levels, device=device)[None, :, None].expand_as(valid)
    thresholds = constants.get(
        ("rpn-iou", num_images * levels, device),
        lambda: device_tensor(
            [iou_threshold_for(rpn.nms_thresh, device)] * (num_images * levels),
            device,
            torch.float32,
        ),
    )
    suppression = Suppression(
        offset_groups(boxes, valid, group).view(-1, n, 4), valid.view(-1, n), thresholds
    )
    keep, decided = run_suppression(suppression, rounds)
    keep = keep.view(num_images, -1)
    kept = min(post_nms_top_n, keep.shape[1])
    ranked = torch.where(keep, scores.view(num_images, -1), -torch.inf)
    ranked, order = ranked.sort(dim=1, descending=True, stable=True)
    order, last = order[:, :kept], ranked[:, kept - 1]
    boxes = boxes.view(num_images, -1, 4).gather(1, order[:, :, None].expand(-1, -1, 4))
    undecided = best_undecided(scores, decided.view(num_images, levels))
    exact = (undecided == -torch.inf) | (last > undecided)
    return boxes, keep.gather(1, order), exact


def level_slots(
    taken: list[int], device: torch.device, constants: Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L * n]`` indices into the levels' concatenated top-k (each level's padded
    to the longest, ``n``, by repeating its last) and ``[L, n]`` which are real."""
    n = max(taken)

    def make_slots() -> torch.Tensor:
        position, lengths = np.arange(n), np.array(taken)[:, None]
        starts = np.cumsum([0, *taken[:-1]])[:, None]
        slots = starts + np.minimum(position, lengths - 1)
        return device_tensor(slots.ravel(), device, torch.int64)

    def make_present() -> torch.Tensor:
        return device_tensor(np.arange(n) < np.array(taken)[:, None], device, torch.bool)

    key = (tuple(taken), device)
    slots = constants.get(("slots", *key), make_slots)
    return slots, constants.get(("present", *key), make_present)


def best_undecided(scores: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
    """``[B]``: the highest score of a box NMS has not decided yet (``-inf`` if
    none), from ``scores`` ``[B, L, n]`` (each level in descending order, so its
    first undecided box is its best) and the levels' decided prefixes ``[B, L]``."""
    n = scores.shape[2]
    first = scores.gather(2, decided.clamp(max=n - 1)[:, :, None])[:, :, 0]
    return torch.where(decided < n, first, -torch.inf).amax(1)


def roi_rows(boxes: torch.Tensor) -> torch.Tensor:
    """``[B * N, 5]`` rows ``(image index, x1, y1, x2, y2)`` of boxes ``[B, N, 4]``."""
    num_images, n, _ = boxes.shape
    ids = torch.arange(num_images, device=boxes.device, dtype=boxes.dtype)
    return torch.cat([ids[:, None, None].expand(num_images, n, 1), boxes], 2).view(-1, 5)


def pool_fixed(
    pooler: MultiScaleRoIAlign,
    features: dict[str, torch.Tensor],
    rois: torch.Tensor,
    canvas: tuple[int, int],
) -> torch.Tensor:
    """``pooler(features, boxes, image_sizes)`` for ``rois`` ``[K, 5]`` (``roi_rows``)
    without finding each level's ROIs: every ROI is pooled on every level and each
    keeps its own level's result (``torch.where``). Each ROI's numbers are the same
    ``roi_align`` on the same level as torchvision's; the cost is one ``roi_align``
    over all ROIs per level (4 on an FPN) instead of one over each level's share,
    against a host sync (and a ``nonzero``) per level."""
    levels = _filter_input(features, pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            levels, [canvas], pooler.canonical_scale, pooler.canonical_level
        )
    options = {"output_size": pooler.output_size, "sampling_ratio": pooler.sampling_ratio}
    if len(levels) == 1:
        return roi_align(levels[0], rois, spatial_scale=pooler.scales[0], **options)
    level_of = pooler.map_levels([rois[:, 1:]])[:, None, None, None]
    result = None
    for index, (feature, scale) in enumerate(zip(levels, pooler.scales, strict=True)):
        pooled = roi_align(feature, rois, spatial_scale=scale, **options).to(levels[0].dtype)
        result = pooled if result is None else torch.where(level_of == index, pooled, result)
    return result


def select_fixed(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    candidate: torch.Tensor,
    iou_thresholds: torch.Tensor,
    max_detections: torch.Tensor,
    *,
    candidates: int,
    slots: int,
    rounds: int,
) -> dict[str, torch.Tensor]:
    """The box head's selection with fixed shapes (``heads._select_batch``'s steps):
    per image the best ``candidates`` (proposal, class) pairs by score (a stable
    sort: ties in torchvision's order), class-aware NMS in ``rounds`` rounds at the
    image's threshold, the first ``slots`` kept.

    ``boxes`` ``[B, P, L, 4]``, ``scores`` and ``candidate`` ``[B, P, L]`` (``L``:
    the classes without the background); ``iou_thresholds`` ``[B]`` (rounded by
    ``iou_threshold_for``), ``max_detections`` ``[B]``. Returns ``boxes`` ``[B, S,
    4]``, ``scores`` and ``labels`` (network labels) ``[B, S]``, ``counts`` ``[B]``
    (the valid slots, first) and ``exact`` ``[B]``: whether those are greedy NMS's
    detections: either the NMS decided all the image's candidates (all among the
    best ``candidates``), or its decided prefix (``run_suppression``; the best
    ``candidates`` are a prefix too) holds ``max_detections`` kept boxes."""
    num_labels = scores.shape[2]
    boxes, scores = boxes.flatten(1, 2), scores.flatten(1)
    candidate = candidate.flatten(1)
    count = candidate.sum(1)
    step = class_step(boxes, candidate, count)
    width = min(candidates, scores.shape[1])
    ranked = torch.where(candidate, scores, -torch.inf)
    order = ranked.sort(dim=1, descending=True, stable=True).indices[:, :width]
    valid = candidate.gather(1, order)
    labels = order % num_labels + 1
    picked = boxes.gather(1, order[:, :, None].expand(-1, -1, 4))
    moved = picked + (labels.to(picked) * step[:, None])[:, :, None]
    suppression = Suppression(moved, valid, iou_thresholds, classes=labels)
    keep, decided = run_suppression(suppression, rounds)
    # the first ``slots`` kept, in score order: kept positions ascending
    width_index = torch.arange(width, device=keep.device)
    first = torch.where(keep, width_index, width).sort(dim=1).values[:, :slots]
    first = first.clamp_(max=width - 1)
    kept = keep.sum(1)
    wanted = torch.minimum(kept, max_detections)
    counts = wanted.clamp(max=first.shape[1])
    # decided: every candidate is among the best and NMS decided them all, or the
    # decided prefix already holds max_detections kept boxes
    complete = (decided == width) & (count <= width)
    enough = (keep & (width_index < decided[:, None])).sum(1) >= max_detections
    exact = (complete | enough) & (counts == wanted)
    return {
        "boxes": picked.gather(1, first[:, :, None].expand(-1, -1, 4)),
        "scores": scores.gather(1, order).gather(1, first),
        "labels": labels.gather(1, first),
        "counts": counts,
        "exact": exact,
    }


def class_step(boxes: torch.Tensor, candidate: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[B]``: how far torchvision's ``batched_nms`` moves each class apart (label
    times the largest candidate coordinate + 1) when the image has few enough
    candidates for that, else 0; the offsets only move float32 rounding."""
    limit = COORDINATE_TRICK_LIMIT.get(boxes.device.type, COORDINATE_TRICK_LIMIT["cuda"])
    largest = torch.where(candidate[:, :, None], boxes, -torch.inf).amax(dim=(1, 2))
    return torch.where((count > 0) & (count * 4 <= limit), largest + 1, 0)
