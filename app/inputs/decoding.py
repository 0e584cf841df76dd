"""Uploaded bytes to the predictor's uint8 RGB ``[3, H, W]`` tensors.

Only JPEG, PNG, WebP and BMP are decoded, recognised by their content, not their
name (415 otherwise); the pixel count is checked from the header before the full
decode (413); truncated or corrupt files are 400; EXIF orientation is applied and
every mode becomes 8-bit RGB (``model.inference.images.pil_to_tensor``). Decoding runs in
threads, never on the event loop.

For a model on a CUDA device (``device``), complete baseline RGB or grayscale
JPEGs (the usual upload) are decoded there by nvJPEG, with the EXIF orientation
applied on the device too, and the rest lands in pinned host memory, so the
batch's upload does not block the forward thread; anything nvJPEG refuses goes
through Pillow as above.

For a model in processes of its own on a GPU (``app.serving.modelprocess``), those JPEGs
are checked from their header here and left encoded (``EncodedJpeg``, with
``keep_jpeg``): only their bytes cross the pipe, and the model process decodes
them with ``decode_image`` on its device.
"""

import asyncio
import contextlib
import functools
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from app.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.inputs.pixels import RequestPixels
from model import pil_to_tensor

T = TypeVar("T")

ALLOWED = "JPEG, PNG, WebP or BMP"
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations whose upright image swaps width and height


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


@dataclass(frozen=True)
class EncodedJpeg:
    """An upload ``decode_image`` checked and left for the model process to decode:
    a complete RGB or grayscale JPEG within the pixel limit. ``shape`` is the
    ``[3, H, W]`` it decodes to (EXIF orientation applied), for the queue's size
    buckets."""

    data: bytes
    name: str
    shape: tuple[int, int, int]


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    name: str = "image",
    device: torch.device | None = None,
    keep_jpeg: bool = False,
    pixels: RequestPixels | None = None,
) -> torch.Tensor | EncodedJpeg:
    """Decode one image file; raises 400 / 413 / 415 ``AppError``s naming ``name``.

    ``device``: where the model runs; for CUDA the tensor is on that device or in
    pinned memory (see the module docstring), otherwise in ordinary memory.
    ``keep_jpeg``: an ``EncodedJpeg`` for what nvJPEG would decode."""
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
            if pixels is not None:  # the memory budget, before anything is decoded
                pixels.take(image.size[0] * image.size[1], name)
            if getattr(image, "n_frames", 1) > 1:
                raise BadRequestError(
                    f"{name}: animated or multi-frame images are not supported",
                    code="invalid_image",
                )
            if keep_jpeg and (orientation := nvjpeg_orientation(data, image)) is not None:
                height, width = image.size if orientation in TRANSPOSED else image.size[::-1]
                return EncodedJpeg(data, name, (3, height, width))
            on_cuda = device is not None and device.type == "cuda"
            if on_cuda and (decoded := decode_jpeg_on_device(data, image, device)) is not None:
                return decoded
            image.load()
            tensor = pil_to_tensor(image)
            return tensor.pin_memory() if on_cuda else tensor
    except Image.DecompressionBombError as e:  # past Pillow's own limit, far past ours
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message has the count
        pixels = f"is {found[1]} pixels" if found else f"has more than {max_pixels} pixels"
        raise PayloadTooLargeError(
            f"{name}: the image {pixels}; at most {max_pixels} allowed (MAX_IMAGE_PIXELS)",
            code="image_too_large",
        ) from None
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
            f"{name}: {width}x{height} is {width * height} pixels; at most {max_pixels} "
            "allowed (MAX_IMAGE_PIXELS)",
            code="image_too_large",
        )


def decode_jpeg_on_device(
    data: bytes, image: Image.Image, device: torch.device
) -> torch.Tensor | None:
    """nvJPEG decode of a complete (end marker present) RGB or grayscale JPEG that
    Pillow has opened but not decoded; ``None`` when it is not one, or nvJPEG
    refuses it (CMYK, unusual sampling, corrupt data), so Pillow decides."""
    orientation = nvjpeg_orientation(data, image)
    if orientation is None:
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # torchvision's nvJPEG decoder allocates its buffers on the calling thread's
    # current stream but writes them on a stream of its own, without waiting for
    # the first: it can be handed a block that work still queued on the first
    # reads, and overwrite it. Hence a decode stream per thread (and device), idle
    # whenever this thread allocates on it: on the model's default stream, decodes
    # corrupted whole batches (every image without proposals, then a 500); on one
    # decode stream shared by the threads, they corrupted each other's images (on
    # an H200 beside the model: 2 of 2,961 decodes wrong, 0 of 3,557 with a stream
    # per thread). ``raw`` is held until the stream is done, as the flip reads it.
    try:
        stream = decode_stream(device)
        with warnings.catch_warnings(), torch.cuda.stream(stream):
            warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its image I/O
            raw = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            decoded = apply_orientation(raw, orientation)
        stream.synchronize()
    except RuntimeError:
        # nvJPEG may have queued work into memory now free again: let it finish
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(device)
        return None
    del raw
    # the model reads images on its thread's default stream (app.serving.stages sets no
    # other): the block is not reused before the work queued there when it is freed
    decoded.record_stream(torch.cuda.default_stream(device))
    return decoded


def nvjpeg_orientation(data: bytes, image: Image.Image) -> int | None:
    """The EXIF orientation (1-8) of a complete RGB or grayscale JPEG, the kind
    nvJPEG is given, opened by Pillow but not decoded; ``None`` for anything else."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # truncated: Pillow's decoder says so with a 400
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


_decode_streams = threading.local()


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream this thread decodes JPEGs for ``device`` on (one per thread and
    GPU; the decoding threads are a pool's, so a few)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _decode_streams.__dict__.setdefault("by_device", {})
    if index not in streams:
        streams[index] = torch.cuda.Stream(torch.device(device.type, index))
    return streams[index]


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` turned upright for an EXIF orientation (1-8), on any device,
    as ``PIL.ImageOps.exif_transpose`` turns a Pillow image."""
    if orientation in TRANSPOSED:
        image = image.transpose(-2, -1)  # rows become columns
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips).contiguous() if flips else image.contiguous()


# Decoding has threads of its own: a stalled database or anything else that waits
# in threads cannot hold the ones images need.
_DECODERS = ThreadPoolExecutor(
    max(4, (os.cpu_count() or 1) + 2), thread_name_prefix="maskrcnn-decode"
)


async def in_decoder_threads(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_DECODERS, functools.partial(call, *args, **kwargs))


async def decode_images(
    blobs: Sequence[bytes],
    *,
    max_pixels: int,
    names: Sequence[str] | None = None,
    device: torch.device | None = None,
    keep_jpeg: bool = False,
    pixels: RequestPixels | None = None,
) -> list[torch.Tensor | EncodedJpeg]:
    """``decode_image`` for each blob, in threads; the first error wins."""
    names = names or [f"images[{i}]" for i in range(len(blobs))]
    options = {"max_pixels": max_pixels, "device": device, "keep_jpeg": keep_jpeg, "pixels": pixels}
    tasks = [
        in_decoder_threads(decode_image, blob, name=name, **options)
        for blob, name in zip(blobs, names, strict=True)
    ]
    return list(await asyncio.gather(*tasks))
