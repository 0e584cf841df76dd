"""Every check a COCO instances dataset must pass before anything trains on it.

``validate_coco`` lists problems instead of stopping at the first, so that one
upload tells a user everything to fix (up to ``max_problems``). What it guards
against, besides plain mistakes, is data that would make later code misbehave:

- ``file_name`` outside the dataset (``../../x``, absolute, backslashes);
- a declared size that is not the file's, or a pixel count that would exhaust
  memory when training decodes it (checked from the numbers, nothing decoded);
- geometry that pycocotools would rasterise at unbounded cost or read out of
  bounds: polygons with huge or far-away vertices, RLE counts that do not sum to
  the image's pixel count (``pycocotools.mask.decode`` does not check);
- ids that pycocotools silently overwrites (duplicate image/annotation ids).

With ``check_images`` each image's header is read (format by content: JPEG, PNG,
WebP or BMP; width and height); pixels are never decoded.
"""

import json
import math
import re
from typing import Any, BinaryIO, Protocol

from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
MAX_POLYGON_VERTICES = 10_000
MAX_ANNOTATION_VERTICES = 100_000
MAX_SIDE = 2**31 - 1  # Pillow's limit; larger sides would also overflow float arithmetic
BORDER = 1.0  # pixels a box or polygon may reach past the image edge (rounding)
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Files(Protocol):
    """The dataset's members by POSIX path relative to its root."""

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> BinaryIO: ...


class _Full(Exception):
    """Raised by ``_Problems.add`` once the limit is reached: stop looking."""


class _Problems:
    def __init__(self, limit: int | None):
        self.items: list[str] = []
        self.limit = limit

    def add(self, problem: str) -> None:
        self.items.append(problem)
        if self.limit is not None and len(self.items) >= self.limit:
            raise _Full


def unsafe_path_reason(name: str) -> str | None:
    """Why ``name`` is not a plain relative POSIX path inside a folder, or ``None``."""
    if not name:
        return "an empty path"
    if "\\" in name:
        return "a backslash in the path"
    if name.startswith("/"):
        return "an absolute path"
    if _DRIVE.match(name):
        return "a drive letter"
    if _CONTROL.search(name):
        return "a control character in the path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in the path"
    if "." in parts or "" in parts:
        return "an empty or '.' part in the path"
    if not _is_text(name):
        return "a lone surrogate (no Unicode text) in the path"
    if len(name.encode()) > 1024 or any(len(p.encode()) > 255 for p in parts):
        return "a path longer than 1024 bytes or a part longer than 255"
    return None


def _is_text(value: str) -> bool:
    """False for a string with a lone surrogate (JSON may spell one, ``"\\ud800"``):
    it has no UTF-8 form, so no file name, database row or JSON answer can hold it."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def load_coco(data: bytes) -> dict[str, Any]:
    """Parse an annotations file; ``ValueError`` says what is wrong with it.

    Strict JSON: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused.
    """

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        coco = json.loads(data, parse_constant=refuse)
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and refused constants
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(coco, dict) or not all(
        isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise ValueError("must be an object with lists 'images', 'annotations' and 'categories'")
    return coco


def validate_coco(
    coco: dict[str, Any],
    files: Files,
    *,
    check_images: bool = False,
    max_pixels: int | None = None,
    max_problems: int | None = 100,
) -> list[str]:
    """Every problem found in a COCO instances dict (empty when it is usable).

    ``coco`` has lists ``images``, ``annotations`` and ``categories`` (as
    ``load_coco`` returns). ``max_pixels`` caps each image's declared
    width × height; after ``max_problems`` the search stops, and the last entry
    says so.
    """
    problems = _Problems(max_problems)
    try:
        categories = _check_categories(coco["categories"], problems)
        sizes = _check_images(coco["images"], files, problems, check_images, max_pixels)
        _check_annotations(coco["annotations"], sizes, categories, problems)
    except _Full:
        problems.items.append(f"(stopped looking after {max_problems} problems)")
    return problems.items


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer no float can hold
        return False


def _check_categories(categories: list, problems: _Problems) -> set[int]:
    ids: set[int] = set()
    if not categories:
        problems.add("categories: expected at least one category")
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            problems.add(f"categories[{i}]: expected an object with an integer id")
        elif category["id"] in ids:
            problems.add(f"categories[{i}]: id {category['id']} is used twice")
        elif not isinstance(category.get("name"), str) or not category["name"].strip():
            problems.add(f"categories[{i}]: expected a non-empty name")
        elif not _is_text(category["name"]):
            problems.add(f"categories[{i}]: the name is no Unicode text (a lone surrogate)")
        else:
            ids.add(category["id"])
    return ids


def _check_images(
    images: list,
    files: Files,
    problems: _Problems,
    check_images: bool,
    max_pixels: int | None,
) -> dict[int, tuple[int, int]]:
    """``{image id: (width, height)}`` of the images whose record is usable."""
    sizes: dict[int, tuple[int, int]] = {}
    if not images:
        problems.add("images: expected at least one image")
    for i, image in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            problems.add(f"{where}: expected an object with an integer id")
            continue
        if image["id"] in sizes:
            problems.add(f"{where}: id {image['id']} is used twice")
            continue
        width, height = image.get("width"), image.get("height")
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            problems.add(f"{where}: width and height must be positive integers")
            continue
        if width > MAX_SIDE or height > MAX_SIDE:
            problems.add(f"{where}: width and height must be at most {MAX_SIDE}")
            continue
        sizes[image["id"]] = (width, height)
        if max_pixels is not None and width * height > max_pixels:
            problems.add(
                f"{where}: declares {width}x{height} = {width * height} pixels; "
                f"at most {max_pixels} are allowed"
            )
            continue
        name = image.get("file_name")
        reason = unsafe_path_reason(name) if isinstance(name, str) else "not a string"
        if reason:
            problems.add(f"{where}: file_name {name!r} is not a safe relative path ({reason})")
        elif not files.exists(name):
            problems.add(f"{where}: file_name {name!r} is not in the dataset")
        elif check_images:
            problem = _check_image_file(files, name, width, height)
            if problem:
                problems.add(f"{where}: {problem}")
    return sizes


def _check_image_file(files: Files, name: str, width: int, height: int) -> str | None:
    """Format and size from the header (Pillow reads no pixels in ``open``)."""
    try:
        with files.open(name) as stream, Image.open(stream, formats=IMAGE_FORMATS) as image:
            actual = image.size
    except UnidentifiedImageError:
        return f"{name} is not a JPEG, PNG, WebP or BMP image"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return f"{name}: cannot read the image header ({e})"
    if actual != (width, height):
        return f"{name}: declared {width}x{height} but the file is {actual[0]}x{actual[1]}"
    return None


def _check_annotations(
    annotations: list, sizes: dict[int, tuple[int, int]], categories: set[int], problems: _Problems
) -> None:
    ids: set[int] = set()
    for i, ann in enumerate(annotations):
        problem = check_annotation(ann, sizes, categories)
        if problem is None and ann["id"] in ids:
            problem = f"id {ann['id']} is used twice"
        if isinstance(ann, dict) and _is_int(ann.get("id")):
            ids.add(ann["id"])
        if problem:
            problems.add(f"annotations[{i}]: {problem}")


def check_annotation(
    ann: Any, sizes: dict[int, tuple[int, int]], categories: set[int]
) -> str | None:
    """The first problem with one annotation, or ``None``."""
    if not isinstance(ann, dict):
        return "expected an object"
    if not _is_int(ann.get("id")):
        return "expected an integer id"
    # _is_int first: a list or object id is unhashable, so no key of either
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in sizes:
        return f"image_id {ann.get('image_id')!r} names no image"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
        return f"category_id {ann.get('category_id')!r} names no category"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd must be 0 or 1; got {ann.get('iscrowd')!r}"
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        return f"area must be a number ≥ 0; got {ann['area']!r}"
    width, height = sizes[ann["image_id"]]
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return "bbox must be [x, y, width, height] (finite numbers)"
    x, y, w, h = bbox
    if (
        w < 0
        or h < 0
        or x < -BORDER
        or y < -BORDER
        or x + w > width + BORDER
        or (y + h > height + BORDER)
    ):
        return f"bbox {bbox} is not inside the {width}x{height} image"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        return _check_polygons(segmentation, width, height)
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, width, height)
    return "segmentation must be polygons or RLE"


def _check_polygons(polygons: list, width: int, height: int) -> str | None:
    if not polygons:
        return "segmentation has no polygon"
    total = 0
    for k, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return f"polygon {k} must be a list of at least 3 x, y pairs"
        vertices = len(polygon) // 2
        total += vertices
        if vertices > MAX_POLYGON_VERTICES:
            return f"polygon {k} has {vertices} vertices; at most {MAX_POLYGON_VERTICES}"
        if total > MAX_ANNOTATION_VERTICES:
            return f"polygons have more than {MAX_ANNOTATION_VERTICES} vertices in all"
        if not all(map(_is_number, polygon)):
            return f"polygon {k} must hold finite numbers"
        if not (_within(polygon[0::2], width) and _within(polygon[1::2], height)):
            return f"polygon {k} reaches outside the {width}x{height} image"
    return None


def _within(values: list, limit: int) -> bool:
    return min(values) >= -BORDER and max(values) <= limit + BORDER


def _check_rle(rle: dict, width: int, height: int) -> str | None:
    size = rle.get("size")
    if not (isinstance(size, list) and all(map(_is_int, size)) and size == [height, width]):
        return f"RLE size must be [{height}, {width}] (the image's [height, width])"
    counts = rle.get("counts")
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "uncompressed RLE counts must be integers ≥ 0"
        total = sum(counts)
    elif isinstance(counts, str):
        total = _compressed_total(counts)
        if total is None:
            return "compressed RLE counts are not a valid COCO RLE string"
    else:
        return "RLE counts must be a list of integers or a COCO RLE string"
    if total != width * height:
        return f"RLE counts cover {total} pixels; the {width}x{height} image has {width * height}"
    return None


def _compressed_total(text: str) -> int | None:
    """The pixels covered by a compressed RLE string, decoded as pycocotools'
    ``rleFrString`` does; ``None`` for a string it would misread (a character
    out of range, a truncated number, a negative run)."""
    runs: list[int] = []
    value = shift = 0
    for char in text:
        code = ord(char) - 48
        if not 0 <= code < 64 or shift > 55:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        if not 0 <= value < 1 << 32:  # pycocotools keeps runs as uint32
            return None
        runs.append(value)
        value = shift = 0
    if shift:
        return None
    return sum(runs)
