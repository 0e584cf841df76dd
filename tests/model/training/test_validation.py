"""COCO validation: the RLE string reader against pycocotools, geometry that would
make rasterising unbounded, strict JSON, image headers, and the problem limit."""

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils

from model.errors import DatasetError
from model.training.dataset import CocoDataset, _Files
from model.training.validation import (
    _compressed_total,
    check_annotation,
    load_coco,
    unsafe_path_reason,
    validate_coco,
)
from tests.model.training.tiny_coco import H, W, default_annotations, write_dataset

SIZES = {10: (W, H)}
CATEGORIES = {3, 7}


def annotation(**changes):
    return {**default_annotations()[0], **changes}


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.integers(0, 1))
)
def test_compressed_rle_total_matches_pycocotools(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert _compressed_total(rle["counts"].decode()) == mask.size
    assert mask_utils.area(rle) == mask.sum()


@pytest.mark.parametrize(
    "counts",
    [
        "0" + chr(47),  # below pycocotools' alphabet
        "0" + chr(112),  # above it
        "0b",  # 'b' has the continuation bit: a truncated number
        "0P",  # sign bit: a negative run
    ],
)
def test_malformed_rle_strings_are_refused(counts):
    assert _compressed_total(counts) is None
    problem = check_annotation(
        annotation(segmentation={"size": [H, W], "counts": counts}), SIZES, CATEGORIES
    )
    assert problem == "compressed RLE counts are not a valid COCO RLE string"


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ([[5, 5, 25, 5, 25]], "polygon 0 must be a list of at least 3 x, y pairs"),
        ([[5, 5, 25, 5, 25, 20, 5]], "polygon 0 must be a list of at least 3 x, y pairs"),
        ([], "segmentation has no polygon"),
        ([[5, 5, 25, 5, 1e9, 20]], "polygon 0 reaches outside the 60x40 image"),
        ([[5, 5, 25, 5, 25, -3]], "polygon 0 reaches outside the 60x40 image"),
        ([[5, 5, 25, 5, 25, float("nan")]], "polygon 0 must hold finite numbers"),
        ([[5, 5, 25, 5, 25, True]], "polygon 0 must hold finite numbers"),
        ([[1, 1] * 10_001], "polygon 0 has 10001 vertices; at most 10000"),
        ([[1, 1] * 10_000] * 11, "polygons have more than 100000 vertices in all"),
        ({"size": [W, H], "counts": [W * H]}, "RLE size must be [40, 60]"),
        ({"size": [40.0, 60.0], "counts": [W * H]}, "RLE size must be [40, 60]"),
        ({"size": [H, W], "counts": [W * H + 1]}, "RLE counts cover 2401 pixels"),
        (
            {"size": [H, W], "counts": [-1, W * H + 1]},
            "uncompressed RLE counts must be integers ≥ 0",
        ),
        ({"size": [H, W], "counts": 5}, "RLE counts must be a list of integers or a COCO"),
        ("polygon", "segmentation must be polygons or RLE"),
    ],
)
def test_geometry_problems(segmentation, problem):
    found = check_annotation(annotation(segmentation=segmentation), SIZES, CATEGORIES)
    assert found is not None and found.startswith(problem), found


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"id": "1"}, "expected an integer id"),
        ({"bbox": [5, 5, 20, float("inf")]}, "bbox must be [x, y, width, height]"),
        ({"bbox": [5, 5, -1, 15]}, "bbox [5, 5, -1, 15] is not inside"),
        ({"iscrowd": 2}, "iscrowd must be 0 or 1"),
        ({"area": -5}, "area must be a number ≥ 0"),
        ({"image_id": 11}, "image_id 11 names no image"),
    ],
)
def test_annotation_fields(changes, problem):
    assert check_annotation(annotation(**changes), SIZES, CATEGORIES).startswith(problem)
    assert check_annotation(annotation(), SIZES, CATEGORIES) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("images/a.png", None),
        ("../../x", "'..' in the path"),
        ("/etc/passwd", "an absolute path"),
        ("C:/x.png", "a drive letter"),
        ("images\\a.png", "a backslash in the path"),
        ("images/./a.png", "an empty or '.' part in the path"),
        ("", "an empty path"),
        ("images/\ud800.png", "a lone surrogate (no Unicode text) in the path"),  # JSON "\ud800"
    ],
)
def test_unsafe_paths(name, reason):
    assert unsafe_path_reason(name) == reason


def test_json_must_be_strict_and_shaped():
    assert load_coco(b'{"images": [], "annotations": [], "categories": []}')["images"] == []
    with pytest.raises(ValueError, match="Infinity is not a JSON number"):
        load_coco(b'{"images": [Infinity], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match=r"not UTF-8|not valid JSON"):
        load_coco(b"\xff\xfe")
    with pytest.raises(ValueError, match="lists 'images', 'annotations' and 'categories'"):
        load_coco(b'{"images": {}}')


def test_deeply_nested_json_is_refused_not_crashed_on():
    """Python's parser recurses: nesting deeper than its limit is a RecursionError."""
    with pytest.raises(ValueError, match=r"not valid JSON \(nested too deeply\)"):
        load_coco(b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


ODD_VALUES = (None, True, "10", "\udc00", 1.5, -1, [], [10], {}, {"id": 10}, 10**400, -(10**400))


def value_paths(node, path=()):
    """Every key or index under ``node`` (the first two items of each list)."""
    items = node.items() if isinstance(node, dict) else enumerate(node[:2])
    for key, value in items:
        yield (*path, key)
        if isinstance(value, dict | list):
            yield from value_paths(value, (*path, key))


def test_any_json_value_anywhere_gives_problems_never_an_exception(tmp_path):
    """Unhashable ids (``[10]``), integers too large for a float (``10**400``)...
    each is a listed problem: ``validate_coco`` itself must never raise."""
    coco = write_dataset(tmp_path / "ds")
    files = _Files(tmp_path / "ds")
    for path in value_paths(coco):
        if len(path) == 1:
            continue  # the three lists themselves: load_coco's check
        for value in ODD_VALUES:
            changed = copy.deepcopy(coco)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
            try:
                problems = validate_coco(changed, files, check_images=True, max_pixels=10**6)
            except Exception as e:
                raise AssertionError(f"{path} = {value!r}: {e!r}") from e
            assert all(isinstance(p, str) for p in problems), (path, value)


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        (("annotations", 0, "image_id"), [10], "annotations[0]: image_id [10] names no image"),
        (("annotations", 0, "category_id"), {}, "annotations[0]: category_id {} names no categ"),
        (("annotations", 0, "image_id"), True, "annotations[0]: image_id True names no image"),
        (("annotations", 0, "area"), 10**400, "annotations[0]: area must be a number ≥ 0"),
        (("annotations", 0, "bbox", 2), 10**400, "annotations[0]: bbox must be [x, y, width, "),
        (("annotations", 0, "segmentation", 0, 0), -(10**400), "annotations[0]: polygon 0 must"),
        (("images", 0, "width"), 10**400, "images[0]: width and height must be at most "),
        (("categories", 0, "name"), "s\ud800", "categories[0]: the name is no Unicode text"),
    ],
)
def test_odd_values_are_named_in_the_problem(tmp_path, where, value, problem):
    coco = write_dataset(tmp_path / "ds")
    parent = coco
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    problems = validate_coco(coco, _Files(tmp_path / "ds"))
    assert any(p.startswith(problem) for p in problems), problems


def test_image_headers_are_checked_only_when_asked(tmp_path):
    coco = write_dataset(tmp_path / "ds")
    Image.new("RGB", (W + 1, H), 0).save(tmp_path / "ds" / "images" / "1.png")
    (tmp_path / "ds" / "images" / "0.png").write_bytes(b"GIF89a" + bytes(100))
    files = _Files(tmp_path / "ds")
    assert validate_coco(coco, files) == []
    assert validate_coco(coco, files, check_images=True) == [
        "images[0]: images/0.png is not a JPEG, PNG, WebP or BMP image",
        "images[1]: images/1.png: declared 60x40 but the file is 61x40",
    ]


def test_schema_problems_and_the_limit(tmp_path):
    coco = write_dataset(tmp_path / "ds")
    coco["categories"] += [{"id": 3, "name": "again"}, {"id": 4, "name": " "}, {"id": True}]
    coco["images"] += [dict(coco["images"][0]), {"id": 12, "width": 0, "height": 5}]
    coco["images"].append({"id": 13, "file_name": "images/0.png", "width": 10**5, "height": 10**5})
    files = _Files(tmp_path / "ds")
    assert validate_coco(coco, files, max_pixels=10**6) == [
        "categories[2]: id 3 is used twice",
        "categories[3]: expected a non-empty name",
        "categories[4]: expected an object with an integer id",
        "images[2]: id 10 is used twice",
        "images[3]: width and height must be positive integers",
        "images[4]: declares 100000x100000 = 10000000000 pixels; at most 1000000 are allowed",
    ]
    limited = validate_coco(coco, files, max_pixels=10**6, max_problems=2)
    assert limited[2] == "(stopped looking after 2 problems)" and len(limited) == 3
    empty = {"images": [], "annotations": [], "categories": []}
    assert validate_coco(empty, files) == [
        "categories: expected at least one category",
        "images: expected at least one image",
    ]


def test_dataset_refuses_non_finite_json(tmp_path):
    write_dataset(tmp_path / "ds")
    path = tmp_path / "ds" / "annotations.json"
    path.write_text(path.read_text().replace('"area": 300', '"area": NaN'))
    with pytest.raises(DatasetError, match="NaN is not a JSON number"):
        CocoDataset(tmp_path / "ds")
    json.loads(path.read_text())  # which Python's own parser would have accepted
