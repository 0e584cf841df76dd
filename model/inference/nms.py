"""Greedy non-maximum suppression for many groups of boxes at once.

torchvision's ``nms`` takes one set of boxes per call and returns a tensor whose
length only the device knows, so each call costs a host sync, and on a GPU its
last step runs on a single block of threads. A detector calls it once per image
in the RPN and again per image in the box head: with a batch of 8 on a GPU those
calls were about a sixth of the device time and most of the host's waiting
(``bench/profile_batch.py``).

``greedy_nms`` decides every group of a batch in a few whole-tensor steps. It
keeps exactly the boxes greedy NMS keeps: a box is kept unless a kept box earlier
in its group (higher scoring) overlaps it by more than the threshold. That rule
is a recursion on the order, and its fixed point is unique, so it is reached by
iterating ``keep = ~any(overlaps & keep)`` from ``keep = valid`` (an invalid box
suppresses nothing and is dropped at the end): after ``t`` rounds the first
``t`` boxes of every group are final, and real boxes settle in a handful of
rounds. On the bench images, where an RPN group holds 1,000 boxes, the RPN's
boxes changed for 14 rounds with R50-FPN's random weights and 3 with the demo
model; the box head's for 2 and 1. Only the check that a round changed nothing
waits for the device: ``greedy_nms`` checks every few rounds; ``greedy_nms_top``
runs a given number of rounds and reads the check back with the kept boxes'
counts, which are read anyway, so that in the usual case NMS costs no host sync.
"""

from collections.abc import Sequence

import numpy as np
import torch

# [groups, n, n] elements per chunk: the overlap test makes a few float32
# temporaries of this size (256 MiB each); each chunk then keeps a half matrix.
_CHUNK_ELEMENTS = 2**26
# Rounds run between two checks for convergence (each check is a host sync).
_ROUNDS_PER_CHECK = 4


def greedy_nms(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float | Sequence[float],
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which boxes greedy NMS keeps in each group.

    Args:
        boxes: ``[G, n, 4]`` ``(x1, y1, x2, y2)``, each group in descending score
            order (ties in the order torchvision's stable sort would put them).
        valid: ``[G, n]`` bool; invalid entries (padding, boxes filtered out
            before NMS) neither are kept nor suppress others.
        iou_threshold: a box is suppressed by an overlap strictly above this;
            one for all groups or one per group.
        classes: ``[G, n]``, optional: boxes suppress only boxes of their own
            class (``batched_nms``'s ``idxs``).

    Returns:
        ``[G, n]`` bool, ``torchvision.ops.nms``'s choice within each group. The
        overlap is computed with torchvision's formula and threshold rounding for
        the device; a GPU's fused multiply-add may still round an overlap within
        one unit of the threshold the other way.
    """
    suppression = Suppression(boxes, valid, iou_threshold, classes)
    while True:
        keep = suppression.run(_ROUNDS_PER_CHECK)
        if not suppression.unsettled.item():
            return keep


def greedy_nms_top(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float | Sequence[float],
    scores: torch.Tensor,
    tops: Sequence[int],
    /,
    *,
    rounds: int,
    classes: torch.Tensor | None = None,
    **rows: torch.Tensor,
) -> list[dict[str, torch.Tensor]]:
    """``top_kept(greedy_nms(boxes, valid, iou_threshold, classes).view(B, -1),
    scores, tops, **rows)`` (``B = len(scores)``: an image's groups in a row) with no
    host sync of its own: ``rounds`` rounds of NMS run unchecked, and whether they
    sufficed is read back with ``top_kept``'s lengths. When they did not, more rounds
    run and ``top_kept`` again."""
    suppression = Suppression(boxes, valid, iou_threshold, classes)
    while True:
        keep = suppression.run(rounds).view(len(scores), -1)
        kept = top_kept(keep, scores, tops, unsettled=suppression.unsettled, **rows)
        if kept is not None:
            return kept


class Suppression:
    """``greedy_nms``'s iteration, run a number of rounds at a time without waiting
    for the device; see the module docstring and ``greedy_nms`` for the arguments.
    ``iou_threshold`` may also be a ``[G]`` device tensor of thresholds already
    rounded by ``iou_threshold_for``: nothing is then copied from the host (a
    CUDA graph can capture the whole iteration)."""

    def __init__(
        self,
        boxes: torch.Tensor,
        valid: torch.Tensor,
        iou_threshold: float | Sequence[float] | torch.Tensor,
        classes: torch.Tensor | None = None,
    ):
        groups, n = valid.shape
        self.valid = valid
        # device bool: the last round changed something (a fixed point not reached)
        self.unsettled = torch.zeros((), dtype=torch.bool, device=valid.device)
        self.weights: list[torch.Tensor] = []
        if groups == 0 or n == 0:
            return
        per_chunk = max(1, _CHUNK_ELEMENTS // (n * n))
        if classes is None:
            classes = torch.zeros_like(valid, dtype=torch.int8)
        if isinstance(iou_threshold, torch.Tensor):  # [G], already iou_threshold_for's
            thresholds = iou_threshold.to(boxes.device, torch.float32)
        else:
            if isinstance(iou_threshold, int | float | np.floating):
                iou_threshold = [iou_threshold] * groups
            thresholds = device_tensor(
                [iou_threshold_for(t, boxes.device) for t in iou_threshold],
                boxes.device,
                torch.float32,
            )
        chunks = zip(
            boxes.split(per_chunk),
            valid.split(per_chunk),
            classes.split(per_chunk),
            thresholds.split(per_chunk),
            strict=True,
        )
        # A round counts each box's kept suppressors, a batched matrix-vector
        # product, and keeps the boxes with none: keep = max(1 - suppressors @ keep,
        # 0), two kernels (a round is host-bound on a GPU). Half precision is exact
        # enough: a sum of ones never rounds below one. Invalid boxes' rows are left
        # unmasked until the end; their columns are zero, so they never suppress.
        # Autocast is off, or bf16 autocast would cast the whole matrix again in
        # every round.
        dtype = torch.float16 if boxes.device.type == "cuda" else torch.float32
        with torch.autocast(boxes.device.type, enabled=False):
            self.weights = [suppressors(*chunk).to(dtype) for chunk in chunks]
        self.one = torch.ones((), dtype=dtype, device=boxes.device)
        self.keep = [v.to(dtype)[:, :, None] for v in valid.split(per_chunk)]

    def run(self, rounds: int) -> torch.Tensor:
        """``rounds`` more rounds (at least one); returns ``[G, n]`` bool, the boxes
        kept so far, which are greedy NMS's choice unless ``unsettled``."""
        if not self.weights:  # no groups, or empty ones: nothing to decide
            return self.valid.clone()
        with torch.autocast(self.valid.device.type, enabled=False):
            for _ in range(max(rounds, 1)):
                previous = self.keep
                self.keep = [
                    torch.baddbmm(self.one, w, k, alpha=-1).clamp_min_(0)
                    for w, k in zip(self.weights, self.keep, strict=True)
                ]
            changed = [(k != p).any() for k, p in zip(self.keep, previous, strict=True)]
            self.unsettled = torch.stack(changed).any()
            return (torch.cat(self.keep)[:, :, 0] > 0) & self.valid


def suppressors(
    boxes: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """``[g, n, n]`` bool: box ``j`` would suppress box ``i`` if kept (valid, ahead
    of it, same class, overlapping more than the group's threshold)."""
    n = valid.shape[1]
    overlaps = overlap_matrix(boxes, thresholds)
    overlaps &= classes[:, :, None] == classes[:, None, :]
    overlaps &= torch.ones(n, n, dtype=torch.bool, device=boxes.device).tril_(-1)
    overlaps &= valid[:, None, :]
    return overlaps


def overlap_matrix(boxes: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[G, n, n]`` bool: IoU of boxes ``i`` and ``j`` of a group above the group's
    threshold (``[G]`` float32, see ``iou_threshold_for``), computed as
    torchvision's NMS kernels do (float32 corners, ``inter / (area_i + area_j -
    inter)``, widths clamped at zero)."""
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    width = torch.minimum(x2[:, :, None], x2[:, None, :])
    width.sub_(torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    height = torch.minimum(y2[:, :, None], y2[:, None, :])
    height.sub_(torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = width.mul_(height)
    del height
    union = area[:, :, None] + area[:, None, :]
    union.sub_(inter)
    return inter.div_(union) > thresholds[:, None, None]


def iou_threshold_for(iou_threshold: float, device: torch.device) -> float:
    """The float32 threshold that gives torchvision's comparison on ``device``.

    Its CUDA kernel compares with the threshold rounded to float32; its CPU kernel
    compares the float32 overlap with the double threshold, which for a float32
    overlap is the same as comparing with the largest float32 not above it.
    """
    nearest = np.float32(iou_threshold)
    if device.type == "cuda" or float(nearest) <= iou_threshold:
        return float(nearest)
    return float(np.nextafter(nearest, np.float32(-np.inf)))


def device_tensor(
    values: Sequence | np.ndarray, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A small tensor of host values on ``device``, copied without waiting for the
    work already queued there (``torch.tensor(values, device=cuda)`` waits)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def top_kept(
    keep: torch.Tensor,
    scores: torch.Tensor,
    tops: Sequence[int],
    *,
    unsettled: torch.Tensor | None = None,
    **rows: torch.Tensor,
) -> list[dict[str, torch.Tensor]] | None:
    """Per image, its first ``tops[i]`` kept entries by descending score (a stable
    sort: ties stay in their order), as ``batched_nms(...)[:top]`` returns them.

    ``keep`` and ``scores`` are ``[B, N]``; each of ``rows`` is ``[B, N]`` or
    ``[B, N, 4]``. Returns one dict per image with ``scores`` and every ``rows``
    entry cut to its length; one host sync, for the lengths. ``unsettled``: a
    device bool read back with them; ``None`` is returned when it is true.
    """
    limit = min(max(tops, default=0), keep.shape[1])
    ranked = torch.where(keep, scores, -torch.inf)
    order = ranked.sort(dim=1, descending=True, stable=True).indices[:, :limit]
    picked = {"scores": scores.gather(1, order)}
    for name, values in rows.items():
        index = order if values.dim() == 2 else order[:, :, None].expand(-1, -1, values.shape[2])
        picked[name] = values.gather(1, index)
    lengths = torch.minimum(keep.sum(1), device_tensor(tops, keep.device, torch.int64))
    if unsettled is not None:
        lengths = torch.cat([lengths, unsettled.to(torch.int64)[None]])
    host = lengths.tolist()
    if unsettled is not None and host.pop():
        return None
    return [
        {name: values[i, :length] for name, values in picked.items()}
        for i, length in enumerate(host)
    ]
