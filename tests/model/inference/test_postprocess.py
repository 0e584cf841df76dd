"""The predictor's batched postprocessing: pasting and run-length coding the masks
of several same-size images in one call, or an image's masks a few at a time,
gives exactly what one mask at a time gives, whatever the mix of sizes, mask
formats and thresholds."""

import numpy as np
import pytest
import torch

from model.errors import InvalidOptionError
from model.inference import predictor as predictor_module
from model.inference.masks import group_by_size
from model.inference.options import PredictOptions
from tests.model.conftest import random_image


def fake_detections(count: int, size: tuple[int, int], g: torch.Generator) -> dict:
    height, width = size
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width, height])
    wh = 4 + torch.rand(count, 2, generator=g) * torch.tensor([width, height]) / 2
    probs = torch.nn.functional.avg_pool2d(torch.rand(count, 1, 28, 28, generator=g), 5, 1, 2)
    return {
        "boxes": torch.cat([xy, xy + wh], 1),
        "scores": torch.rand(count, generator=g).sort(descending=True).values,
        "labels": torch.randint(1, 5, (count,), generator=g),
        "mask_probs": torch.sigmoid(12 * (probs[:, 0] - 0.5)),
    }


CASES = [
    # (height, width), detections, options
    ((100, 130), 12, PredictOptions()),
    ((100, 130), 0, PredictOptions()),
    ((90, 70), 7, PredictOptions(mask_threshold=0.3)),
    ((100, 130), 9, PredictOptions(mask_threshold=0.7)),
    ((100, 130), 5, PredictOptions(mask_format="polygon")),
    ((90, 70), 4, PredictOptions(mask_format="none")),
    ((100, 130), 11, PredictOptions(mask_threshold=0.0)),
]


def pending_for(predictor, cases, monkeypatch, limit):
    monkeypatch.setattr(predictor_module, "_GROUP_BYTES_CPU", limit)
    g = torch.Generator().manual_seed(0)
    detections = [fake_detections(n, size, g) for size, n, _ in cases]
    sizes = [size for size, _, _ in cases]
    return predictor._postprocess(detections, sizes, [opts for _, _, opts in cases])


@pytest.mark.parametrize("limit", [2**30, 50 * 100 * 130, 3 * 100 * 130])
def test_grouped_equals_one_mask_at_a_time(predictor, monkeypatch, limit):
    alone = pending_for(predictor, CASES, monkeypatch, limit=1)
    grouped = pending_for(predictor, CASES, monkeypatch, limit=limit)
    assert grouped.labels == alone.labels and grouped.scores == alone.scores
    assert grouped.boxes == alone.boxes
    assert [len(r) for r in grouped.runs] == [12, 0, 7, 9, 0, 0, 11]
    for ours, theirs in zip(grouped.runs, alone.runs, strict=True):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [len(c) for c in grouped.crops] == [0, 0, 0, 0, 5, 0, 0]
    for (a, offset_a), (b, offset_b) in zip(grouped.crops[4], alone.crops[4], strict=True):
        np.testing.assert_array_equal(a, b)
        assert offset_a == offset_b
    results = predictor.finish(grouped)
    assert [len(r.detections) for r in results] == [12, 0, 7, 9, 5, 4, 11]
    assert all(d.mask is None for d in results[5].detections)
    full = results[6].detections[0].mask  # threshold 0 keeps every pixel
    assert full["size"] == [100, 130] and full["counts"].startswith("0")


def test_group_by_size():
    sizes = [(10, 10), (20, 10), (10, 10), (10, 10), (10, 10)]
    counts = [3, 2, 0, 4, 5]
    options = [PredictOptions()] * 4 + [PredictOptions(mask_format="none")]
    assert group_by_size(counts, sizes, options, limit=10**6) == [[0, 3], [1]]
    # 3 + 4 masks of 100 pixels pass a 600-pixel limit: a new group starts
    assert group_by_size(counts, sizes, options, limit=600) == [[0], [3], [1]]
    assert group_by_size(counts, sizes, options, limit=1) == [[0], [3], [1]]


def test_output_size_gives_boxes_and_masks_in_the_files_frame(predictor):
    """An image decoded at half its file's size, with ``output_size`` the file's:
    the same detections, boxes scaled by two, masks at the file's size (the
    network sees what it sees at the decoded size)."""
    image = random_image(120, 150, seed=3)
    own = predictor.predict([image])[0]
    [full] = predictor.predict([image], [PredictOptions(output_size=(240, 300))])
    assert (full.height, full.width) == (240, 300) and own.detections
    assert [d.class_id for d in full.detections] == [d.class_id for d in own.detections]
    assert [d.score for d in full.detections] == [d.score for d in own.detections]
    for big, small in zip(full.detections, own.detections, strict=True):
        np.testing.assert_allclose(big.box, [2 * v for v in small.box], rtol=1e-5, atol=1e-3)
        assert big.mask["size"] == [240, 300]
    with pytest.raises(InvalidOptionError, match="output_size"):
        predictor.predict([image], [PredictOptions(output_size=(0, 300))])
