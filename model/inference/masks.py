"""Batched pasting of Mask R-CNN mask probabilities into the image frame.

Replaces torchvision's ``paste_masks_in_image`` (one Python iteration, one host
sync and one full-image float buffer per detection) with a few batched tensor
ops per chunk of detections, run on whatever device the inputs live on. The
geometry is torchvision's, so results match it pixel for pixel up to float
rounding (checked in ``tests/model/inference/test_masks.py``).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.inference.boxes import expand_boxes
from model.inference.nms import device_tensor
from model.inference.options import PredictOptions
from model.inference.rle import crop_masks, find_runs

# Bound on the working memory of one chunk (two float row buffers, blended in
# place, and the bool crop: 9 bytes a cell), so 100 large boxes at 1920x1080
# never need gigabytes.
CHUNK_BYTES = 128 * 2**20
# A chunk's crop is padded to its largest box. On the CPU, start a new chunk
# rather than waste more than this factor of the boxes' own area, unless the
# chunk is so small that another one would cost more than the waste. On a GPU
# padded cells are nearly free and each chunk costs ~30 kernel launches, so
# there only CHUNK_BYTES splits.
_CPU_MAX_WASTE = 2.0
_SMALL_CHUNK = 2**18


def paste_masks(
    mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float | Tensor
) -> Tensor:
    """Paste ``M x M`` mask probabilities into their boxes and binarise them.

    Args:
        mask_probs: ``[N, M, M]`` floating mask probabilities (the mask head's
            sigmoid output for the predicted class), computed in float32.
        boxes: ``[N, 4]`` float boxes ``(x1, y1, x2, y2)`` in pixels of the target
            image, on the same device.
        image_size: ``(H, W)`` of the target image.
        threshold: a float, or a ``[N]`` tensor with one threshold per detection.

    Returns:
        ``[N, H, W]`` bool on the inputs' device: exactly
        ``paste_masks_in_image(mask_probs[:, None], boxes, (H, W), padding=1)[:, 0]
        >= threshold`` (same 1-pixel mask padding, box expansion, int64
        truncation of box corners and bilinear ``align_corners=False`` resize),
        up to float rounding. Boxes partly or wholly outside the image are fine.

    One small host sync reads the integer boxes to plan the chunks; nothing else
    leaves the device and no Python loop runs per detection.
    """
    n, m = mask_probs.shape[0], mask_probs.shape[-1]
    height, width = image_size
    device = mask_probs.device
    thresholds = torch.as_tensor(threshold, dtype=torch.float32, device=device).expand(n)
    out = torch.zeros((n, height, width), dtype=torch.bool, device=device)
    if n == 0:
        return out
    padded = F.pad(mask_probs.to(torch.float32), (1, 1, 1, 1))
    int_boxes = expand_boxes(boxes.to(torch.float32), (m + 2) / m).to(torch.int64)
    host = torch.cat([int_boxes, (thresholds <= 0).to(torch.int64)[:, None]], 1).cpu().numpy()
    if host[:, 4].any():  # a threshold <= 0 also keeps the pixels outside the box
        out[torch.from_numpy(host[:, 4].astype(bool)).to(device)] = True
    max_waste = _CPU_MAX_WASTE if device.type == "cpu" else math.inf
    table, chunks = _plan_chunks(host[:, :4], height, width, max_waste)
    if not chunks:
        return out
    # without waiting for the device's queue, as nms.device_tensor copies
    table = torch.from_numpy(table).to(device, non_blocking=True)
    cells = max((stop - start) * h * w for start, stop, h, w in chunks)
    # Buffers reused by every chunk: on the CPU, fresh ones cost a page fault per 4 KiB.
    work = torch.empty(2 * cells, dtype=torch.float32, device=device)
    hits = torch.empty(cells, dtype=torch.bool, device=device)
    for start, stop, crop_h, crop_w in chunks:
        idx, corner = table[start:stop, 0], table[start:stop, 1:]  # corner: (left, top)
        box = int_boxes[idx]
        # both axes in one set of kernels, as long as the longer: x, then y
        weights = _resize_weights(corner, box[:, :2], box[:, 2:], max(crop_h, crop_w), m + 2)
        cols = tuple(w[:, 0, :crop_w] for w in weights)
        rows = tuple(w[:, 1, :crop_h] for w in weights)
        crop = _resize(padded[idx], rows, cols, work)
        crop_hits = hits[: crop.numel()].view_as(crop)
        torch.ge(crop, thresholds[idx, None, None], out=crop_hits)
        _write_windows(out, idx, corner[:, 1], corner[:, 0], crop_hits)
    return out


def _write_windows(out: Tensor, idx: Tensor, top: Tensor, left: Tensor, crops: Tensor) -> None:
    """``out[idx[k], top[k]:, left[k]:][:h, :w] = crops[k]`` for every k at once.

    Row r of window k is the ``w``-long run of ``out``'s flat storage starting at
    ``((idx * H + top + r) * W + left)``; ``unfold`` views every such run as a
    row, so the write is one indexed row copy.
    """
    _, height, width = out.shape
    crop_h, crop_w = crops.shape[1:]
    first = (idx * height + top) * width + left
    starts = first[:, None] + torch.arange(crop_h, device=out.device) * width
    out.view(-1).unfold(0, crop_w, 1)[starts.view(-1)] = crops.view(-1, crop_w)


def _plan_chunks(
    boxes: np.ndarray, height: int, width: int, max_waste: float
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Group the visible integer boxes into chunks of similar size.

    Returns a ``[K, 3]`` int64 table ``(detection, window left, window top)``,
    largest boxes first, and ``(start, stop, crop_h, crop_w)`` rows of it per
    chunk. Each window is ``crop_h x crop_w``, lies inside the image and covers
    the visible part of its box.
    """
    x0, y0, x1, y1 = boxes.T
    vis_y0, vis_x0 = np.clip(y0, 0, height), np.clip(x0, 0, width)
    vis_h = np.clip(y1 + 1, 0, height) - vis_y0
    vis_w = np.clip(x1 + 1, 0, width) - vis_x0
    visible = np.flatnonzero((vis_h > 0) & (vis_w > 0))
    order = visible[np.argsort(-(vis_h * vis_w)[visible], kind="stable")]
    max_cells = CHUNK_BYTES // 9
    chunks, start = [], 0
    while start < len(order):
        crop_h, crop_w, area, stop = 0, 0, 0, start
        while stop < len(order):
            i = order[stop]
            h, w = max(crop_h, int(vis_h[i])), max(crop_w, int(vis_w[i]))
            cells = (stop - start + 1) * h * w
            new_area = area + int(vis_h[i] * vis_w[i])
            wasteful = cells > max_waste * new_area and cells > _SMALL_CHUNK
            if stop > start and (cells > max_cells or wasteful):
                break
            crop_h, crop_w, area, stop = h, w, new_area, stop + 1
        chunks.append((start, stop, crop_h, crop_w))
        start = stop
    tops, lefts = np.empty(len(order), np.int64), np.empty(len(order), np.int64)
    for start, stop, crop_h, crop_w in chunks:
        sel = order[start:stop]
        tops[start:stop] = np.minimum(vis_y0[sel], height - crop_h)
        lefts[start:stop] = np.minimum(vis_x0[sel], width - crop_w)
    return np.stack([order, lefts, tops], 1).astype(np.int64), chunks


def _resize_weights(
    origin: Tensor, lo: Tensor, hi: Tensor, size: int, src_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear source indices and weights along the axes of ``origin``, ``lo``
    and ``hi`` (``[n]``, or ``[n, axes]``): ``[..., size]`` each.

    Output pixel ``origin + k`` of a box spanning integer pixels ``lo..hi`` reads
    the padded mask at ``(k' + 0.5) * src_size / extent - 0.5`` with
    ``k' = origin + k - lo``, as ``F.interpolate(align_corners=False)`` does;
    pixels outside the box get zero weights.
    """
    extent = (hi - lo + 1).clamp_min(1)
    pos = origin[..., None] + torch.arange(size, device=origin.device) - lo[..., None]
    inside = (pos >= 0) & (pos < extent[..., None])
    extent = extent.to(torch.float32)
    scale = torch.div(torch.full_like(extent, src_size), extent)  # ATen's float32 in / out
    src = ((pos.to(torch.float32) + 0.5) * scale[..., None] - 0.5).clamp_min(0)
    i0 = src.to(torch.int64).clamp_max(src_size - 1)
    i1 = i0 + (i0 < src_size - 1).to(torch.int64)
    w1 = (src - i0.to(torch.float32)).clamp(0, 1)
    w0 = (1 - w1) * inside
    return i0, i1, w0, w1 * inside


def _resize(padded: Tensor, rows: tuple, cols: tuple, work: Tensor) -> Tensor:
    """Blend ``[n, P, P]`` masks into ``[n, crop_h, crop_w]`` crops (a view of
    ``work``), columns first then rows, in the same order of operations as
    ATen's bilinear kernel."""
    n, p, _ = padded.shape
    c0, c1, cw0, cw1 = cols
    width = c0.shape[1]
    g0 = padded.gather(2, c0[:, None, :].expand(n, p, width))
    g1 = padded.gather(2, c1[:, None, :].expand(n, p, width))
    horiz = (g0 * cw0[:, None, :] + g1 * cw1[:, None, :]).reshape(n * p, width)
    r0, r1, rw0, rw1 = rows
    size = r0.numel() * width
    base = (torch.arange(n, device=padded.device) * p)[:, None]
    top = torch.index_select(horiz, 0, (base + r0).view(-1), out=work[:size].view(-1, width))
    bottom = torch.index_select(
        horiz, 0, (base + r1).view(-1), out=work[size : 2 * size].view(-1, width)
    )
    top, bottom = top.view(n, -1, width), bottom.view(n, -1, width)
    return top.mul_(rw0[:, :, None]).add_(bottom.mul_(rw1[:, :, None]))


def encode_masks(
    detections: list[dict],
    sizes: list[tuple[int, int]],
    options: list[PredictOptions],
    limit: int,
) -> tuple[list[list[np.ndarray]], list[list]]:
    """Each image's masks (``detections[i]["mask_probs"]`` in its ``boxes``)
    pasted at its size, binarised at its ``mask_threshold`` and coded as its
    ``mask_format`` asks: run lengths (``find_runs``) for ``rle``, crops
    (``crop_masks``) for ``polygon``. Images of one size are pasted together, at
    most ``limit`` mask pixels at once (``group_by_size``), and so are the masks
    of an image larger than that, a few at a time: a 6000x6000 photo's hundred
    masks would take 3.6 GB as bools."""
    counts = [len(det["boxes"]) for det in detections]
    runs: list[list[np.ndarray]] = [[] for _ in detections]
    crops: list[list] = [[] for _ in detections]
    for group in group_by_size(counts, sizes, options, limit):
        cells = sizes[group[0]][0] * sizes[group[0]][1]
        step = max(1, limit // max(1, cells))
        pieces = [(group, slice(None))]
        if len(group) == 1 and counts[group[0]] > step:
            pieces = [(group, slice(s, s + step)) for s in range(0, counts[group[0]], step)]
        for members, part in pieces:
            taken = [len(detections[i]["boxes"][part]) for i in members]
            masks = paste_group(detections, sizes, options, members, part)
            if all(options[i].mask_format == "rle" for i in members):
                found = iter(find_runs(masks))
                for i, count in zip(members, taken, strict=True):
                    runs[i].extend(next(found) for _ in range(count))
                continue
            for i, each in zip(members, masks.split(taken), strict=True):
                if options[i].mask_format == "rle":
                    runs[i].extend(find_runs(each))
                else:
                    crops[i].extend(crop_masks(each))
    return runs, crops


def paste_group(
    detections: list[dict],
    sizes: list[tuple[int, int]],
    options: list[PredictOptions],
    members: list[int],
    part: slice,
) -> Tensor:
    """``paste_masks`` of the ``part`` of each member image's detections."""
    probs = torch.cat([detections[i]["mask_probs"][part] for i in members])
    boxes = torch.cat([detections[i]["boxes"][part] for i in members])
    thresholds = np.repeat(
        [options[i].mask_threshold for i in members],
        [len(detections[i]["boxes"][part]) for i in members],
    )
    return paste_masks(
        probs, boxes, sizes[members[0]], device_tensor(thresholds, boxes.device, torch.float32)
    )


def group_by_size(
    counts: list[int],
    sizes: list[tuple[int, int]],
    options: list[PredictOptions],
    limit: int,
) -> list[list[int]]:
    """Indices of the images whose masks are wanted, in groups of one image size
    holding at most ``limit`` mask pixels (an image alone may hold more)."""
    groups: dict[tuple[int, int], list[list[int]]] = {}
    for i, (count, size, opts) in enumerate(zip(counts, sizes, options, strict=True)):
        if count == 0 or opts.mask_format == "none":
            continue
        chunks = groups.setdefault(size, [[]])
        cells = size[0] * size[1]
        if chunks[-1] and (sum(counts[j] for j in chunks[-1]) + count) * cells > limit:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]
