"""COCO bbox and segm mAP of a model on a ``CocoDataset``, with ``pycocotools``.

Predictions come from ``Predictor`` (the same path as ``maskrcnn predict`` and
the HTTP API) with ``EVAL_OPTIONS``: a low score threshold and the COCO limit of
100 detections, as the COCO protocol expects. Results are converted with
``model.training.coco.to_coco_results`` and scored by ``COCOeval`` against the dataset's
own JSON (crowd annotations included, so crowd regions are ignored as COCO does).
"""

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from model.training.coco import to_coco_results

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
)
IOU_TYPES = ("bbox", "segm")
EVAL_OPTIONS = PredictOptions(score_threshold=0.05, iou_threshold=0.5, max_detections=100)


def predict_dataset(
    predictor: Predictor,
    dataset,
    *,
    batch_size: int = 4,
    options: PredictOptions = EVAL_OPTIONS,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """COCO results rows for every image of ``dataset`` (a ``CocoDataset``).

    ``progress(n)`` is called after each batch with the number of images it held.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images = [dataset.read_image(i) for i in indices]
        for i, result in zip(indices, predictor.predict(images, [options] * len(images)),
                             strict=True):
            rows.extend(to_coco_results(result, dataset.images[i]["id"]))
        if progress:
            progress(len(images))
    return rows


def coco_evaluate(
    ground_truth: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """``{"bbox": {"AP": .., "AP50": .., ...12 stats}, "segm": {...}}`` from COCOeval.

    ``ground_truth`` is a COCO instances dict; ``results`` COCO results rows
    (``segmentation`` RLE needed for ``segm``). No results scores 0 everywhere.
    """
    gt = _quiet_coco(_complete(ground_truth))
    metrics = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(list(results)), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {
            name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
        }
    return metrics


def evaluate_predictor(
    predictor: Predictor,
    dataset,
    *,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Predict every image of ``dataset`` and score the results (see ``coco_evaluate``)."""
    results = predict_dataset(predictor, dataset, batch_size=batch_size, progress=progress)
    return coco_evaluate(dataset.coco_dict(), results)


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per IoU type, one column per COCO stat."""
    header = f"{'':6}" + "".join(f"{name:>7}" for name in STAT_NAMES)
    rows = [
        f"{iou_type:6}" + "".join(f"{stats[name]:7.3f}" for name in STAT_NAMES)
        for iou_type, stats in metrics.items()
    ]
    return "\n".join([header, *rows])


def _complete(coco: dict[str, Any]) -> dict[str, Any]:
    """Fill the ``area`` and ``iscrowd`` fields COCOeval reads, where a dataset omits them."""
    from model.training.dataset import decode_segmentation

    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    annotations = []
    for ann in coco["annotations"]:
        ann = {"iscrowd": 0, **ann}
        if "area" not in ann:
            mask = decode_segmentation(ann["segmentation"], *sizes[ann["image_id"]])
            ann["area"] = float(mask.sum())
        annotations.append(ann)
    return {**coco, "annotations": annotations}


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
