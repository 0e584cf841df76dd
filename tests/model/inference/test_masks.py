"""``model.inference.masks.paste_masks`` against torchvision's ``paste_masks_in_image``.

Measured (torch 2.14.1, CPU): over 12,000 random masks (40 image sizes up to
500x700, smooth and noise probabilities, thresholds 0.3 / 0.5 / 0.7) one pixel
differed from torchvision's thresholded paste, a largest mismatch fraction of
8.6e-6 of a mask (a float-rounding tie at the threshold); every case in this
file is identical. The tests allow ``MAX_MISMATCH`` for such ties.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image

from model.inference import masks
from model.inference.masks import paste_masks

MAX_MISMATCH = 0.005  # fraction of one mask's pixels


def reference(probs, boxes, size, threshold):
    return paste_masks_in_image(probs[:, None], boxes, size, padding=1)[:, 0] >= threshold


def mismatch(ours, expected) -> float:
    """Largest fraction of differing pixels over the masks."""
    if len(ours) == 0:
        return 0.0
    return (ours != expected).flatten(1).float().mean(1).max().item()


def random_probs(n: int, g: torch.Generator, smooth: bool = True) -> torch.Tensor:
    probs = torch.rand(n, 28, 28, generator=g)
    if smooth:  # blob-like, as a trained mask head gives
        probs = torch.nn.functional.avg_pool2d(probs[:, None], 5, 1, 2)[:, 0]
        probs = torch.sigmoid(12 * (probs - 0.5))
    return probs


def random_boxes(n: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Centres inside the image (torchvision fails on boxes wholly outside); sides
    from under a pixel to twice the image, so many boxes stick out of it."""
    height, width = size
    centre = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    log_side = torch.empty(n, 2).uniform_(math.log(0.2), math.log(2 * max(size)), generator=g)
    half = torch.exp(log_side) / 2
    return torch.cat([centre - half, centre + half], 1)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("size", [(480, 640), (61, 37), (1, 9)])
@pytest.mark.parametrize("smooth", [True, False])
def test_matches_torchvision(threshold, size, smooth):
    g = torch.Generator().manual_seed(sum(size))
    probs, boxes = random_probs(60, g, smooth), random_boxes(60, size, g)
    ours = paste_masks(probs, boxes, size, threshold)
    assert ours.dtype == torch.bool and ours.shape == (60, *size)
    assert mismatch(ours, reference(probs, boxes, size, threshold)) <= MAX_MISMATCH


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    box=st.tuples(*[st.floats(-20, 70, allow_nan=False)] * 4),
    mask_size=st.integers(1, 14),
    threshold=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_any_box_matches_torchvision(size, box, mask_size, threshold, seed):
    x0, y0, x1, y1 = box
    boxes = torch.tensor([[min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]])
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(1, mask_size, mask_size, generator=g)
    ours = paste_masks(probs, boxes, size, threshold)
    try:
        expected = reference(probs, boxes, size, threshold)
    except RuntimeError:  # torchvision's slicing fails on boxes wholly outside the image
        assert not ours.any()
        return
    assert mismatch(ours, expected) <= MAX_MISMATCH


def test_per_detection_thresholds():
    g = torch.Generator().manual_seed(1)
    probs, boxes = random_probs(30, g), random_boxes(30, (90, 120), g)
    thresholds = torch.rand(30, generator=g) * 0.8 + 0.1
    ours = paste_masks(probs, boxes, (90, 120), thresholds)
    expected = paste_masks_in_image(probs[:, None], boxes, (90, 120), padding=1)[:, 0]
    assert mismatch(ours, expected >= thresholds[:, None, None]) <= MAX_MISMATCH


def test_zero_threshold_keeps_the_background_like_torchvision():
    g = torch.Generator().manual_seed(2)
    probs, boxes = random_probs(5, g), random_boxes(5, (40, 50), g)
    ours = paste_masks(probs, boxes, (40, 50), 0.0)
    assert torch.equal(ours, reference(probs, boxes, (40, 50), 0.0))


def test_no_detections():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (30, 40), 0.5)
    assert out.shape == (0, 30, 40) and out.dtype == torch.bool


def test_boxes_wholly_outside_give_empty_masks():
    boxes = torch.tensor([[-80.0, 5, -40, 20], [5, 200, 20, 260], [300, 5, 400, 20]])
    out = paste_masks(torch.ones(3, 28, 28), boxes, (100, 120), 0.5)
    assert out.shape == (3, 100, 120) and not out.any()


@pytest.mark.parametrize(
    ("chunk_bytes", "max_waste"), [(64 * 2**10, 2.0), (masks.CHUNK_BYTES, math.inf)]
)
def test_chunking_does_not_change_the_result(monkeypatch, chunk_bytes, max_waste):
    """Tiny chunks, and the GPU's plan (chunks split only by memory), on the CPU."""
    monkeypatch.setattr(masks, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(masks, "_CPU_MAX_WASTE", max_waste)
    g = torch.Generator().manual_seed(3)
    probs, boxes = random_probs(100, g), random_boxes(100, (300, 400), g)
    ours = paste_masks(probs, boxes, (300, 400), 0.5)
    assert mismatch(ours, reference(probs, boxes, (300, 400), 0.5)) <= MAX_MISMATCH


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    probs, boxes = random_probs(100, g), random_boxes(100, (480, 640), g)
    cpu = paste_masks(probs, boxes, (480, 640), 0.5)
    cuda = paste_masks(probs.cuda(), boxes.cuda(), (480, 640), 0.5)
    assert cuda.device.type == "cuda"
    assert mismatch(cuda.cpu(), cpu) <= MAX_MISMATCH
