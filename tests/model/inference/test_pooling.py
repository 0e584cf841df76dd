"""The CPU's ROI pooling (``gather_align``, ``pool_rois``) against torchvision's
``roi_align`` and ``MultiScaleRoIAlign``."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from model.inference.pooling import (
    as_row_views,
    feature_rows,
    gather_align,
    image_row_views,
    pool_rois,
)


def random_rois(count: int, images: int, height: float, width: float, seed: int) -> torch.Tensor:
    """Boxes of every size, some partly or wholly outside the map, some degenerate."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 1.2 - 10
    size = torch.rand(count, 2, generator=g) ** 3 * torch.tensor([width, height])
    boxes = torch.cat([corner, corner + size], 1)
    boxes[:3] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.1, 5.1], [-900, -900, -200, -200]])
    index = torch.randint(0, images, (count, 1), generator=g).float()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("output_size", [7, 14, (3, 5)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("scale", [1 / 4, 1 / 32])
def test_gather_align_is_roi_align(output_size, sampling_ratio, scale):
    """Every sample, neighbour and weight as torchvision's kernel: the same numbers
    up to the order of the float32 sums."""
    features = torch.randn(3, 8, 21, 34)
    rois = random_rois(300, 3, 21 / scale, 34 / scale, seed=sampling_ratio)
    expected = roi_align(features, rois, output_size, scale, sampling_ratio)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    pooled = gather_align(channels_last, rois, output_size, scale, sampling_ratio)
    assert pooled.shape == expected.shape
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=2e-6)
    assert expected.abs().amax(dim=(1, 2, 3))[2] == 0  # the box outside: zeros, both ways


def test_gather_align_of_no_boxes():
    features = torch.randn(1, 4, 10, 10).contiguous(memory_format=torch.channels_last)
    assert gather_align(features, torch.zeros(0, 5), 7, 0.25, 2).shape == (0, 4, 7, 7)


def test_pool_rois_on_the_cpu_is_multiscale_roi_align():
    """Boxes of every level, several images, a padded canvas bigger than the images."""
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    features = {
        str(i): torch.randn(2, 16, 208 // 2**i, 272 // 2**i) for i in range(4)
    }  # strides 4..32 of an 832x1088 canvas
    image_sizes = [(800, 1067), (700, 1088)]
    boxes = [random_rois(n, 1, 800, 1067, seed=n)[:, 1:].clamp(min=0) for n in (400, 250)]
    expected = pooler(features, boxes, image_sizes)
    pooled = pool_rois(pooler, features, boxes, image_sizes)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=2e-6)
    assert pooled.is_contiguous(memory_format=torch.channels_last)


def test_levels_in_one_buffer_are_read_where_they_lie():
    """Every level in one table of rows, level after level (``as_row_views``, the
    torch runtime's) or image after image (``image_row_views``, OpenVINO's): pooled
    from that memory itself, as MultiScaleRoIAlign pools the maps."""
    pooler = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    maps = {str(i): torch.randn(3, 8, 40 // 2**i, 56 // 2**i) for i in range(3)}
    image_sizes = [(150, 220), (160, 200), (120, 224)]
    boxes = [
        random_rois(60, 1, h, w, seed=i)[:, 1:].clamp(min=0)
        for i, (h, w) in enumerate(image_sizes)
    ]
    expected = pooler(maps, boxes, image_sizes)
    per_image = torch.cat(
        [torch.cat([m[i].permute(1, 2, 0).reshape(-1, 8) for m in maps.values()]) for i in range(3)]
    )
    sizes = {name: tuple(m.shape[2:]) for name, m in maps.items()}
    for views in (as_row_views(maps), image_row_views(per_image, sizes, 3)):
        for name, m in maps.items():
            assert torch.equal(views[name], m)
        table, _ = feature_rows(list(views.values()))
        assert table.data_ptr() == min(v.data_ptr() for v in views.values())  # no copy
        pooled = pool_rois(pooler, views, boxes, image_sizes)
        torch.testing.assert_close(pooled, expected, rtol=0, atol=2e-6)
