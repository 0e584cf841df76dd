"""The ROI heads' inference with per-image options.

torchvision's ``RoIHeads.postprocess_detections`` applies one score threshold,
one NMS threshold and one top-k to the whole batch. These functions run the same
steps in the same order (score threshold, small-box removal, per-class NMS,
top-k) with each image's own options, and run the mask head only on the boxes
that are kept.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import batched_nms
from torchvision.ops import boxes as box_ops

from model.inference.boxes import decode_boxes
from model.inference.nms import device_tensor, greedy_nms_top
from model.inference.options import PredictOptions
from model.inference.pooling import pool_rois
from model.inference.proposals import clip_boxes, image_limits, offset_groups

# The batched selection's NMS keeps a half matrix of images x candidates^2
# elements (candidates: boxes over the score threshold, of the image with most)
# and builds it with float32 temporaries of up to candidates^2 per image; past
# either bound the selection goes image by image.
_MAX_DENSE_ELEMENTS = 2**28  # 512 MiB
_MAX_DENSE_CANDIDATES = 4096  # 64 MiB per temporary
# NMS rounds run before their check is read (see ``model.inference.nms.greedy_nms_top``):
# the bench images needed 2 with R50-FPN's random weights, 1 with the demo model
NMS_ROUNDS = 8


def select_boxes(
    heads: RoIHeads,
    classify: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    features: dict[str, torch.Tensor],
    proposals: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    options: Sequence[PredictOptions],
    vectorized: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Box head on the proposals (``classify``: the runtime's box head and
    predictor, ``model.inference.runtimes``), then each image's selection: image by image,
    or (``vectorized``) for the whole batch in one set of tensor operations with
    the same result (see ``model.inference.nms``), which pays where host syncs are dear.

    Returns per image ``boxes`` ``[N, 4]`` (in the network's resized frame),
    ``scores`` ``[N]`` and ``labels`` ``[N]`` (network labels, 1..K-1), scores descending.
    """
    pooled = pool_rois(heads.box_roi_pool, features, proposals, image_sizes)
    # float32 from here on, also under autocast: box corners decoded in half
    # precision would be rounded to 0.5 px (fp16) or 4 px (bf16) at 800 px, and
    # batched NMS's class offsets overflow fp16
    class_logits, box_regression = (t.float() for t in classify(pooled))
    # [R, classes, 4]: each proposal's box for every class
    boxes = decode_boxes(
        heads.box_coder, box_regression.unflatten(1, (-1, 4)), torch.cat(proposals)[:, None]
    )
    scores = F.softmax(class_logits, -1)
    per_image = [len(p) for p in proposals]
    if vectorized:
        kept = _select_batch(boxes, scores, per_image, image_sizes, options)
        if kept is not None:
            return kept
    return [
        _select_image(image_boxes, image_scores, size, opts)
        for image_boxes, image_scores, size, opts in zip(
            boxes.split(per_image), scores.split(per_image), image_sizes, options, strict=True
        )
    ]


def _candidates(
    boxes: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, options: Sequence[PredictOptions]
) -> torch.Tensor:
    """``[R, classes - 1]``: which (proposal, class) pairs pass their image's score
    threshold and class filter and are not degenerate boxes (``rows``: each
    proposal's image)."""
    device = boxes.device
    thresholds = device_tensor([o.score_threshold for o in options], device, scores.dtype)
    candidate = scores >= thresholds[rows][:, None]
    if any(o.classes is not None for o in options):
        wanted = [
            [o.classes is None or label in o.classes for label in range(1, scores.shape[-1] + 1)]
            for o in options
        ]
        candidate &= device_tensor(wanted, device, torch.bool)[rows]
    candidate &= (boxes[..., 2] - boxes[..., 0] >= 1e-2) & (boxes[..., 3] - boxes[..., 1] >= 1e-2)
    return candidate


def _rows_by_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    candidate: torch.Tensor,
    rows: torch.Tensor,
    counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of each image in a row of their own, padded to the widest
    (score ``-inf``), in descending score order (torchvision's NMS sorts stably):
    boxes ``[images, widest, 4]``, scores and network labels ``[images, widest]``."""
    device, num_images, widest = boxes.device, len(counts), max(counts)
    num_labels = scores.shape[-1]  # classes without the background
    flat = torch.nonzero_static(candidate.view(-1), size=sum(counts)).squeeze(1)
    image = rows[flat // num_labels]
    starts = device_tensor([0, *np.cumsum(counts)[:-1].tolist()], device, torch.int64)
    slot = torch.arange(len(flat), device=device) - starts[image]
    padded_boxes = boxes.new_zeros((num_images, widest, 4))
    padded_boxes[image, slot] = boxes.reshape(-1, 4)[flat]
    padded_scores = scores.new_full((num_images, widest), -torch.inf)
    padded_scores[image, slot] = scores.reshape(-1)[flat]
    labels = torch.zeros((num_images, widest), dtype=torch.int64, device=device)
    labels[image, slot] = flat % num_labels + 1
    order = padded_scores.sort(dim=1, descending=True, stable=True).indices
    return (
        padded_boxes.gather(1, order[:, :, None].expand(-1, -1, 4)),
        padded_scores.gather(1, order),
        labels.gather(1, order),
    )


def _select_batch(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    per_image: list[int],
    image_sizes: list[tuple[int, int]],
    options: Sequence[PredictOptions],
) -> list[dict[str, torch.Tensor]] | None:
    """``_select_image`` for every image at once: two host syncs per batch (one more
    for each further ``NMS_ROUNDS`` the NMS needs), rather than two or more per image.
    ``None`` where the batch has more candidates than the dense NMS takes
    (``_MAX_DENSE_*``)."""
    device = boxes.device
    num_images = len(per_image)
    rows = torch.arange(num_images, device=device).repeat_interleave(
        device_tensor(per_image, device, torch.int64), output_size=len(scores)
    )
    boxes = clip_boxes(boxes, image_limits(image_sizes, device, boxes.dtype)[rows])[:, 1:]
    scores = scores[:, 1:]
    candidate = _candidates(boxes, scores, rows, options)
    counts = (
        torch.zeros(num_images, dtype=torch.int64, device=device)
        .index_add_(0, rows, candidate.sum(1))
        .tolist()
    )
    widest = max(counts)
    if widest > _MAX_DENSE_CANDIDATES or num_images * widest**2 > _MAX_DENSE_ELEMENTS:
        return None
    if widest == 0:
        return [
            {
                "boxes": boxes.new_zeros((0, 4)),
                "scores": scores.new_zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64, device=device),
            }
            for _ in range(num_images)
        ]

    boxes, scores, labels = _rows_by_image(boxes, scores, candidate, rows, counts)
    valid = scores > -torch.inf
    # the first max_detections kept, still by descending score
    return greedy_nms_top(
        offset_groups(boxes, valid, labels),
        valid,
        [o.iou_threshold for o in options],
        scores,
        [o.max_detections for o in options],
        rounds=NMS_ROUNDS,
        classes=labels,
        boxes=boxes,
        labels=labels,
    )


def _select_image(
    boxes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int], opts: PredictOptions
) -> dict[str, torch.Tensor]:
    num_classes = scores.shape[-1]
    boxes = box_ops.clip_boxes_to_image(boxes, size)
    labels = torch.arange(num_classes, device=boxes.device).expand_as(scores)
    # drop the background column, then one candidate per (proposal, class)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    keep = scores >= opts.score_threshold
    if opts.classes is not None:
        wanted = device_tensor(sorted(opts.classes), labels.device, labels.dtype)
        keep &= torch.isin(labels, wanted)
    # remove_small_boxes' test folded into the same mask, and one integer index for
    # the three tensors: one host sync where boolean indexing takes four (on a GPU,
    # syncs were the largest host cost in bench/profile_batch.py)
    keep &= (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
    index = keep.nonzero().squeeze(1)
    boxes, scores, labels = boxes[index], scores[index], labels[index]
    keep = batched_nms(boxes, scores, labels, opts.iou_threshold)[: opts.max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def predict_masks(
    heads: RoIHeads,
    segment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: dict[str, torch.Tensor],
    detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """Mask probabilities ``[N, M, M]`` per image for its kept boxes and labels
    (``segment``: the runtime's mask head and predictor, each box's own label's
    logits)."""
    boxes = [det["boxes"] for det in detections]
    if sum(len(b) for b in boxes) == 0:
        size = heads.mask_roi_pool.output_size[0] * 2
        return [b.new_zeros((0, size, size)) for b in boxes]
    pooled = pool_rois(heads.mask_roi_pool, features, boxes, image_sizes)
    # torchvision's maskrcnn_inference takes the sigmoid of every class's mask and
    # then keeps one; keeping first is the same numbers for 1/K of the work, and
    # the float32 sigmoid keeps half-precision logits from coarsening the mask edges
    picked = segment(pooled, torch.cat([det["labels"] for det in detections]))
    return list(picked.float().sigmoid().split([len(b) for b in boxes]))
