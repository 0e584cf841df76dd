"""COCO mask encodings: run lengths found on the masks' device, compressed RLE
strings and polygons.

Frame: masks are ``[H, W]`` (rows, columns) in image pixels. COCO RLE walks the
pixels in column-major (Fortran) order and starts with a run of zeros, which
may be empty; ``pycocotools.mask.decode`` reads ``encode_rle``'s dicts back
bit for bit.
"""

import itertools

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

_CPU_CHUNK_BYTES = 16 * 2**20


def find_runs(masks: Tensor) -> list[np.ndarray]:
    """COCO run lengths of ``[N, H, W]`` bool masks on any device.

    Returns one int64 array per mask: alternating run lengths of 0s and 1s in
    column-major order, starting with 0s (a leading 0 when the first pixel is
    set), summing to ``H * W``. Only the positions where the value changes
    travel to the host, in one transfer.
    """
    n, height, width = masks.shape
    size = height * width
    if n == 0:
        return []
    if size == 0:
        return [np.zeros(0, np.int64) for _ in range(n)]
    changes = _column_major_changes(masks.to(torch.bool))
    keys = np.sort(changes.cpu().numpy())  # numpy's SIMD sort beats torch's on the host
    bounds = np.searchsorted(keys // size, np.arange(n + 1))
    local = keys % size
    runs = []
    for start, stop in itertools.pairwise(bounds):
        edges = np.concatenate(([0], local[start:stop], [size]))
        runs.append(np.diff(edges))
    return runs


def _column_major_changes(masks: Tensor) -> Tensor:
    """``n * H * W + x * H + y`` (unsorted) of every pixel that differs from the one
    before it in column-major order (the first pixel compares with 0)."""
    n, height, width = masks.shape
    size = height * width
    # On the CPU, a few masks at a time through one reused buffer: a fresh
    # full-size one costs more in page faults than the comparisons themselves.
    step = max(1, _CPU_CHUNK_BYTES // size) if masks.device.type == "cpu" else n
    # A flat buffer padded to whole 8-byte words, so a first pass can skip the
    # (mostly zero) words at int64 speed before looking at single bytes.
    buffer = torch.empty(-(-min(step, n) * size // 8) * 8, dtype=torch.bool, device=masks.device)
    found = []
    for first in range(0, n, step):
        part = masks[first : first + step]
        total = len(part) * size
        buffer[total:] = False
        diff = buffer[:total].view(-1, height, width)
        torch.ne(part[:, 1:], part[:, :-1], out=diff[:, 1:])
        torch.ne(part[:, 0, 1:], part[:, -1, :-1], out=diff[:, 0, 1:])
        diff[:, 0, 0] = part[:, 0, 0]
        words = buffer.view(torch.int64).nonzero().squeeze(1)
        word, byte = buffer.view(-1, 8)[words].nonzero().unbind(1)
        found.append(words[word] * 8 + byte + first * size)  # n * H * W + y * W + x
    flat = torch.cat(found)
    plane, pixel = flat // size, flat % size
    return plane * size + (pixel % width) * height + pixel // width


def encode_rle(masks: Tensor) -> list[dict]:
    """COCO compressed RLE of ``[N, H, W]`` bool masks on any device.

    Returns ``[{"size": [H, W], "counts": str}, ...]``, one per mask, the same
    strings as ``pycocotools.mask.encode`` and ready for JSON.
    """
    return pack_runs(find_runs(masks), tuple(masks.shape[1:]))


def pack_runs(runs: list[np.ndarray], size: tuple[int, int]) -> list[dict]:
    """``encode_rle`` from ``find_runs``' output for masks of ``size = (H, W)``,
    on the host only (so a caller can run it apart from the device work)."""
    if not runs:
        return []
    height, width = size
    objs = [{"size": [height, width], "counts": counts} for counts in runs]
    packed = mask_utils.frPyObjects(objs, height, width)
    return [{"size": [height, width], "counts": rle["counts"].decode("ascii")} for rle in packed]


def encode_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of a ``[H, W]`` bool mask,
    one per outer contour (holes are not represented), contours of fewer than
    3 points dropped. Vertices sit at the centres of boundary pixels,
    ``(column + 0.5, row + 0.5)``, which is how pycocotools rasterises them.
    """
    import cv2  # only the polygon format needs OpenCV

    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [
        (contour.reshape(-1, 2) + 0.5).ravel().tolist() for contour in contours if len(contour) >= 3
    ]


def crop_masks(masks: torch.Tensor) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Each mask's non-empty bounding region on the CPU, with its (x, y) offset."""
    rows = masks.any(dim=2).cpu().numpy()
    cols = masks.any(dim=1).cpu().numpy()
    crops = []
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys) == 0:
            crops.append((np.zeros((0, 0), dtype=bool), (0, 0)))
            continue
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        crops.append((masks[i, y0:y1, x0:x1].cpu().numpy(), (int(x0), int(y0))))
    return crops


def polygons_at(crop: np.ndarray, offset: tuple[int, int]) -> list[list[float]]:
    """``encode_polygons`` of a crop, moved to image coordinates."""
    if crop.size == 0:
        return []
    x0, y0 = offset
    return [
        [v + (x0 if k % 2 == 0 else y0) for k, v in enumerate(polygon)]
        for polygon in encode_polygons(crop)
    ]
