"""The reduced-precision rule, shared by the CUDA tests (``test_precision.py``) and
the CPU's (``test_runtimes.py``): every detection with score >= ``SCORE`` in one
precision has a partner in the other (same class, box IoU >= ``MIN_BOX_IOU``, mask
IoU >= ``MIN_MASK_IOU``), looked for down to ``PARTNER_SCORE``; and the cases it is
checked on."""

import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from model.inference.predictor import ImageResult
from model.info import ModelInfo
from model.loading import load_model
from model.networks import build_network
from tests.model.conftest import shapes_images

SCORE = 0.5
PARTNER_SCORE = 0.3
MIN_BOX_IOU = 0.95
MIN_MASK_IOU = 0.9
MIN_COMPARED = 10


def demo_case():
    loaded = load_model("demo")
    return loaded.network, loaded.info, shapes_images(256, 8)


def r50_case():
    torch.manual_seed(0)
    network = build_network("maskrcnn_resnet50_fpn", num_classes=91, min_size=480, max_size=640)
    with torch.no_grad():
        network.roi_heads.box_predictor.cls_score.weight.mul_(0.75)
        network.roi_heads.box_predictor.cls_score.bias.mul_(0.75)
    info = ModelInfo("r50", "maskrcnn_resnet50_fpn", tuple(range(91)), ("bg",) + ("x",) * 90)
    return network, info, shapes_images(480, 4)


def unmatched(ours: list[ImageResult], theirs: list[ImageResult]) -> tuple[int, list[str]]:
    """How many of ``ours`` (score >= SCORE) were compared, and what failed."""
    compared, failures = 0, []
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        candidates = b.detections
        for det in (d for d in a.detections if d.score >= SCORE):
            compared += 1
            same_class = [d for d in candidates if d.class_id == det.class_id]
            if not same_class:
                failures.append(f"image {index}: no class {det.class_id} for {det}")
                continue
            ious = box_iou(torch.tensor([det.box]), torch.tensor([d.box for d in same_class]))[0]
            best = int(ious.argmax())
            partner = same_class[best]
            mask_iou = float(mask_utils.iou([det.mask], [partner.mask], [0])[0][0])
            if ious[best] < MIN_BOX_IOU or mask_iou < MIN_MASK_IOU:
                failures.append(
                    f"image {index}: class {det.class_id} score {det.score:.3f}: box IoU "
                    f"{float(ious[best]):.3f}, mask IoU {mask_iou:.3f} with score "
                    f"{partner.score:.3f}"
                )
    return compared, failures


def assert_partners(reference: list[ImageResult], reduced: list[ImageResult]) -> None:
    """The rule both ways: enough detections compared, none without its partner."""
    compared, failures = unmatched(reference, reduced)
    back, back_failures = unmatched(reduced, reference)
    assert compared >= MIN_COMPARED, f"only {compared} detections with score >= {SCORE}"
    assert back >= MIN_COMPARED
    assert not failures + back_failures, "\n".join(failures + back_failures)


def assert_sane(images: list[torch.Tensor], results: list[ImageResult]) -> None:
    """Detections of a random-weight network (near-ties that any rounding reorders,
    so not compared one by one): enough of them, finite, inside their image."""
    assert sum(len(r.detections) for r in results) >= MIN_COMPARED
    for image, result in zip(images, results, strict=True):
        boxes = torch.tensor([d.box for d in result.detections]).reshape(-1, 4)
        assert torch.isfinite(boxes).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.shape[2]).all()
        assert (boxes[:, 3] <= image.shape[1]).all()
        assert all(0 <= d.score <= 1 for d in result.detections)
        assert all(d.mask["size"] == list(image.shape[1:]) for d in result.detections)
