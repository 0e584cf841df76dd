"""Batched greedy NMS and the batched RPN filtering against torchvision's own."""

import copy
import inspect
import re

import pytest
import torch
import torchvision
from torchvision.models.detection import rpn as rpn_module
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, nms
from torchvision.ops.poolers import _convert_to_roi_format

from model.inference import heads
from model.inference import nms as nms_module
from model.inference.boxes import scale_boxes
from model.inference.heads import predict_masks, select_boxes
from model.inference.nms import greedy_nms, greedy_nms_top, iou_threshold_for, top_kept
from model.inference.options import PredictOptions
from model.inference.pooling import pool_rois, roi_table
from model.inference.predictor import Predictor
from model.inference.proposals import COORDINATE_TRICK_LIMIT, filter_proposals
from model.inference.runtimes.torch_eager import TorchRuntime
from tests.model.conftest import DEVICES, random_image


def clustered_boxes(groups: int, n: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Boxes jittered around a few centres, so that suppression chains form, with
    scores descending in each group (ties included) and some boxes degenerate."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(groups, 4, 2, generator=g) * 200
    pick = torch.randint(0, 4, (groups, n), generator=g)
    centre = centres[torch.arange(groups)[:, None], pick]
    size = 20 + torch.rand(groups, n, 2, generator=g) * 30
    jitter = torch.randn(groups, n, 2, generator=g) * 6
    x1y1 = centre + jitter - size / 2
    boxes = torch.cat([x1y1, x1y1 + size], -1)
    boxes[:, ::17, 2:] = boxes[:, ::17, :2]  # zero-area boxes
    scores = torch.rand(groups, n, generator=g).round(decimals=2)  # ties
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    valid = torch.rand(groups, n, generator=g) > 0.1
    return boxes.to(device), scores.to(device), valid.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("chunk", [None, 2 * 300**2], ids=["one-chunk", "chunks-of-2"])
def test_greedy_nms_keeps_what_torchvision_keeps(device, threshold, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(nms_module, "_CHUNK_ELEMENTS", chunk)
    boxes, scores, valid = clustered_boxes(6, 300, seed=int(threshold * 10), device=device)
    keep = greedy_nms(boxes, valid, threshold)
    suppressed = 0
    for b, s, v, k in zip(boxes, scores, valid, keep, strict=True):
        index = v.nonzero().squeeze(1)
        expected = torch.zeros_like(v)
        expected[index[nms(b[index], s[index], threshold)]] = True
        assert torch.equal(k, expected)
        suppressed += int(v.sum() - k.sum())
    assert suppressed > 300, "the boxes must overlap enough for chains to matter"


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_nms_per_class_and_per_group_thresholds(device):
    boxes, scores, valid = clustered_boxes(4, 200, seed=5, device=device)
    classes = torch.randint(0, 3, valid.shape, generator=torch.Generator().manual_seed(1))
    classes = classes.to(device)
    thresholds = [0.3, 0.5, 0.6, 0.7]
    keep = greedy_nms(boxes, valid, thresholds, classes=classes)
    for b, s, v, c, t, k in zip(boxes, scores, valid, classes, thresholds, keep, strict=True):
        index = v.nonzero().squeeze(1)
        expected = torch.zeros_like(v)
        expected[index[batched_nms(b[index], s[index], c[index], t)]] = True
        assert torch.equal(k, expected)


def test_greedy_nms_edge_cases():
    empty = greedy_nms(torch.zeros(0, 5, 4), torch.zeros(0, 5, dtype=torch.bool), 0.5)
    assert empty.shape == (0, 5)
    # one box per group: kept when valid; identical boxes: only the first survives
    box = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    assert greedy_nms(box, torch.tensor([[True]]), 0.5).tolist() == [[True]]
    assert greedy_nms(box, torch.tensor([[False]]), 0.5).tolist() == [[False]]
    same = box.expand(1, 3, 4)
    assert greedy_nms(same, torch.ones(1, 3, dtype=torch.bool), 0.5).tolist() == [
        [True, False, False]
    ]
    # an invalid box does not suppress: the third survives although it overlaps the second
    assert greedy_nms(same, torch.tensor([[False, True, True]]), 0.5).tolist() == [
        [False, True, False]
    ]


def with_a_chain(boxes: torch.Tensor, valid: torch.Tensor, length: int) -> None:
    """Make group 0's first ``length`` boxes a chain that settles in about ``length``
    rounds: each overlaps the next (IoU 0.67) but not the one after (0.43)."""
    x = torch.arange(length, dtype=boxes.dtype) * 2
    boxes[0, :length] = torch.stack([x, 0 * x, x + 10, 0 * x + 10], 1)
    valid[0, :length] = True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rounds", "reads"), [(64, 1), (16, 3), (1, 40)])
@pytest.mark.parametrize("chunk", [None, 2 * 100**2], ids=["one-chunk", "chunks-of-2"])
def test_greedy_nms_top_reads_its_check_with_the_counts(device, rounds, reads, chunk, monkeypatch):
    """NMS rounds run unchecked; whether they settled is read in the one host read
    of the kept counts, and too few rounds cost another read and more rounds. The
    result is greedy_nms then top_kept's, two groups to an image (the RPN's levels).
    The chain of 40 settles in its 39th round: ``reads`` is ``ceil(40 / rounds)``."""
    if chunk:
        monkeypatch.setattr(nms_module, "_CHUNK_ELEMENTS", chunk)
    boxes, scores, valid = clustered_boxes(4, 100, seed=9, device=device)
    with_a_chain(boxes, valid, 40)
    images, tops = 2, [50, 7]
    expected = top_kept(
        greedy_nms(boxes, valid, 0.5).view(images, -1),
        scores.view(images, -1),
        tops,
        boxes=boxes.view(images, -1, 4),
    )
    host_reads = []
    for name in ("tolist", "item"):
        read = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda t, _read=read: host_reads.append(1) or _read(t)
        )
    got = greedy_nms_top(
        boxes,
        valid,
        0.5,
        scores.view(images, -1),
        tops,
        rounds=rounds,
        boxes=boxes.view(images, -1, 4),
    )
    monkeypatch.undo()
    assert len(host_reads) == reads
    assert len(got) == len(expected) == images
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys() == {"scores", "boxes"}
        assert all(torch.equal(g[k], e[k]) for k in g)
    assert len(expected[0]["scores"]) == 50, "the top must cut group 0's kept boxes"


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_rounding_follows_the_device(device):
    """Two boxes overlapping by exactly float32(0.3), which is above 0.3: torchvision's
    CPU kernel compares with the double threshold and suppresses, its CUDA kernel
    compares with the float and keeps both; greedy_nms does what the device does."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    expected = torch.zeros(2, dtype=torch.bool, device=device)
    expected[nms(boxes, scores, 0.3)] = True
    assert expected.tolist() == ([True, False] if device == "cpu" else [True, True])
    keep = greedy_nms(boxes[None], torch.ones(1, 2, dtype=torch.bool, device=device), 0.3)
    assert torch.equal(keep[0], expected)
    assert iou_threshold_for(0.5, torch.device(device)) == 0.5


def test_coordinate_trick_limits_are_torchvisions():
    """batched_nms switches from one offset call to per-group calls past these many
    box coordinates (its source says so); the offsets change float32 rounding."""
    source = inspect.getsource(torchvision.ops.boxes.batched_nms)
    cpu, gpu = re.search(
        r"\((\d[\d_]*) if boxes\.device\.type == .cpu. else (\d[\d_]*)\)", source
    ).groups()
    assert {"cpu": int(cpu), "cuda": int(gpu)} == COORDINATE_TRICK_LIMIT


def capture_rpn_inputs(network, images):
    """The arguments torchvision's RPN hands to its ``filter_proposals``."""
    captured = []
    original = rpn_module.RegionProposalNetwork.filter_proposals

    def spy(self, *args):
        captured.append(args)
        return original(self, *args)

    rpn_module.RegionProposalNetwork.filter_proposals = spy
    try:
        with torch.no_grad():
            network([image.float() / 255 for image in images])
    finally:
        rpn_module.RegionProposalNetwork.filter_proposals = original
    return captured[0]


def by_score_then_box(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Rows ``(score, box)`` in a canonical order: torchvision's per-level NMS path
    sorts kept boxes with an unstable sort, so equal scores may come in any order."""
    rows = torch.cat([scores[:, None], boxes], 1).double()
    for column in (4, 3, 2, 1, 0):
        rows = rows[rows[:, column].sort(stable=True, descending=column == 0).indices]
    return rows


@pytest.mark.parametrize(("pre_nms", "per_level_calls"), [(4000, True), (150, False)])
def test_filter_proposals_matches_torchvision(network, pre_nms, per_level_calls, monkeypatch):
    """At 150 per level each image's NMS is one call with torchvision's coordinate
    offsets; at 4000, over 1,000 boxes, one call per level (CPU limits). Both are
    reproduced."""
    rpn = network.rpn
    vanilla_calls = []
    vanilla = torchvision.ops.boxes._batched_nms_vanilla
    monkeypatch.setattr(
        torchvision.ops.boxes,
        "_batched_nms_vanilla",
        lambda *a: vanilla_calls.append(1) or vanilla(*a),
    )
    saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = pre_nms, 300
    try:
        images = [random_image(128, 160, 11), random_image(96, 150, 12), random_image(128, 90, 13)]
        args = capture_rpn_inputs(network, images)
        vanilla_calls.clear()
        expected_boxes, expected_scores = rpn.filter_proposals(*args)
        boxes, scores = filter_proposals(rpn, *args)
    finally:
        rpn._pre_nms_top_n.update(saved[0])
        rpn._post_nms_top_n.update(saved[1])
    assert bool(vanilla_calls) == per_level_calls
    for b, s, eb, es in zip(boxes, scores, expected_boxes, expected_scores, strict=True):
        assert len(b) == len(eb) > 50
        assert torch.equal(s, es)
        assert torch.equal(by_score_then_box(b, s), by_score_then_box(eb, es))
        if not per_level_calls:  # the stable-sorted path: same order too
            assert torch.equal(b, eb)


def test_vectorized_selection_falls_back_on_many_candidates(network, info, monkeypatch):
    """Past ``_MAX_DENSE_ELEMENTS`` the image-by-image path decides, with the same
    answer."""
    images = [random_image(100, 130, 1), random_image(100, 130, 2)]
    options = [PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=0.2)]
    loop = Predictor(network, info, vectorized=False).predict(images, options)
    monkeypatch.setattr(heads, "_MAX_DENSE_ELEMENTS", 2 * 50**2)
    calls = []
    select_image = heads._select_image
    monkeypatch.setattr(heads, "_select_image", lambda *a: calls.append(1) or select_image(*a))
    vectorized = Predictor(network, info, vectorized=True).predict(images, options)
    assert calls == [1, 1]
    assert vectorized == loop


@pytest.mark.parametrize("vectorized", [False, True])
def test_a_batch_without_proposals_has_no_detections(network, vectorized):
    """When the RPN keeps nothing at all (no image has a proposal), both selections
    answer as torchvision's heads do: nothing."""
    images = [random_image(100, 130, 1), random_image(90, 70, 2)]
    with torch.no_grad():
        image_list, _ = network.transform([image.float() / 255 for image in images])
        features = network.backbone(image_list.tensors)
        none = [torch.zeros(0, 4), torch.zeros(0, 4)]
        expected, _ = network.roi_heads(features, none, image_list.image_sizes)
        heads_, sizes, options = network.roi_heads, image_list.image_sizes, [PredictOptions()] * 2
        runtime = TorchRuntime(network)
        kept = select_boxes(heads_, runtime.classify, features, none, sizes, options, vectorized)
        masks = predict_masks(heads_, runtime.segment, features, kept, sizes)
    for k, m, e in zip(kept, masks, expected, strict=True):
        assert k["boxes"].shape == e["boxes"].shape == (0, 4)
        assert len(k["scores"]) == len(k["labels"]) == len(m) == len(e["masks"]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_vectorized_predictor_gives_the_loop_detections(network, info, device):
    """Per-image options (thresholds, classes, top-k, formats) in one batch: the
    batched path returns exactly the image-by-image path's detections."""
    images = [random_image(100, 130, s) for s in range(4)] + [random_image(120, 90, 9)]
    options = [
        PredictOptions(),
        PredictOptions(score_threshold=0.3, iou_threshold=0.3, max_detections=5),
        PredictOptions(classes=frozenset({2, 3}), mask_format="polygon"),
        PredictOptions(score_threshold=0.9, mask_format="none"),
        PredictOptions(score_threshold=0.01, iou_threshold=0.7, max_detections=300),
    ]
    network = copy.deepcopy(network)  # Predictor moves it to the device
    loop = Predictor(network, info, device=device, vectorized=False).predict(images, options)
    vectorized = Predictor(network, info, device=device, vectorized=True).predict(images, options)
    assert sum(len(r.detections) for r in loop) > 50
    assert vectorized == loop


def test_sync_free_replacements_give_torchvisions_numbers(network, info):
    """Predictor's transform and box rescaling are torchvision's
    GeneralizedRCNNTransform and resize_boxes, bit for bit; its ROI pooling is
    MultiScaleRoIAlign's (on the CPU up to float32 rounding: test_pooling.py)."""
    images = [random_image(100, 130, 1), random_image(90, 70, 2)]
    same_size = [random_image(90, 70, seed) for seed in (3, 4, 5)]  # transformed together
    with torch.no_grad():
        for batch in (images, same_size):
            for predictor in (
                Predictor(network, info),
                Predictor(network, info, vectorized=True),
                Predictor(network, info, vectorized=True, fused=True),
            ):
                ours = predictor._transform(batch)
                expected, _ = network.transform([image.float() / 255 for image in batch])
                assert torch.equal(ours.tensors, expected.tensors)
                assert ours.image_sizes == expected.image_sizes
        # that one-size batch went through together, into the fused backbone's layout
        assert ours.tensors.is_contiguous(memory_format=torch.channels_last)
        expected, _ = network.transform([image.float() / 255 for image in images])
        features = network.backbone(expected.tensors)
        proposals = network.rpn(expected, features)[0]
        heads_ = network.roi_heads
        for pooler, boxes in [
            (heads_.box_roi_pool, proposals),
            (heads_.mask_roi_pool, [p[:7] for p in proposals]),
            (heads_.mask_roi_pool, [proposals[0][:0], proposals[1][:3]]),
        ]:
            torch.testing.assert_close(
                pool_rois(pooler, features, boxes, expected.image_sizes),
                pooler(features, boxes, expected.image_sizes),
                rtol=2e-5,
                atol=2e-6,
            )
            assert torch.equal(roi_table(boxes), _convert_to_roi_format(boxes))
    boxes = [proposals[0][:20], proposals[1][:0], proposals[1][:7]]
    resized, original = [(800, 1067), (800, 800), (123, 457)], [(480, 640), (5, 5), (1000, 333)]
    for ours, box, size, input_size in zip(
        scale_boxes(boxes, resized, original), boxes, resized, original, strict=True
    ):
        assert torch.equal(ours, resize_boxes(box, size, input_size))
