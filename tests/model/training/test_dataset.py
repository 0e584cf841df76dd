"""The COCO reader: polygons and RLE, crowds, category ids with gaps, dir and zip,
errors, and augmentations that move masks with the image."""

import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from model.errors import DatasetError
from model.training.augment import AugmentConfig, TrainAugment
from model.training.dataset import CocoDataset, split_dataset
from tests.model.training.tiny_coco import H, W, default_annotations, write_dataset


@pytest.fixture
def dataset_dir(tmp_path):
    write_dataset(tmp_path / "ds")
    return tmp_path / "ds"


def test_masks_match_pycocotools_and_labels_are_contiguous(dataset_dir):
    dataset = CocoDataset(dataset_dir)
    assert dataset.categories == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    assert dataset.label_to_category == [0, 3, 7]
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert target["labels"].tolist() == [2, 1, 1]  # the crowd annotation is left out
    reference = COCO(str(dataset_dir / "annotations.json"))
    for mask, ann_id in zip(target["masks"], (1, 2, 3), strict=True):
        expected = reference.annToMask(reference.anns[ann_id])
        assert np.array_equal(mask.numpy(), expected)
    assert target["boxes"][1].tolist() == [30, 10, 38, 18]
    assert target["image_id"].item() == 10


def test_empty_image_has_empty_target(dataset_dir):
    _, target = CocoDataset(dataset_dir)[1]
    assert target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, H, W)
    assert target["labels"].shape == (0,)


def test_zip_reads_like_directory(dataset_dir, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "ds"), "zip", dataset_dir)
    from_dir, from_zip = CocoDataset(dataset_dir)[0], CocoDataset(archive)[0]
    assert torch.equal(from_dir[0], from_zip[0])
    for key in from_dir[1]:
        assert torch.equal(from_dir[1][key], from_zip[1][key])


def test_torchvision_layout_matches_torchvision_reader(dataset_dir):
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    annotations = dataset_dir / "annotations.json"
    ours = CocoDataset(dataset_dir, annotation_file=annotations)
    theirs = wrap_dataset_for_transforms_v2(
        CocoDetection(str(dataset_dir), str(annotations)), target_keys=("boxes", "labels", "masks")
    )
    _, target = ours[0]
    _, reference = theirs[0]
    keep = [0, 1, 2]  # torchvision keeps the crowd annotation, we do not
    assert torch.equal(target["masks"], reference["masks"][keep].to(torch.uint8))
    torch.testing.assert_close(target["boxes"], reference["boxes"][keep].float())
    ids = torch.tensor(ours.label_to_category)[target["labels"]]
    assert torch.equal(ids, reference["labels"][keep])


def test_problems_are_listed(tmp_path):
    bad = default_annotations()
    bad[0]["category_id"] = 99
    bad[1]["bbox"] = [55, 10, 30, 8]
    coco = write_dataset(tmp_path / "bad", bad)
    coco["images"][1]["file_name"] = "images/missing.png"
    (tmp_path / "bad" / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as error:
        CocoDataset(tmp_path / "bad")
    problems = error.value.problems
    assert len(problems) == 3
    assert any("category_id 99" in p for p in problems)
    assert any("not inside" in p for p in problems)
    assert any("missing.png" in p for p in problems)


def test_missing_source_and_annotations(tmp_path):
    with pytest.raises(DatasetError, match="expected a dataset directory"):
        CocoDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="annotations"):
        CocoDataset(tmp_path / "empty")


def test_split_is_disjoint_and_seeded(tmp_path):
    write_dataset(tmp_path / "ds", annotations=[], images=10)
    dataset = CocoDataset(tmp_path / "ds")
    train, val = split_dataset(dataset, 0.3, seed=1)
    train_ids = {im["id"] for im in train.images}
    val_ids = {im["id"] for im in val.images}
    assert len(val_ids) == 3 and not train_ids & val_ids and len(train_ids) == 7
    assert val_ids == {im["id"] for im in split_dataset(dataset, 0.3, seed=1)[1].images}
    assert split_dataset(dataset, 0.0)[1] is None


def test_flips_move_masks_and_boxes_together(dataset_dir):
    dataset = CocoDataset(dataset_dir)
    image, target = dataset[0]
    augment = TrainAugment(AugmentConfig(hflip=1.0, vflip=1.0, brightness=0, contrast=0,
                                         saturation=0))
    flipped, out = augment(image, target)
    assert torch.equal(flipped, image.flip(-1).flip(-2))
    assert torch.equal(out["masks"], target["masks"].flip(-1).flip(-2))
    for box, mask in zip(out["boxes"], out["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert torch.equal(out["labels"], target["labels"])


def test_zoom_and_crop_keep_instances_consistent(dataset_dir):
    dataset = CocoDataset(dataset_dir)
    augment = TrainAugment(AugmentConfig(zoom_out=1.0, iou_crop=1.0, hue=0.05))
    torch.manual_seed(0)
    for _ in range(10):
        image, target = augment(*dataset[0])
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape[0] == n
        assert target["masks"].shape[-2:] == image.shape[-2:]
        assert len(target["area"]) == len(target["iscrowd"]) == n
