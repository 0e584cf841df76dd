"""Uploaded bytes to the predictor's uint8 RGB ``[3, H, W]`` tensors.

Only JPEG, PNG, WebP and BMP are decoded, recognised by their content, not their
name (415 otherwise); the pixel count is checked from the header before the full
decode (413); truncated or corrupt files are 400; EXIF orientation is applied and
every mode becomes 8-bit RGB (``model.images.pil_to_tensor``). Decoding runs in
worker threads, never on the event loop.
"""

import asyncio
import io
import warnings
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from app.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from model.images import pil_to_tensor

PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
ALLOWED = "JPEG, PNG, WebP or BMP"


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` starts like, or ``None``."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Decode one image file; raises 400 / 413 / 415 ``AppError``s naming ``name``."""
    if not data:
        raise BadRequestError(f"{name}: empty file", code="invalid_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaTypeError(f"{name}: not a {ALLOWED} image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=(fmt,))
        with image:
            check_pixels(image.size, max_pixels, name)
            if getattr(image, "n_frames", 1) > 1:
                raise BadRequestError(
                    f"{name}: animated or multi-frame images are not supported",
                    code="invalid_image",
                )
            image.load()
            return pil_to_tensor(image)
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError(f"{name}: {e}", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadRequestError(
            f"{name}: corrupt or truncated {fmt} file ({e})", code="invalid_image"
        ) from None


def check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadRequestError(
            f"{name}: image has no pixels ({width}x{height})", code="invalid_image"
        )
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"{name}: {width}x{height} is {width * height} pixels; at most {max_pixels} allowed",
            code="image_too_large",
        )


async def decode_images(
    blobs: Sequence[bytes], *, max_pixels: int, names: Sequence[str] | None = None
) -> list[torch.Tensor]:
    """``decode_image`` for each blob, in worker threads; the first error wins."""
    names = names or [f"images[{i}]" for i in range(len(blobs))]
    tasks = [
        asyncio.to_thread(decode_image, blob, max_pixels=max_pixels, name=name)
        for blob, name in zip(blobs, names, strict=True)
    ]
    return list(await asyncio.gather(*tasks))
