"""The predictor against torchvision's own ``model(images)`` on the same weights."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.errors import InvalidImageError, InvalidOptionError
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from tests.model.conftest import random_image
from tests.model.inference.reference import MAX_MASK_MISMATCH, decode, torchvision_reference

# OpenVINO's float32 convolutions round differently from torch's (4e-6 of the largest
# feature on R50-FPN): boxes and scores are compared within these bounds instead
OPENVINO_BOX_ATOL, OPENVINO_SCORE_ATOL = 0.05, 1e-3


@pytest.fixture(scope="module", params=["loop", "vectorized", "openvino"])
def predictor(network, info, request, tmp_path_factory):
    """Every test here runs on torchvision's per-image selection, on the batched
    one (``Predictor(vectorized=True)``, the default on CUDA), and with the dense
    parts compiled by OpenVINO in float32 (the default on the CPU)."""
    if request.param == "openvino":
        cache = tmp_path_factory.mktemp("openvino")
        return Predictor(network, info, runtime="openvino", cache_dir=cache)
    return Predictor(network, info, vectorized=request.param == "vectorized")


@pytest.fixture(scope="module")
def images():
    return [random_image(100, 130, 1), random_image(90, 70, 2), random_image(128, 128, 3)]


def in_reference_order(detections, ref, info, box_atol: float, score_atol: float) -> list:
    """``detections`` reordered as torchvision ordered them: two whose scores are
    within ``score_atol`` (0.93255 and 0.93255 on an AVX2-only CPU) may come in
    either order. Each reference detection takes the first unused one of its class
    within both tolerances; one it cannot find stays in place, to fail below."""
    left = list(detections)
    ordered = []
    for label, box, score in zip(ref["labels"].tolist(), ref["boxes"], ref["scores"], strict=True):
        for index, det in enumerate(left):
            if (
                det.class_id == info.class_ids[label]
                and abs(det.score - score.item()) <= score_atol
                and (torch.tensor(det.box) - box).abs().max().item() <= box_atol
            ):
                ordered.append(left.pop(index))
                break
        else:
            ordered.append(left.pop(0))
    return ordered


@pytest.mark.parametrize("mask_threshold", [0.5, 0.3])
def test_matches_torchvision(predictor, network, info, images, mask_threshold):
    options = PredictOptions(score_threshold=0.05, mask_threshold=mask_threshold)
    ours = predictor.predict(images, [options] * len(images))
    reference = torchvision_reference(network, images)
    box_atol, score_atol = 1e-3, 1e-5
    if predictor.runtime.name == "openvino":
        box_atol, score_atol = OPENVINO_BOX_ATOL, OPENVINO_SCORE_ATOL
    total = 0
    worst = 0.0
    for result, ref, image in zip(ours, reference, images, strict=True):
        assert (result.height, result.width) == tuple(image.shape[1:])
        assert len(result.detections) == len(ref["boxes"])
        total += len(result.detections)
        detections = result.detections
        if predictor.runtime.name == "openvino":  # near-ties may come in either order
            detections = in_reference_order(detections, ref, info, box_atol, score_atol)
        ids = [info.class_ids[label] for label in ref["labels"].tolist()]
        assert [d.class_id for d in detections] == ids
        assert [d.class_name for d in detections] == [
            info.class_names[label] for label in ref["labels"].tolist()
        ]
        torch.testing.assert_close(
            torch.tensor([d.box for d in detections]), ref["boxes"], atol=box_atol, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor([d.score for d in detections]),
            ref["scores"],
            atol=score_atol,
            rtol=0,
        )
        ref_masks = (ref["masks"][:, 0] >= mask_threshold).numpy()
        for det, ref_mask in zip(detections, ref_masks, strict=True):
            ours_mask = decode(det)
            assert ours_mask.shape == ref_mask.shape
            wrong = np.count_nonzero(ours_mask != ref_mask)
            worst = max(worst, wrong / max(1, ref_mask.sum()))
    assert total >= 30, "the comparison needs detections to mean anything"
    assert worst <= MAX_MASK_MISMATCH


def test_options_apply_per_image_inside_one_batch(predictor, images):
    a, b = random_image(100, 130, 7), images[0]  # same size: no extra padding
    alone = predictor.predict([a], [PredictOptions(score_threshold=0.1)])[0]
    strict = PredictOptions(score_threshold=0.3, iou_threshold=0.3, max_detections=2,
                            mask_format="none")
    mixed = predictor.predict([b, a, b], [strict, PredictOptions(score_threshold=0.1), strict])
    # Batched convolutions round differently from single ones: equal within float noise,
    # compared on the top detections (random weights give near-ties deep in the list).
    mixed[1].detections, alone.detections = mixed[1].detections[:30], alone.detections[:30]
    assert [d.class_id for d in mixed[1].detections] == [d.class_id for d in alone.detections]
    torch.testing.assert_close(torch.tensor([d.box for d in mixed[1].detections]),
                               torch.tensor([d.box for d in alone.detections]), atol=1e-2, rtol=0)
    torch.testing.assert_close(torch.tensor([d.score for d in mixed[1].detections]),
                               torch.tensor([d.score for d in alone.detections]), atol=1e-4, rtol=0)
    assert len(mixed[0].detections) <= 2 and all(d.mask is None for d in mixed[0].detections)
    assert all(d.score >= 0.3 for d in mixed[0].detections)


def test_class_filter_and_top_k(predictor, info, images):
    everything = predictor.predict(images[:1], [PredictOptions(score_threshold=0.3,
                                                               max_detections=1000)])[0]
    assert len(everything.detections) < 1000, "the top-k must not cut the unfiltered list"
    label = 2
    only = predictor.predict(
        images[:1],
        [PredictOptions(score_threshold=0.3, max_detections=1000, classes=frozenset({label}))],
    )[0]
    expected = [d for d in everything.detections if d.class_id == info.class_ids[label]]
    assert only.detections == expected and expected
    top3 = predictor.predict(images[:1], [PredictOptions(score_threshold=0.05,
                                                         max_detections=3)])[0]
    assert top3.detections == everything.detections[:3]


def test_no_detections(predictor, images):
    result = predictor.predict(images[:2], [PredictOptions(score_threshold=1.0)] * 2)
    assert [r.detections for r in result] == [[], []]
    assert predictor.predict([], []) == []


def test_polygons_follow_the_rle_mask(predictor, images):
    """Polygons land on the same mask, in image coordinates. Random-weight masks are
    ragged, so shape fidelity is checked on solid shapes in test_rle.py; here the
    filled polygons must lie (almost all) inside the RLE mask."""
    options = [PredictOptions(score_threshold=0.2, mask_format=f) for f in ("rle", "polygon")]
    rle, poly = predictor.predict([images[2], images[2]], options)
    inside = filled_total = 0
    for r, p in zip(rle.detections, poly.detections, strict=True):
        assert r.box == p.box
        mask = decode(r)
        if mask.sum() < 200:
            continue
        assert p.mask, "a mask of 200+ pixels has at least one polygon"
        filled = mask_utils.decode(mask_utils.merge(
            mask_utils.frPyObjects(p.mask, rle.height, rle.width))).astype(bool)
        inside += (filled & mask).sum()
        filled_total += filled.sum()
    assert filled_total > 0
    assert inside / filled_total > 0.9


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.zeros(3, 10, 10), "uint8"),
        (torch.zeros(4, 10, 10, dtype=torch.uint8), "[3, H, W]"),
        (torch.zeros(3, 0, 10, dtype=torch.uint8), "empty"),
        (np.zeros((10, 10, 3), dtype=np.uint8), "tensor"),
    ],
)
def test_rejects_bad_images(predictor, image, message):
    with pytest.raises(InvalidImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        predictor.predict([image], [PredictOptions()])


@pytest.mark.parametrize(
    "options",
    [PredictOptions(score_threshold=1.5), PredictOptions(iou_threshold=float("nan")),
     PredictOptions(max_detections=-1), PredictOptions(mask_format="png")],
)
def test_rejects_bad_options(predictor, images, options):
    with pytest.raises(InvalidOptionError):
        predictor.predict(images[:1], [options])
