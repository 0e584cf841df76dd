"""The ROI heads' inference with per-image options.

torchvision's ``RoIHeads.postprocess_detections`` applies one score threshold,
one NMS threshold and one top-k to the whole batch. These functions run the same
steps in the same order (score threshold, small-box removal, per-class NMS,
top-k) with each image's own options, and run the mask head only on the boxes
that are kept.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import batched_nms
from torchvision.ops import boxes as box_ops

from model.options import PredictOptions


def select_boxes(
    heads: RoIHeads,
    features: dict[str, torch.Tensor],
    proposals: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    options: Sequence[PredictOptions],
) -> list[dict[str, torch.Tensor]]:
    """Box head on the proposals, then each image's selection.

    Returns per image ``boxes`` ``[N, 4]`` (in the network's resized frame),
    ``scores`` ``[N]`` and ``labels`` ``[N]`` (network labels, 1..K-1), scores descending.
    """
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
    # float32 from here on, also under autocast: box corners decoded in half
    # precision would be rounded to 0.5 px (fp16) or 4 px (bf16) at 800 px, and
    # batched NMS's class offsets overflow fp16
    class_logits, box_regression = (t.float() for t in heads.box_predictor(box_features))
    boxes = heads.box_coder.decode(box_regression, proposals)
    scores = F.softmax(class_logits, -1)
    per_image = [len(p) for p in proposals]
    kept = []
    for image_boxes, image_scores, size, opts in zip(
        boxes.split(per_image), scores.split(per_image), image_sizes, options, strict=True
    ):
        kept.append(_select_image(image_boxes, image_scores, size, opts))
    return kept


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
        wanted = torch.tensor(sorted(opts.classes), device=labels.device, dtype=labels.dtype)
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
    features: dict[str, torch.Tensor],
    detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """Mask probabilities ``[N, M, M]`` per image for its kept boxes and labels."""
    boxes = [det["boxes"] for det in detections]
    if sum(len(b) for b in boxes) == 0:
        size = heads.mask_roi_pool.output_size[0] * 2
        return [b.new_zeros((0, size, size)) for b in boxes]
    mask_features = heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes))
    mask_logits = heads.mask_predictor(mask_features)
    # torchvision's maskrcnn_inference takes the sigmoid of every class's mask and
    # then keeps one; keeping first is the same numbers for 1/K of the work, and
    # the float32 sigmoid keeps half-precision logits from coarsening the mask edges
    labels = torch.cat([det["labels"] for det in detections])
    picked = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return list(picked.float().sigmoid().split([len(b) for b in boxes]))
