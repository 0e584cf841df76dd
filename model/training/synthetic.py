"""A synthetic instance-segmentation dataset in COCO format: textured shapes.

Each image has a textured background (noise, gradients, stripes, checks, blotches)
and 1..``max_objects`` shapes of five classes (``SHAPE_CLASSES``) with random
size, rotation, colour and fill texture. Later shapes may occlude earlier ones;
an annotation's mask is what stays visible, and a placement that would leave an
earlier shape less than ``min_visible`` visible is retried elsewhere.

Image ``i`` depends only on ``(seed, i)``, so two datasets with different seeds
share no image and a dataset's first images do not depend on its length.
"""

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPE_CLASSES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "square"},
    {"id": 3, "name": "triangle"},
    {"id": 4, "name": "star"},
    {"id": 5, "name": "ellipse"},
)


@dataclass(frozen=True)
class SyntheticConfig:
    """What ``generate_dataset`` draws; recorded in the JSON's ``info``."""

    num_images: int = 100
    image_size: int = 256
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 6
    min_radius: float = 0.05  # fractions of the image size
    max_radius: float = 0.2
    min_visible: float = 0.6
    jpeg_quality: int = 92


def generate_dataset(out: str | Path, **config: Any) -> dict[str, Any]:
    """Write a dataset to ``out`` and return its COCO dict.

    ``out`` is a directory (``annotations.json`` at its root and ``images/*.jpg``)
    or, when it ends in ``.zip``, one zip with the same layout. ``config`` holds
    the fields of ``SyntheticConfig``.
    """
    cfg = SyntheticConfig(**config)
    out = Path(out)
    coco: dict[str, Any] = {
        "info": {"description": "maskrcnn-service synthetic shapes", **asdict(cfg)},
        "images": [],
        "annotations": [],
        "categories": [dict(c, supercategory="shape") for c in SHAPE_CLASSES],
    }
    files: dict[str, bytes] = {}
    for index in range(cfg.num_images):
        image, annotations = render_image(cfg, index)
        name = f"images/{index:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        files[name] = buffer.getvalue()
        image_id = index + 1
        coco["images"].append(
            {"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size}
        )
        for ann in annotations:
            ann.update(id=len(coco["annotations"]) + 1, image_id=image_id)
            coco["annotations"].append(ann)
    files["annotations.json"] = json.dumps(coco).encode()
    _write_files(out, files)
    return coco


def _write_files(out: Path, files: dict[str, bytes]) -> None:
    if out.suffix == ".zip":
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def render_scenes(count: int, image_size: int, seed: int) -> list[torch.Tensor]:
    """``count`` scenes as the predictor takes images: uint8 ``[3, S, S]``."""
    config = SyntheticConfig(image_size=image_size, seed=seed)
    arrays = (render_image(config, index)[0] for index in range(count))
    return [torch.from_numpy(array).permute(2, 0, 1).contiguous() for array in arrays]


def render_image(cfg: SyntheticConfig, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Image ``index`` as ``uint8 [S, S, 3]`` and its annotations (without ids)."""
    rng = np.random.default_rng([cfg.seed, index])
    size = cfg.image_size
    canvas = random_texture(rng, size, _random_colour(rng), _random_colour(rng))
    shapes: list[tuple[int, np.ndarray, np.ndarray]] = []  # (class, full, visible)
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        placed = _place_shape(rng, cfg, shapes)
        if placed is None:
            continue
        category, full = placed
        for _, _, visible in shapes:
            visible &= ~full
        colour = _contrasting_colour(rng, canvas[full].mean(axis=0))
        fill = random_texture(rng, size, colour, _shade(rng, colour), plain_bias=0.4)
        canvas[full] = fill[full]
        shapes.append((category, full, full.copy()))
    canvas += rng.normal(0, rng.uniform(0, 0.04), canvas.shape)
    image = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return image, [_annotation(category, visible) for category, _, visible in shapes]


def _place_shape(
    rng: np.random.Generator, cfg: SyntheticConfig, shapes: list
) -> tuple[int, np.ndarray] | None:
    size = cfg.image_size
    for _ in range(20):
        category = int(rng.integers(len(SHAPE_CLASSES)))
        radius = size * rng.uniform(cfg.min_radius, cfg.max_radius)
        centre = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
        mask = rasterize(
            draw_outline(SHAPE_CLASSES[category]["name"], centre, radius, rng), size
        )
        if mask.sum() < 0.5 * math.pi * (size * cfg.min_radius) ** 2:
            continue
        if all(
            (visible & ~mask).sum() >= cfg.min_visible * full.sum() for _, full, visible in shapes
        ):
            return SHAPE_CLASSES[category]["id"], mask
    return None


def draw_outline(
    name: str, centre: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Polygon ``[K, 2]`` (x, y) of a shape inscribed in a circle of ``radius``."""
    angle = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        points = _regular(64, 0.0)
    elif name == "ellipse":
        points = _regular(64, 0.0) * [1.0, rng.uniform(0.35, 0.65)]
    elif name == "square":
        points = _regular(4, math.pi / 4)
    elif name == "triangle":
        points = _regular(3, math.pi / 2)
    elif name == "star":
        outer, inner = _regular(5, math.pi / 2), _regular(5, math.pi / 2 + math.pi / 5)
        inner *= rng.uniform(0.38, 0.5)
        points = np.stack([outer, inner], axis=1).reshape(-1, 2)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of circle, ellipse, ...")
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return centre + radius * points @ rotation.T


def _regular(count: int, phase: float) -> np.ndarray:
    t = phase + np.arange(count) * 2 * math.pi / count
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def rasterize(polygon: np.ndarray, size: int) -> np.ndarray:
    image = Image.new("1", (size, size), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in polygon.tolist()], fill=1)
    return np.array(image, dtype=bool)


def random_texture(
    rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, plain_bias: float = 0.0
) -> np.ndarray:
    """``float [S, S, 3]`` in 0..1 mixing colours ``a`` and ``b`` by a random pattern."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = "plain" if rng.random() < plain_bias else rng.choice(
        ["plain", "gradient", "stripes", "checks", "blotches"]
    )
    if kind == "plain":
        weight = np.zeros((size, size))
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        weight = (xx * math.cos(theta) + yy * math.sin(theta)) % 1.0
    elif kind == "stripes":
        theta, freq = rng.uniform(0, math.pi), rng.uniform(4, 24)
        phase = 2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta))
        weight = 0.5 + 0.5 * np.sin(phase)
    elif kind == "checks":
        cells = rng.integers(4, 24)
        weight = ((xx * cells).astype(int) + (yy * cells).astype(int)) % 2.0
    else:
        low = rng.random((int(rng.integers(3, 12)),) * 2).astype(np.float32)
        weight = np.array(Image.fromarray(low, mode="F").resize((size, size), Image.BILINEAR))
    weight = weight[..., None]
    texture = a * (1 - weight) + b * weight
    return texture + rng.normal(0, rng.uniform(0, 0.05), texture.shape)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3)


def _shade(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    return np.clip(colour + rng.uniform(-0.25, 0.25, 3), 0, 1)


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A colour at least 0.35 (RGB distance) from what the shape covers."""
    for _ in range(50):
        colour = rng.random(3)
        if np.linalg.norm(colour - behind) >= 0.35:
            return colour
    return 1.0 - np.clip(behind, 0, 1)


def _annotation(category: int, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "category_id": category,
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m model.training.synthetic OUT [--num-images N] [--image-size S] [--seed K]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model.training.synthetic", description=__doc__)
    parser.add_argument("out", help="output directory, or a path ending in .zip")
    for name, default in asdict(SyntheticConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    coco = generate_dataset(out, **args)
    print(f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")


if __name__ == "__main__":
    main()
