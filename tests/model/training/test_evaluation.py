"""COCO evaluation: scores against pycocotools, and ``maskrcnn evaluate`` gives the
numbers COCOeval gives on ``maskrcnn predict`` output."""

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from app.cli import main
from model.checkpoint import save_checkpoint
from model.loading import DEMO_CHECKPOINT
from model.networks import build_network
from model.training.evaluation import STAT_NAMES, coco_evaluate, format_metrics
from model.training.synthetic import SHAPE_CLASSES, generate_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "shapes"
    return root, generate_dataset(root, num_images=6, image_size=96, seed=123)


def perfect_results(coco):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 1.0, "segmentation": a["segmentation"]}
        for a in coco["annotations"]
    ]


def test_perfect_predictions_score_one(shapes):
    _, coco = shapes
    metrics = coco_evaluate(coco, perfect_results(coco))
    assert set(metrics) == {"bbox", "segm"}
    for stats in metrics.values():
        assert list(stats) == list(STAT_NAMES)
        assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_crowd_regions_are_ignored(shapes):
    _, coco = shapes
    crowd = dict(coco["annotations"][0], iscrowd=1)
    with_crowd = {**coco, "annotations": [crowd, *coco["annotations"][1:]]}
    # a detection on the crowd region is neither a true nor a false positive
    assert coco_evaluate(with_crowd, perfect_results(coco))["segm"]["AP"] == pytest.approx(1.0)


def test_no_predictions_score_zero(shapes):
    _, coco = shapes
    metrics = coco_evaluate(coco, [])
    assert all(v == 0.0 for stats in metrics.values() for v in stats.values())
    assert format_metrics(metrics).splitlines()[0].split() == list(STAT_NAMES)


def random_checkpoint(path):
    torch.manual_seed(0)
    network = build_network("maskrcnn_small_fpn", num_classes=6, min_size=96, max_size=96)
    with torch.no_grad():  # favour object classes so random weights still detect things
        network.roi_heads.box_predictor.cls_score.bias[1:] += 3.0
    kwargs = {"num_classes": 6, "min_size": 96, "max_size": 96}
    save_checkpoint(path, network, architecture="maskrcnn_small_fpn", arch_kwargs=kwargs,
                    classes=list(SHAPE_CLASSES))
    return str(path)


@pytest.mark.parametrize("which", ["random", "demo"])
def test_evaluate_command_matches_cocoeval_on_predict_output(shapes, tmp_path, which):
    if which == "demo" and not DEMO_CHECKPOINT.is_file():
        pytest.skip("no bundled demo model")
    model = "demo" if which == "demo" else random_checkpoint(tmp_path / "random.safetensors")
    root, coco = shapes
    # torchvision layout: an image directory and an annotation file beside it
    images = root / "images"
    annotations = tmp_path / "instances.json"
    flat = {**coco, "images": [{**im, "file_name": im["file_name"].split("/")[-1]}
                               for im in coco["images"]]}
    annotations.write_text(json.dumps(flat))
    results, metrics = tmp_path / "results.json", tmp_path / "metrics.json"
    common = ["--model", model, "--device", "cpu"]
    assert main(["predict", str(images), *common, "--annotations", str(annotations),
                 "--score-threshold", "0.05", "--out", str(results)]) == 0
    assert main(["evaluate", "--dataset", str(images), "--annotations", str(annotations),
                 *common, "--out", str(metrics)]) == 0
    rows = json.loads(results.read_text())
    assert rows, "the model should detect something"
    ours = json.loads(metrics.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        for iou_type in ("bbox", "segm"):
            reference = COCOeval(gt, gt.loadRes(rows), iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
            assert [ours[iou_type][name] for name in STAT_NAMES] == pytest.approx(
                list(reference.stats), abs=1e-9
            )
