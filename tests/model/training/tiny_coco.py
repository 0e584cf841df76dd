"""A tiny COCO dataset on disk for the reader's and the validator's tests: ``H`` x ``W``
images, two categories with ids 7 and 3, and annotations in every segmentation
form (polygon, compressed and uncompressed RLE, a crowd)."""

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

H, W = 40, 60


def square_rle(x, y, size, compressed=True):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + size, x : x + size] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        rle["counts"] = rle["counts"].decode()
        return rle
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def write_dataset(root, annotations=None, images=2):
    (root / "images").mkdir(parents=True)
    for i in range(images):
        Image.new("RGB", (W, H), (i * 40, 100, 50)).save(root / "images" / f"{i}.png")
    coco = {
        "images": [
            {"id": 10 + i, "file_name": f"images/{i}.png", "width": W, "height": H}
            for i in range(images)
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": annotations if annotations is not None else default_annotations(),
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    return coco


def default_annotations():
    polygon = [[5, 5, 25, 5, 25, 20, 5, 20]]
    return [
        {"id": 1, "image_id": 10, "category_id": 7, "segmentation": polygon,
         "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "segmentation": square_rle(30, 10, 8),
         "bbox": [30, 10, 8, 8], "area": 64, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3,
         "segmentation": square_rle(40, 25, 10, compressed=False),
         "bbox": [40, 25, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 4, "image_id": 10, "category_id": 7, "segmentation": square_rle(0, 30, 9, False),
         "bbox": [0, 30, 9, 9], "area": 81, "iscrowd": 1},
    ]  # image 11 has no annotation
