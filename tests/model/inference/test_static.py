"""The static-shape forward (``Predictor(static=True)``) against torchvision's own
``model(images)``: R50-FPN with random weights and the bundled demo model, 0, 1
and 100+ detections, mixed image sizes in one bucket, batches of 1, 3 and 8, and
a batch the static result cannot decide (the dynamic path answers it)."""

import copy

import numpy as np
import pytest
import torch

from model.geometry import input_geometry
from model.inference.fixed import run_suppression
from model.inference.nms import Suppression, greedy_nms
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from model.inference.static import StaticSizes, static_inputs
from model.loading import DEMO_CHECKPOINT, load_model
from tests.model.conftest import random_image, shapes_images
from tests.model.inference.reference import MAX_MASK_MISMATCH, decode, torchvision_reference

BOX_TOLERANCE, SCORE_TOLERANCE = 0.05, 1e-3
# images of different sizes that R50 (128/160) resizes differently and pads alike
DEMO_SIZES = [(256, 280), (250, 270), (240, 265), (256, 288), (230, 250), (248, 270),
              (252, 284), (244, 262)]
R50_SIZES = [(100, 130), (110, 140), (120, 150), (128, 160), (96, 125), (105, 136),
             (115, 146), (124, 155)]


def in_tie_order(detections: list[tuple]) -> list[tuple]:
    """(score, class, box, mask) rows with runs of equal scores sorted by class and
    box: torchvision orders exact ties by the order of its proposals, which a
    different but equally valid summation order may swap."""
    rows, start = [], 0
    while start < len(detections):
        end = start + 1
        while end < len(detections) and abs(detections[end][0] - detections[start][0]) < 1e-7:
            end += 1
        rows += sorted(detections[start:end], key=lambda row: (row[1], *row[2]))
        start = end
    return rows


def assert_matches(results, reference, info, mask_threshold: float = 0.5) -> int:
    """Same classes in the same order, boxes within 0.05 px, scores within 1e-3,
    masks differing in at most 0.5% of their pixels; returns the detections."""
    total = 0
    for result, ref in zip(results, reference, strict=True):
        assert len(result.detections) == len(ref["boxes"])
        total += len(ref["boxes"])
        ours = in_tie_order([(d.score, d.class_id, d.box, decode(d)) for d in result.detections])
        masks = (ref["masks"][:, 0] >= mask_threshold).numpy()
        theirs = in_tie_order([
            (score, info.class_ids[label], tuple(box), mask)
            for score, label, box, mask in zip(ref["scores"].tolist(), ref["labels"].tolist(),
                                               ref["boxes"].tolist(), masks, strict=True)
        ])
        assert [row[1] for row in ours] == [row[1] for row in theirs]
        if not ours:
            continue
        np.testing.assert_allclose([r[0] for r in ours], [r[0] for r in theirs],
                                   atol=SCORE_TOLERANCE, rtol=0)
        np.testing.assert_allclose([r[2] for r in ours], [r[2] for r in theirs],
                                   atol=BOX_TOLERANCE, rtol=0)
        for mine, expected in zip(ours, theirs, strict=True):
            wrong = np.count_nonzero(mine[3] != expected[3])
            assert wrong <= MAX_MASK_MISMATCH * max(1, expected[3].sum())
    return total


def run_static(predictor: Predictor, images, options: PredictOptions):
    runs, fallbacks = predictor.static.runs, predictor.static.fallbacks
    results = predictor.predict(images, [options] * len(images))
    assert predictor.static.runs == runs + 1
    return results, predictor.static.fallbacks - fallbacks


@pytest.fixture(scope="module")
def r50(network, info):
    return Predictor(network, info, static=True)


def one_bucket(network, sizes) -> list[torch.Tensor]:
    geometry = input_geometry(network)
    assert len({geometry.padded_size(*size) for size in sizes}) == 1
    resized = {tuple(network.transform.resize(torch.zeros(3, *s), None)[0].shape[1:])
               for s in sizes}
    assert len(resized) > 1 or len(sizes) == 1, "the sizes should resize differently"
    return [random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize(
    ("count", "options"),
    [
        (1, PredictOptions(score_threshold=0.05, max_detections=150)),
        (3, PredictOptions(score_threshold=0.05, max_detections=12, iou_threshold=0.4)),
        (8, PredictOptions(score_threshold=0.3, max_detections=1)),
        (1, PredictOptions(score_threshold=1.0, max_detections=5)),
    ],
    ids=["b1-many", "b3", "b8-one-each", "b1-none"],
)
def test_r50_matches_torchvision(r50, network, info, count, options):
    images = one_bucket(network, R50_SIZES[:count])
    results, fallbacks = run_static(r50, images, options)
    reference = torchvision_reference(network, images, score=options.score_threshold,
                                      iou=options.iou_threshold, top=options.max_detections)
    total = assert_matches(results, reference, info)
    assert fallbacks == 0
    if options.max_detections == 150:
        assert total >= 100
    elif options.max_detections == 1:
        assert [len(r.detections) for r in results] == [1] * count
    elif options.score_threshold == 1.0:
        assert total == 0
    else:
        assert total == count * options.max_detections


@pytest.fixture(scope="module")
def demo():
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip("no bundled demo model")
    loaded = load_model("demo", device="cpu")
    return loaded.network, loaded.info, Predictor(loaded.network, loaded.info, static=True)


@pytest.mark.parametrize(("count", "options"), [
    (1, PredictOptions()),
    (3, PredictOptions(score_threshold=0.3)),
    (8, PredictOptions(max_detections=1)),
])
def test_demo_matches_torchvision(demo, count, options):
    network, info, predictor = demo
    # crops of the scenes that resize to different sizes and pad to one canvas
    scenes = shapes_images(288, count)
    images = [scene[:, :height, :width].contiguous()
              for scene, (height, width) in zip(scenes, DEMO_SIZES[:count], strict=True)]
    geometry = input_geometry(network)
    assert len({geometry.padded_size(*image.shape[1:]) for image in images}) == 1
    results, fallbacks = run_static(predictor, images, options)
    reference = torchvision_reference(network, images, score=options.score_threshold,
                                      iou=options.iou_threshold, top=options.max_detections)
    total = assert_matches(results, reference, info)
    assert fallbacks == 0 and total >= count


def test_demo_blank_image_has_no_detections(demo):
    network, info, predictor = demo
    images = [torch.zeros((3, 256, 256), dtype=torch.uint8)]
    results, fallbacks = run_static(predictor, images, PredictOptions())
    assert results[0].detections == [] and fallbacks == 0
    assert_matches(results, torchvision_reference(network, images, score=0.5), info)


def test_a_result_it_cannot_decide_falls_back(network, info):
    """Eight candidates cannot decide an image that keeps up to 20 of hundreds: the
    batch runs again on the dynamic path, and still equals torchvision."""
    sizes = StaticSizes.for_network(network, candidates=8)
    predictor = Predictor(network, info, static=True, static_sizes=sizes)
    images = one_bucket(network, R50_SIZES[:1])
    options = PredictOptions(score_threshold=0.05, max_detections=20)
    results, fallbacks = run_static(predictor, images, options)
    assert fallbacks == 1
    reference = torchvision_reference(network, images, score=0.05, top=20)
    assert assert_matches(results, reference, info) == 20


def test_static_is_off_on_the_cpu_by_default(network, info):
    assert Predictor(network, info).static is None


def test_static_sizes_come_from_the_network(network):
    sizes = StaticSizes.for_network(network)
    assert sizes.post_nms_top_n == network.rpn.post_nms_top_n() == sizes.candidates
    assert sizes.detections == network.roi_heads.detections_per_img


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_equal_eager_and_torchvision(network, info, precision):
    """A batch of 3 replays the graph captured for 4 (padded with a blank image):
    the same detections as the uncaptured static forward, and in fp32 as
    torchvision's on the GPU."""
    network = copy.deepcopy(network)
    images = one_bucket(network, R50_SIZES[:3])
    options = [PredictOptions(score_threshold=0.05, max_detections=50)] * 3
    eager = Predictor(network, info, device="cuda", precision=precision, static=True)
    graphed = Predictor(network, info, device="cuda", precision=precision, static=True)
    graphed.capture_graphs([R50_SIZES[0]], [1, 4])
    assert graphed.static.graphs.batch_sizes == [1, 4]
    ours, theirs = graphed.predict(images, options), eager.predict(images, options)
    assert graphed.static.graphs.replays == 1 and graphed.static.fallbacks == 0
    # the graph runs a batch of 4: its convolutions may round differently
    for mine, other in zip(ours, theirs, strict=True):
        assert [d.class_id for d in mine.detections] == [d.class_id for d in other.detections]
        np.testing.assert_allclose([d.box for d in mine.detections],
                                   [d.box for d in other.detections], atol=BOX_TOLERANCE)
        np.testing.assert_allclose([d.score for d in mine.detections],
                                   [d.score for d in other.detections], atol=SCORE_TOLERANCE)
    if precision == "fp32":
        cuda = network.to("cuda")
        reference = torchvision_reference(cuda, [image.cuda() for image in images],
                                          score=0.05, top=50)
        reference = [{k: v.cpu() for k, v in ref.items()} for ref in reference]
        assert assert_matches(ours, reference, info) == 150


@pytest.mark.parametrize("rounds", [2, 3, 6])
def test_the_decided_prefix_is_greedy_nms(rounds):
    """After any number of rounds, the boxes ahead of the first one the last round
    changed are decided as greedy NMS decides them."""
    g = torch.Generator().manual_seed(rounds)
    corners = torch.rand(6, 300, 2, generator=g) * 100
    boxes = torch.cat([corners, corners + 5 + torch.rand(6, 300, 2, generator=g) * 30], 2)
    valid = torch.rand(6, 300, generator=g) > 0.1
    suppression = Suppression(boxes, valid, 0.3)
    keep, decided = run_suppression(suppression, rounds)
    expected = greedy_nms(boxes, valid, 0.3)
    assert (decided < 300).any(), "some group should still be undecided"
    for group, prefix in enumerate(decided.tolist()):
        assert torch.equal(keep[group, :prefix], expected[group, :prefix])


def test_blank_padding_leaves_the_real_images_alone(demo):
    """What a graph of a larger batch runs: the batch padded with blank images that
    want nothing gives the real images the same detections and exactness."""
    predictor = demo[2]
    static = predictor.static
    sizes = DEMO_SIZES[:2]
    images = [scene[:, :h, :w] for scene, (h, w) in zip(shapes_images(288, 2), sizes, strict=True)]
    image_list = predictor._transform(images)
    inputs = static_inputs(image_list, [tuple(i.shape[1:]) for i in images],
                           [PredictOptions()] * 2, static.num_labels)
    with torch.inference_mode():
        alone = static.forward(inputs, 100)
        padded = static.forward(inputs.padded(4), 100)
    assert padded["counts"][2:].tolist() == [0, 0] and padded["exact"].all()
    assert torch.equal(alone["counts"], padded["counts"][:2]) and alone["counts"].sum() > 0
    for name in ("boxes", "scores", "labels"):
        torch.testing.assert_close(alone[name], padded[name][:2], atol=1e-4, rtol=0)
