"""The visualize PNG: labels sized to the image, on a contrasting tag, inside
the image and never on top of each other; one colour per class; and with
``mask_format=none`` boxes and labels only."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from app.api.visualize import (
    Rect,
    class_colour,
    label_size_px,
    luminance,
    place_labels,
    render_png,
    text_colour,
)
from model import Detection
from model.training.synthetic import generate_dataset
from tests.app.conftest import png_bytes, running_server


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG contrast ratio of two sRGB colours."""
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_labels_are_sized_to_the_image():
    assert [
        label_size_px(h, w) for h, w in [(100, 80), (640, 640), (1080, 1920), (6000, 4000)]
    ] == [
        12,
        16,
        27,
        48,
    ]


def test_label_text_contrasts_with_its_tag_for_every_class():
    for class_id in range(1, 91):
        tag = class_colour(class_id)
        assert contrast(tag, text_colour(tag)) >= 4.5, class_id  # WCAG AA for text


def test_crowded_labels_neither_overlap_nor_leave_the_image():
    rng = np.random.default_rng(0)
    width, height = 320, 240
    boxes = [(float(x), float(y), x + 30.0, y + 30.0) for x, y in rng.integers(0, 300, (25, 2))]
    boxes += [(310.0, 235.0, 320.0, 240.0), (-5.0, -5.0, 10.0, 10.0)]  # at the edges
    sizes = [(int(w), 16) for w in rng.integers(40, 90, len(boxes))]
    rects = place_labels(boxes, sizes, (width, height))
    for i, rect in enumerate(rects):
        assert rect.x0 >= 0 and rect.x1 <= width and rect.y0 >= 0 and rect.y1 <= height, rect
        assert (rect.x1 - rect.x0, rect.y1 - rect.y0) == sizes[i]
        assert not any(rect.overlaps(other) for other in rects[:i]), (i, rect)


def test_a_label_goes_above_its_box_and_inside_when_there_is_no_room():
    [above, inside] = place_labels(
        [(50.0, 40.0, 90.0, 90.0), (150.0, 5.0, 190.0, 50.0)], [(60, 16), (60, 16)], (320, 240)
    )
    assert above == Rect(50, 24, 110, 40)
    assert inside == Rect(150, 5, 210, 21)


def one_detection(height: int, width: int, class_id: int = 3) -> tuple[torch.Tensor, list]:
    image = torch.full((3, height, width), 128, dtype=torch.uint8)
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    y0, x0 = height // 3, width // 3
    mask[y0 : 2 * y0, x0 : 2 * x0] = 1
    rle = mask_utils.encode(mask)
    box = (float(x0), float(y0), float(2 * x0), float(2 * y0))
    rle_dict = {"size": [height, width], "counts": rle["counts"].decode()}
    return image, [Detection(class_id, "thing", 0.9, box, rle_dict)]


@pytest.mark.parametrize(("height", "width"), [(640, 640), (1080, 1920)])
def test_the_drawn_tag_is_as_tall_as_the_image_size_asks(height, width):
    image, detections = one_detection(height, width)
    drawn = np.asarray(Image.open(io.BytesIO(render_png(image, detections))).convert("RGB"))
    top = int(detections[0].box[1])  # the tag sits above the box: look there only
    tag = np.all(drawn[:top] == class_colour(3), axis=2)  # its fill, the class colour
    rows = np.flatnonzero(tag.any(axis=1))
    assert rows.size and rows[-1] == top - 2  # just above the box, inside its outline
    size = label_size_px(height, width)
    assert size <= rows[-1] - rows[0] + 3 <= 2 * size


@pytest.fixture(scope="module")
def shapes_png(tmp_path_factory) -> bytes:
    """A synthetic shapes image: the demo model finds its shapes, with real masks."""
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, num_images=1, image_size=256, seed=3)
    (path,) = (root / "images").iterdir()
    return png_bytes(np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.slow
def test_mask_format_none_draws_boxes_and_labels_only(shapes_png, tmp_path):
    with running_server("demo", tmp_path) as server:
        server.wait_ready()
        files = [("images", ("shapes.png", shapes_png, "image/png"))]
        detections = server.client.post("/v1/segment", files=files).json()["results"][0]
        masks = [mask_utils.decode(d["mask"]).astype(bool) for d in detections["detections"]]
        covered = np.logical_or.reduce(masks)
        drawn = {}
        for fmt in ("rle", "none"):
            files = {"image": ("shapes.png", shapes_png, "image/png")}
            response = server.client.post(
                "/v1/segment/visualize", files=files, data={"mask_format": fmt}
            )
            assert response.status_code == 200
            drawn[fmt] = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    differ = np.any(drawn["rle"] != drawn["none"], axis=2)  # boxes and labels are alike
    assert covered.sum() > 1000 and differ[covered].mean() > 0.5  # the masks' tint, rle only
    assert not differ[~covered].any()  # nothing else
