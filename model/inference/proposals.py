"""The RPN's inference with the whole batch's proposal filtering at once.

torchvision's ``RegionProposalNetwork.filter_proposals`` loops over the images:
per image it clips, drops small and low-scoring boxes, runs NMS per level and
keeps the top ``post_nms_top_n``, with three host syncs and a few dozen small
kernels each. ``propose`` runs the same steps for every image in whole-batch
tensor operations (``model.inference.nms.greedy_nms_top`` for the NMS) and gives the same
boxes in the same order; only the split into per-image tensors at the end waits
for the device.
"""

from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from model.inference.boxes import decode_boxes
from model.inference.nms import device_tensor, greedy_nms_top
from model.inference.runtimes import DenseFeatures


def _torchvision_version() -> tuple[int, int]:
    major, minor = torchvision.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# torchvision's batched_nms offsets each group's coordinates into a range of its
# own (one NMS call) up to these many box coordinates, and calls NMS once per
# group above; the offsets move float32 rounding, so they are reproduced here.
# The GPU limit rose from 20,000 to 100,000 in torchvision 0.22.
COORDINATE_TRICK_LIMIT = {
    "cpu": 4000,
    "cuda": 100_000 if _torchvision_version() >= (0, 22) else 20_000,
}


# NMS rounds run before their check is read (see ``model.inference.nms.greedy_nms_top``):
# the bench images needed 14 with R50-FPN's random weights, 3 with the demo model
NMS_ROUNDS = 16


def propose(
    rpn: RegionProposalNetwork,
    images: ImageList,
    dense: DenseFeatures,
    anchors: "AnchorCache | None" = None,
    *,
    vectorized: bool = True,
) -> list[torch.Tensor]:
    """``rpn(images, features)[0]`` in eval mode, from the features and RPN head
    outputs a runtime gave (``dense``): the proposals of each image. ``anchors``: a
    cache of the anchors by batch geometry (computed otherwise). ``vectorized``:
    filtered by ``filter_proposals`` for the whole batch at once, else by
    torchvision's own loop over the images (cheaper on the CPU)."""
    levels = list(dense.maps.values())
    objectness, deltas = dense.objectness, dense.deltas
    if anchors is None:
        anchors = rpn.anchor_generator(images, levels)
    else:
        anchors = anchors.get(rpn.anchor_generator, images, levels)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    if not vectorized:
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)[0]
    # every image's anchors are the same tensor when they come from the cache
    same = all(a is anchors[0] for a in anchors)
    reference = anchors[0] if same else torch.stack(anchors)
    proposals = decode_boxes(rpn.box_coder, deltas.view(len(anchors), -1, 4), reference)
    boxes, _ = filter_proposals(rpn, proposals, objectness, images.image_sizes, per_level)
    return boxes


class AnchorCache:
    """The anchors of the last ``size`` batch geometries (padded batch size, feature
    map sizes, dtype, device). torchvision's ``AnchorGenerator`` builds them anew
    for every batch, about fifty small kernels, although they depend on nothing
    else: every image of a batch has the same ones."""

    def __init__(self, size: int = 16):
        self.size = size
        self._anchors: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(
        self, generator: AnchorGenerator, images: ImageList, levels: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``generator(images, levels)``: one anchors tensor per image."""
        first = levels[0]
        sizes = tuple(tuple(level.shape[-2:]) for level in levels)
        key = (tuple(images.tensors.shape[-2:]), sizes, first.dtype, first.device)
        anchors = self._anchors.get(key)
        if anchors is None:
            one = ImageList(images.tensors[:1], images.image_sizes[:1])
            [anchors] = generator(one, [level[:1] for level in levels])
            self._anchors[key] = anchors
            if len(self._anchors) > self.size:
                self._anchors.popitem(last=False)
        else:
            self._anchors.move_to_end(key)
        return [anchors] * len(images.image_sizes)


def filter_proposals(
    rpn: RegionProposalNetwork,
    proposals: torch.Tensor,
    objectness: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    per_level: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``rpn.filter_proposals`` for the whole batch at once: per image, the top
    ``pre_nms_top_n`` anchors of each level, clipped, small (``min_size``) and
    low-scoring (``score_thresh``) ones dropped, NMS within each level, then the
    best ``post_nms_top_n`` by score. Returns per-image boxes and scores."""
    num_images = proposals.shape[0]
    device = proposals.device
    objectness = objectness.reshape(num_images, -1)
    taken = [min(rpn.pre_nms_top_n(), count) for count in per_level]
    top = rpn._get_top_n_idx(objectness, per_level)

    # [images, levels, n]: each level's candidates in topk (descending score)
    # order, padded to the longest level
    n = max(taken)
    position, lengths = np.arange(n), np.array(taken)[:, None]
    starts = np.cumsum([0, *taken[:-1]])[:, None]
    slots = starts + np.minimum(position, lengths - 1)
    index = top[:, device_tensor(slots.ravel(), device, torch.int64)]
    present = device_tensor(position < lengths, device, torch.bool)
    scores = objectness.gather(1, index).sigmoid().view(num_images, len(taken), n)
    boxes = proposals.gather(1, index[:, :, None].expand(-1, -1, 4))
    limits = image_limits(image_sizes, device, boxes.dtype)
    boxes = clip_boxes(boxes, limits).view(num_images, len(taken), n, 4)

    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = present & (widths >= rpn.min_size) & (heights >= rpn.min_size)
    valid &= scores >= rpn.score_thresh
    group = torch.arange(len(taken), device=device)[None, :, None].expand_as(valid)
    # each image's kept boxes by descending score, as torchvision's batched_nms
    # (stable sort over the level-ordered candidates) and keep[:post_nms_top_n]
    kept = greedy_nms_top(
        offset_groups(boxes, valid, group).view(-1, n, 4),
        valid.view(-1, n),
        rpn.nms_thresh,
        scores.view(num_images, -1),
        [rpn.post_nms_top_n()] * num_images,
        rounds=NMS_ROUNDS,
        boxes=boxes.view(num_images, -1, 4),
    )
    return [k["boxes"] for k in kept], [k["scores"] for k in kept]


def clip_boxes(boxes: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """``clip_boxes_to_image`` for boxes ``[R, N, 4]`` with a row's own
    ``(w, h, w, h)`` bounds, ``limits`` ``[R, 4]`` (see ``image_limits``)."""
    return torch.minimum(boxes.clamp(min=0), limits[:, None, :])


def image_limits(
    image_sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[B, 4]``: each image's ``(w, h, w, h)``, the upper bounds of its box corners."""
    return device_tensor([[w, h, w, h] for h, w in image_sizes], device, dtype)


def offset_groups(boxes: torch.Tensor, valid: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Boxes ``[B, ..., 4]`` moved as torchvision's ``batched_nms`` moves them for
    the image's NMS call: by ``group * (largest valid coordinate + 1)`` where the
    image has few enough valid boxes for its coordinate trick, else unmoved.
    Moved or not, groups never suppress each other in ``greedy_nms``; the offsets
    only reproduce torchvision's float32 rounding."""
    images = boxes.shape[0]
    flat_valid = valid.reshape(images, -1)
    limit = COORDINATE_TRICK_LIMIT.get(boxes.device.type, COORDINATE_TRICK_LIMIT["cuda"])
    trick = flat_valid.sum(1) * 4 <= limit
    coords = torch.where(flat_valid[:, :, None], boxes.reshape(images, -1, 4), -torch.inf)
    largest = coords.amax(dim=(1, 2))
    shape = (images,) + (1,) * (valid.dim() - 1)
    step = (largest + 1).view(shape)
    offsets = torch.where(trick.view(shape), group.to(boxes) * step, 0)
    return boxes + offsets[..., None]
