"""A COCO instances dataset (a directory or a zip) as torchvision detection samples.

``source`` holds ``annotations.json`` at its root and the images it names by
``file_name`` (relative to the root). The torchvision / COCO layout, an image
directory and a separate annotation file (``instances_val2017.json``), works too:
pass that file as ``annotation_file``. Masks may be polygons, uncompressed RLE or
compressed RLE. Network labels are contiguous (``1..K`` in category-id order);
``label_to_category`` maps them back to the dataset's category ids, which may
have gaps. Crowd annotations (``iscrowd: 1``) and empty masks are left out of the
training targets, but stay in ``coco_dict()`` so COCOeval treats crowds as it should.
"""

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from model.errors import DatasetError
from model.training.validation import load_coco, unsafe_path_reason, validate_coco

ANNOTATIONS_FILE = "annotations.json"
Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]
Transform = Callable[[torch.Tensor, dict[str, torch.Tensor]], Sample]


class _Files:
    """Reads members of a directory or a zip by their POSIX path."""

    def __init__(self, source: Path):
        self.source = source
        self.is_zip = source.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        self._names: set[str] | None = None
        if not (self.is_zip or source.is_dir()):
            raise DatasetError(f"{source}: expected a dataset directory or zip; found nothing")
        if self.is_zip and not zipfile.is_zipfile(source):
            raise DatasetError(f"{source}: expected a dataset directory or a zip file")

    def read(self, name: str) -> bytes:
        with self.open(name) as stream:
            return stream.read()

    def open(self, name: str) -> BinaryIO:
        if self.is_zip:
            if self._zip is None or self._pid != os.getpid():  # one handle per worker process
                self._zip, self._pid = zipfile.ZipFile(self.source), os.getpid()
            return self._zip.open(name)
        return (self.source / name).open("rb")

    def exists(self, name: str) -> bool:
        if unsafe_path_reason(name):
            return False
        if self.is_zip:
            if self._names is None:
                with zipfile.ZipFile(self.source) as archive:
                    self._names = set(archive.namelist())
            return name in self._names
        return (self.source / name).is_file()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None, "_pid": -1}


class CocoDataset(Dataset):
    """``dataset[i]`` is ``(image, target)``: ``uint8 [3, H, W]`` and a dict with

    ``boxes``     ``float32 [N, 4]`` x1, y1, x2, y2 in pixels
    ``labels``    ``int64 [N]`` network labels ``1..K``
    ``masks``     ``uint8 [N, H, W]`` (0 or 1)
    ``image_id``  ``int64`` scalar, the COCO image id
    ``area``, ``iscrowd``  ``[N]`` (``iscrowd`` is all zeros)

    ``transforms(image, target)`` runs on every sample (see ``model.training.augment``).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        transforms: Transform | None = None,
        annotation_file: str | os.PathLike | None = None,
    ):
        self.source = Path(source)
        self.transforms = transforms
        self._files = _Files(self.source)
        self._coco = _read_annotations(self._files, annotation_file)
        problems = validate_coco(self._coco, self._files)
        if problems:
            shown = "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            raise DatasetError(f"{self.source}: invalid COCO dataset: {shown}", problems)
        self.categories = sorted(
            ({"id": int(c["id"]), "name": str(c["name"])} for c in self._coco["categories"]),
            key=lambda c: c["id"],
        )
        self.label_to_category = [0, *(c["id"] for c in self.categories)]
        self.category_to_label = {cid: label for label, cid in enumerate(self.label_to_category)}
        self.images = list(self._coco["images"])
        self._annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self._coco["annotations"]:  # validated: each names one of the images
            self._annotations[ann["image_id"]].append(ann)

    @property
    def dataset_id(self) -> str:
        return self.source.name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        record = self.images[index]
        image = self.read_image(index)
        target = self.build_target(record, self._annotations[record["id"]])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def read_image(self, index: int) -> torch.Tensor:
        """The RGB image ``uint8 [3, H, W]``, checked against its recorded size."""
        record = self.images[index]
        try:
            with Image.open(io.BytesIO(self._files.read(record["file_name"]))) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, KeyError) as e:
            raise DatasetError(f"{record['file_name']}: cannot read the image ({e})") from e
        height, width = array.shape[:2]
        if (width, height) != (record["width"], record["height"]):
            raise DatasetError(
                f"{record['file_name']}: annotations say {record['width']}x{record['height']} "
                f"but the image is {width}x{height}"
            )
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def build_target(self, record: dict, annotations: list[dict]) -> dict[str, torch.Tensor]:
        height, width = record["height"], record["width"]
        boxes, labels, masks, areas = [], [], [], []
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            mask = decode_segmentation(ann["segmentation"], height, width)
            x, y, w, h = ann["bbox"]
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if not mask.any() or box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            boxes.append(box)
            labels.append(self.category_to_label[ann["category_id"]])
            masks.append(mask)
            areas.append(float(ann.get("area", mask.sum())))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks
            else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": torch.tensor(record["id"], dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }

    def subset(self, image_ids: Sequence[int], *, transforms: Transform | None = None):
        """The same source restricted to ``image_ids`` (for train/validation splits)."""
        view = object.__new__(CocoDataset)
        view.__dict__.update(self.__dict__)
        wanted = set(image_ids)
        view.images = [im for im in self.images if im["id"] in wanted]
        view._annotations = {im["id"]: self._annotations[im["id"]] for im in view.images}
        view.transforms = transforms
        return view

    def coco_dict(self) -> dict[str, Any]:
        """The COCO JSON of this dataset's images (crowds included), for COCOeval."""
        ids = {im["id"] for im in self.images}
        return {
            **{k: v for k, v in self._coco.items() if k not in ("images", "annotations")},
            "images": list(self.images),
            "annotations": [a for a in self._coco["annotations"] if a["image_id"] in ids],
        }


def split_dataset(
    dataset: CocoDataset, val_fraction: float, *, seed: int = 0
) -> tuple[CocoDataset, CocoDataset | None]:
    """Random image-level split; ``val_fraction`` 0 gives no validation set."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1); got {val_fraction}")
    ids = [im["id"] for im in dataset.images]
    count = round(len(ids) * val_fraction)
    if count == 0:
        return dataset, None
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = [ids[i] for i in order[:count]]
    train_ids = [ids[i] for i in order[count:]]
    return dataset.subset(train_ids, transforms=dataset.transforms), dataset.subset(val_ids)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE to a ``uint8 [H, W]`` mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


def _read_annotations(files: _Files, annotation_file: str | os.PathLike | None) -> dict[str, Any]:
    where = str(annotation_file) if annotation_file else f"{files.source}: {ANNOTATIONS_FILE}"
    try:
        if annotation_file:
            data = Path(annotation_file).read_bytes()
        else:
            data = files.read(ANNOTATIONS_FILE)
    except (OSError, KeyError) as e:
        raise DatasetError(f"{where}: cannot read it; expected a COCO annotations file") from e
    try:
        return load_coco(data)
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from None
