"""Predictions in the COCO results format (what ``COCO.loadRes`` reads)."""

from model.inference.predictor import ImageResult


def to_coco_results(
    result: ImageResult, image_id: int, file_name: str | None = None
) -> list[dict]:
    """One COCO result per detection: ``bbox`` is ``[x, y, w, h]``, ``segmentation``
    the RLE (when the prediction carried RLE masks)."""
    rows = []
    for det in result.detections:
        x1, y1, x2, y2 = det.box
        row = {
            "image_id": image_id,
            "category_id": det.class_id,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(det.score, 5),
        }
        if file_name is not None:
            row["file_name"] = file_name
        if isinstance(det.mask, dict):
            row["segmentation"] = det.mask
        rows.append(row)
    return rows
