"""The synthetic shapes generator: deterministic, valid COCO, occlusion handled."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model.training.dataset import CocoDataset
from model.training.synthetic import SHAPE_CLASSES, SyntheticConfig, generate_dataset, render_image

SMALL = {"image_size": 96, "max_objects": 5}


def test_same_seed_same_data_and_independent_of_length(tmp_path):
    a = generate_dataset(tmp_path / "a", num_images=4, seed=3, **SMALL)
    b = generate_dataset(tmp_path / "b", num_images=2, seed=3, **SMALL)
    assert a["annotations"][: len(b["annotations"])] == b["annotations"]
    for name in ("images/000000.jpg", "images/000001.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_other_seed_other_images():
    cfg = SyntheticConfig(seed=1, **SMALL)
    image_a, _ = render_image(cfg, 0)
    image_b, _ = render_image(SyntheticConfig(seed=2, **SMALL), 0)
    assert not np.array_equal(image_a, image_b)


def test_annotations_are_valid_coco(tmp_path):
    coco = generate_dataset(tmp_path / "d", num_images=6, seed=0, **SMALL)
    saved = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert saved == json.loads(json.dumps(coco))
    assert [c["id"] for c in coco["categories"]] == [c["id"] for c in SHAPE_CLASSES]
    assert coco["info"]["seed"] == 0 and coco["info"]["image_size"] == 96
    assert coco["annotations"], "six images with 1..5 shapes each"
    for ann in coco["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.shape == (96, 96) and mask.sum() == ann["area"] > 0
        assert ann["bbox"] == pytest.approx(mask_utils.toBbox(ann["segmentation"]).tolist())
        assert ann["iscrowd"] == 0


def test_visible_masks_do_not_overlap_and_stay_mostly_visible():
    cfg = SyntheticConfig(seed=5, image_size=128, min_objects=6, max_objects=6)
    for index in range(5):
        _, annotations = render_image(cfg, index)
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in annotations])
        assert masks.sum(axis=0).max() <= 1  # a pixel shows one shape at most
        assert masks.reshape(len(masks), -1).sum(1).min() > 0


def test_zip_output_reads_as_dataset(tmp_path):
    generate_dataset(tmp_path / "shapes.zip", num_images=3, seed=0, **SMALL)
    dataset = CocoDataset(tmp_path / "shapes.zip")
    image, target = dataset[0]
    assert image.shape == (3, 96, 96)
    assert len(target["labels"]) == len(target["masks"]) >= 1
