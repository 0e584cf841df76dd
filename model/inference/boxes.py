"""torchvision's box decoding and expansion in fewer kernels and without host syncs.

``BoxCoder.decode_single`` (the RPN decodes its anchors with it, the box head its
proposals, once per batch each) computes x, y, width and height in kernels of
their own, and makes its two 0.5 constants with ``torch.tensor(0.5,
device=...)``: on a GPU each is a host-to-device copy that waits for everything
queued on the device. ``expand_boxes`` (mask pasting) likewise takes each
coordinate apart. The functions here run the same float32 operations on
``(x, y)`` pairs, so each number is computed as torchvision computes it: the
results are the same bit for bit.
"""

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from model.inference.nms import device_tensor


def decode_boxes(coder: BoxCoder, deltas: Tensor, boxes: Tensor) -> Tensor:
    """``coder.decode_single`` for ``deltas`` ``[..., 4]`` against reference
    ``boxes`` ``[..., 4]`` (broadcast: one box for every class's deltas, or one
    set of anchors for every image): ``(x1, y1, x2, y2)`` ``[..., 4]`` in
    ``deltas``' dtype: 14 kernels (15 with a cast) instead of 32, and no host sync.

    A coder whose x and y (or width and height) weights differ is left to
    torchvision (torchvision's own detectors use equal ones).
    """
    wx, wy, ww, wh = coder.weights
    if wx != wy or ww != wh:
        shape = torch.broadcast_shapes(deltas.shape, boxes.shape)
        flat = coder.decode_single(
            deltas.expand(shape).reshape(-1, 4), boxes.expand(shape).reshape(-1, 4)
        )
        return flat.view(shape)
    boxes = boxes.to(deltas.dtype)
    size = boxes[..., 2:] - boxes[..., :2]  # widths, heights
    center = boxes[..., :2] + 0.5 * size
    shift = deltas[..., :2] / wx
    # keeps large values out of exp
    scale = torch.clamp(deltas[..., 2:] / ww, max=coder.bbox_xform_clip)
    center = shift * size + center
    half = 0.5 * (torch.exp(scale) * size)  # center to corner
    return torch.cat([center - half, center + half], -1)


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """torchvision's ``roi_heads.expand_boxes``: boxes ``[N, 4]`` grown by ``scale``
    about their centres, 8 kernels instead of 19."""
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5
    half *= scale
    center = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return torch.cat([center - half, center + half], 1)


def scale_boxes(
    boxes: list[torch.Tensor],
    resized: list[tuple[int, int]],
    original: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """Each image's boxes ``[N, 4]`` from the network's resized frame to the input
    image's: torchvision's ``resize_boxes`` (float32 ratios, the same products),
    every image's in one product, without its four host-to-device copies per image
    (each waits for the device's queue)."""
    ratios = []
    for size, input_size in zip(resized, original, strict=True):
        ratio_y, ratio_x = (
            np.float32(o) / np.float32(r) for o, r in zip(input_size, size, strict=True)
        )
        ratios.append([ratio_x, ratio_y, ratio_x, ratio_y])
    counts = [len(b) for b in boxes]
    per_box = np.repeat(np.array(ratios, dtype=np.float32).reshape(-1, 4), counts, axis=0)
    every = torch.cat(boxes)
    return list((every * device_tensor(per_box, every.device, every.dtype)).split(counts))
