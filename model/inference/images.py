"""Image files and Pillow images to the predictor's uint8 ``[3, H, W]`` tensors."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import InvalidImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """EXIF-upright RGB uint8 ``[3, H, W]`` from any single-frame Pillow image.

    Grayscale, palette, RGBA/LA, CMYK and 16/32-bit modes become 8-bit RGB
    (high-bit-depth values are scaled, not clipped).

    Copies only what it must, since its peak memory is what a server budgets
    for each decoded pixel: an upright RGB image goes into the tensor a channel
    at a time (Pillow holds RGB at 4 bytes a pixel, the tensor 3, a channel
    being copied 1 more), a grayscale one is its plane three times, and only
    other modes and turned images are converted first.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.array(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        values /= top  # in place, as values / top * 255.0 + 0.5: one copy of the image
        values *= 255.0
        values += 0.5
        gray = np.clip(values, 0, 255, out=values).astype(np.uint8)
        return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
    if image.mode == "L":
        gray = torch.from_numpy(np.array(image))
        return gray.expand(3, *gray.shape).contiguous()
    if image.mode != "RGB":
        image = image.convert("RGB")
    tensor = torch.empty((3, image.height, image.width), dtype=torch.uint8)
    for channel, plane in enumerate(tensor.numpy()):
        plane[...] = np.asarray(image.getchannel(channel))
    return tensor


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file (JPEG, PNG, WebP, BMP) as an uint8 RGB ``[3, H, W]`` tensor."""
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"{path}: not a readable image ({e})") from e


def list_images(paths: list[str]) -> list[Path]:
    """Files as given, and the image files inside directories (sorted)."""
    found = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(
                sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            )
        else:
            found.append(entry)
    return found


def check_image(image: torch.Tensor) -> None:
    """``InvalidImageError`` unless ``image`` is a non-empty uint8 ``[3, H, W]``."""
    if not isinstance(image, torch.Tensor):
        raise InvalidImageError(f"expected an image tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise InvalidImageError(
            "expected a uint8 RGB image tensor of shape [3, H, W], "
            f"got dtype {image.dtype} and shape {list(image.shape)}"
        )
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise InvalidImageError(f"image is empty: shape {list(image.shape)}")


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (``[..., 3, H, W]``) to float in ``[0, 1]``, then normalised, in
    the order of operations of the ``network(image.float() / 255)`` reference."""
    # in place on the one float copy (``images`` is uint8): the same numbers
    return images.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)
