"""``model.inference.boxes`` against torchvision's ``BoxCoder`` and ``expand_boxes``: the same
numbers bit for bit, without tensors made from host values (on a GPU each is a
copy that waits for the device)."""

import math

import pytest
import torch
from torch.profiler import profile
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import expand_boxes as torchvision_expand_boxes

from model.inference.boxes import decode_boxes, expand_boxes
from tests.model.conftest import DEVICES

# the RPN's and the box head's weights in torchvision's detectors, and unequal ones
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (10.0, 5.0, 3.0, 2.0)]


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """Corners up to 1,333 px, sides from zero (degenerate boxes) to the image."""
    corner = torch.rand(n, 2, generator=g) * 1333
    side = torch.rand(n, 2, generator=g) * 800
    side[: n // 8] = 0
    return torch.cat([corner, corner + side], 1)


def random_deltas(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Deltas up to +-12: some widths and heights past the coder's clip."""
    return (torch.randn(shape, generator=g) * 4).clamp(-12, 12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_decodes_every_class_as_torchvision(weights, device):
    """The box head: one proposal, a box per class."""
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights)
    proposals = [random_boxes(n, g).to(device) for n in (300, 0, 200)]
    deltas = random_deltas((500, 91 * 4), g).to(device)
    expected = coder.decode(deltas, proposals)
    got = decode_boxes(coder, deltas.view(500, -1, 4), torch.cat(proposals)[:, None])
    assert got.shape == expected.shape == (500, 91, 4)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", WEIGHTS[:2])
@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.float16])
def test_decodes_one_set_of_anchors_for_every_image(weights, anchor_dtype, device):
    """The RPN: the same anchors (half precision under fp16) for each image's deltas."""
    g = torch.Generator().manual_seed(1)
    coder = BoxCoder(weights)
    anchors = random_boxes(2000, g).to(device, anchor_dtype)
    deltas = random_deltas((3 * 2000, 4), g).to(device)
    expected = coder.decode(deltas, [anchors] * 3).view(3, -1, 4)
    got = decode_boxes(coder, deltas.view(3, -1, 4), anchors)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_wide_boxes_are_clipped_before_exp():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    got = decode_boxes(coder, torch.tensor([[0.0, 0.0, 100.0, 100.0]]), box)
    half = 0.5 * 10 * math.exp(coder.bbox_xform_clip)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.tensor([[5 - half, 5 - half, 5 + half, 5 + half]]))


def test_no_tensor_is_made_from_host_values():
    """torchvision makes its two 0.5 constants with ``torch.tensor`` on the device;
    the profiler names that ``aten::lift_fresh``."""
    g = torch.Generator().manual_seed(2)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes, deltas = random_boxes(10, g), random_deltas((10, 8), g)

    def made_from_host(run) -> int:
        with profile() as prof:
            run()
        return sum(event.name == "aten::lift_fresh" for event in prof.events())

    assert made_from_host(lambda: coder.decode_single(deltas, boxes)) == 2  # the check works
    assert made_from_host(lambda: decode_boxes(coder, deltas.view(10, 2, 4), boxes[:, None])) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [30 / 28, 1.0, 2.5])
def test_expand_boxes_is_torchvisions(scale, device):
    g = torch.Generator().manual_seed(3)
    boxes = (random_boxes(400, g) - 200).to(device)  # some corners negative
    assert torch.equal(expand_boxes(boxes, scale), torchvision_expand_boxes(boxes, scale))
    empty = boxes[:0]
    assert expand_boxes(empty, scale).shape == (0, 4)
