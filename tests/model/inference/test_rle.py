"""COCO RLE and polygon encodings against pycocotools."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_utils

from model.inference import rle
from model.inference.rle import encode_polygons, encode_rle, find_runs, pack_runs

# pycocotools' decode trips a numpy 2 deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def assert_round_trip(masks: torch.Tensor) -> None:
    """Decoding each RLE gives the mask back; the strings are pycocotools'."""
    encoded = encode_rle(masks)
    assert len(encoded) == len(masks)
    fortran = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    expected = mask_utils.encode(fortran) if len(masks) else []
    for ours, ref, mask in zip(encoded, expected, masks.numpy(), strict=True):
        assert isinstance(ours["counts"], str)
        assert ours["size"] == list(mask.shape)
        assert ours["counts"] == ref["counts"].decode("ascii")
        assert np.array_equal(mask_utils.decode(ours), mask)


@settings(max_examples=150, deadline=None)
@given(
    masks=st.tuples(st.integers(0, 4), st.integers(1, 33), st.integers(1, 33)).flatmap(
        lambda shape: hnp.arrays(np.bool_, shape)
    )
)
def test_round_trip_random_masks(masks):
    assert_round_trip(torch.from_numpy(masks))


@settings(max_examples=50, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    blobs=st.lists(st.tuples(*[st.floats(0, 1)] * 3), max_size=4),
)
def test_round_trip_blobs(shape, blobs):
    yy, xx = np.mgrid[: shape[0], : shape[1]] / max(shape)
    mask = np.zeros(shape, bool)
    for y, x, r in blobs:
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= (r / 2) ** 2
    assert_round_trip(torch.from_numpy(np.stack([mask, ~mask])))


def edge_cases():
    cases = {
        "empty": torch.zeros(2, 7, 5, dtype=torch.bool),
        "full": torch.ones(2, 7, 5, dtype=torch.bool),
    }
    for name, (y, x) in {
        "top-left": (0, 0),
        "top-right": (0, 4),
        "bottom-left": (6, 0),
        "bottom-right": (6, 4),
        "middle": (3, 2),
    }.items():
        one = torch.zeros(1, 7, 5, dtype=torch.bool)
        one[0, y, x] = True
        cases[f"pixel {name}"] = one
    row = torch.zeros(1, 7, 5, dtype=torch.bool)
    row[0, 3] = True
    col = torch.zeros(1, 7, 5, dtype=torch.bool)
    col[0, :, 2] = True
    cases |= {"one row": row, "one column": col, "no masks": torch.zeros(0, 4, 6, dtype=torch.bool)}
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 1, 1), (3, 1, 13), (3, 13, 1), (3, 9, 11), (2, 1, 8), (2, 8, 1)]:
        cases[f"random {shape}"] = torch.rand(shape, generator=g) > 0.5
    return cases


@pytest.mark.parametrize("masks", edge_cases().values(), ids=edge_cases().keys())
def test_round_trip_edge_cases(masks):
    assert_round_trip(masks)


def test_find_runs_is_column_major_and_starts_with_zeros():
    masks = torch.tensor([[[0, 1, 1], [0, 0, 1]], [[1, 1, 0], [1, 0, 0]]], dtype=torch.bool)
    runs = find_runs(masks)  # column-major: [0, 0, 1, 0, 1, 1] and [1, 1, 1, 0, 0, 0]
    assert [r.tolist() for r in runs] == [[2, 1, 1, 2], [0, 3, 3]]
    assert find_runs(torch.zeros(0, 3, 3, dtype=torch.bool)) == []
    assert [r.tolist() for r in find_runs(torch.zeros(1, 3, 3, dtype=torch.bool))] == [[9]]


def test_masks_taken_a_few_at_a_time_give_the_same_runs(monkeypatch):
    masks = torch.rand(9, 13, 11, generator=torch.Generator().manual_seed(2)) > 0.6
    whole = find_runs(masks)
    monkeypatch.setattr(rle, "_CPU_CHUNK_BYTES", 2 * 13 * 11)  # two masks a chunk
    for a, b in zip(find_runs(masks), whole, strict=True):
        assert np.array_equal(a, b)
    assert_round_trip(masks)


def test_pack_runs_of_no_masks():
    assert pack_runs([], (3, 4)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_match_cpu():
    masks = torch.rand(20, 37, 53, generator=torch.Generator().manual_seed(1)) > 0.7
    cuda = find_runs(masks.cuda())
    for a, b in zip(cuda, find_runs(masks), strict=True):
        assert np.array_equal(a, b)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def fill(polygons: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, *shape)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


@pytest.mark.parametrize("shape", ["disk", "rectangle", "two disks"])
def test_polygons_fill_back_to_the_shape(shape):
    yy, xx = np.mgrid[:120, :160]
    mask = {
        "disk": (yy - 60) ** 2 + (xx - 70) ** 2 <= 35**2,
        "rectangle": (yy >= 20) & (yy < 50) & (xx >= 30) & (xx < 100),
        "two disks": ((yy - 30) ** 2 + (xx - 30) ** 2 <= 20**2)
        | ((yy - 80) ** 2 + (xx - 120) ** 2 <= 25**2),
    }[shape]
    polygons = encode_polygons(mask)
    assert len(polygons) == (2 if shape == "two disks" else 1)
    assert all(isinstance(v, float) for polygon in polygons for v in polygon)
    assert iou(fill(polygons, mask.shape), mask) >= 0.9


def test_polygons_skip_degenerate_contours():
    mask = np.zeros((20, 20), bool)
    assert encode_polygons(mask) == []
    mask[2, 2] = True  # one point
    mask[10, 5:15] = True  # a line: two points
    assert encode_polygons(mask) == []
    mask[15:18, 15:18] = True
    polygons = encode_polygons(mask)
    assert len(polygons) == 1 and len(polygons[0]) >= 6
