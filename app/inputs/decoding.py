"""Uploaded bytes to the predictor's uint8 RGB ``[3, H, W]`` tensors.

Only JPEG, PNG, WebP and BMP are decoded, recognised by their content, not their
name (415 otherwise); truncated or corrupt files are 400; EXIF orientation is
applied and every mode becomes 8-bit RGB (``model.inference.images.pil_to_tensor``).

A request's images are probed first (``probe_image``: format, size, mode and
orientation from the headers, 413 past ``MAX_IMAGE_PIXELS``), in threads of their
own, and their memory is reserved from what they will cost
(``Probe.decoding_bytes``, ``Probe.decoded_bytes``; ``app.inputs.memory``) before
any of them is decoded (``decode_image``), in the decoding threads. The first
image that fails cancels those not yet started. Nothing runs on the event loop.
A JPEG larger than the model's input is decoded reduced by libjpeg (``reduction``),
its results still given in the file's frame (``Decoded.size``).

For a model on a CUDA device (``device``), complete baseline RGB or grayscale
JPEGs (the usual upload) are decoded there by nvJPEG (``app.inputs.nvjpeg``), with
the EXIF orientation applied on the device too, and the rest lands in pinned host
memory, so the batch's upload does not block the forward thread; anything nvJPEG
refuses goes through Pillow as above.

For a model in processes of its own on a GPU (``app.serving.modelprocess``), those JPEGs
are checked from their header here and left encoded (``EncodedJpeg``, with
``keep_jpeg``): only their bytes cross the pipe, and the model process decodes
them with ``decode_image`` on its device.
"""

import asyncio
import contextlib
import dataclasses
import functools
import io
import os
import re
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from app.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.inputs.memory import RequestMemory
from app.inputs.nvjpeg import (
    EXIF_ORIENTATION,
    TRANSPOSED,
    decode_jpeg_on_device,
    nvjpeg_orientation,
)
from model import InputGeometry, pil_to_tensor

T = TypeVar("T")

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


@dataclass(frozen=True)
class EncodedJpeg:
    """An upload ``decode_image`` checked and left for the model process to decode:
    a complete RGB or grayscale JPEG within the pixel limit. ``shape`` is the
    ``[3, H, W]`` it decodes to (EXIF orientation applied), for the queue's size
    buckets."""

    data: bytes
    name: str
    shape: tuple[int, int, int]


# What decoding costs, in bytes a pixel, measured (peak resident memory over the
# process's before, 6000x6000 images; bench/decode_memory.py): Pillow's image (RGB
# at 4 bytes a pixel), the uint8 tensor it becomes (3) and the channel being
# copied (2 with its view); other modes are converted to RGB first, 16-bit and
# float ones through float64; an EXIF turn copies the image once more, pinning
# the tensor for a GPU once more too.
DECODED_BYTES = 3  # the [3, H, W] uint8 tensor the request holds until it ends
DECODING_BYTES = {"RGB": 9, "L": 5}
OTHER_MODE_BYTES = 13  # P, RGBA, LA, CMYK, 1, ...
HIGH_BIT_DEPTH_BYTES = 16  # I, I;16*, F
HIGH_BIT_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
TURN_BYTES = 4
PIN_BYTES = 3


@dataclass(frozen=True)
class Probe:
    """What an image's headers say, read without decoding it. ``scale``: the
    JPEG is decoded reduced by it (1, 2, 4 or 8; ``reduction``)."""

    name: str
    format: str
    width: int  # as stored, before the EXIF turn
    height: int
    mode: str
    orientation: int  # EXIF, 1-8
    scale: int = 1

    @property
    def pixels(self) -> int:
        """The file's, which the limits count."""
        return self.width * self.height

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the file, upright: the frame of its results."""
        turned = self.orientation in TRANSPOSED
        return (self.width, self.height) if turned else (self.height, self.width)

    @property
    def decoded_pixels(self) -> int:
        return -(-self.width // self.scale) * -(-self.height // self.scale)

    def decoding_bytes(self, *, pinned: bool = False) -> int:
        """Peak memory while it is decoded (its tensor included)."""
        if self.mode in HIGH_BIT_DEPTH:
            per_pixel = HIGH_BIT_DEPTH_BYTES
        else:
            per_pixel = DECODING_BYTES.get(self.mode, OTHER_MODE_BYTES)
        per_pixel += TURN_BYTES if self.orientation > 1 else 0
        per_pixel += PIN_BYTES if pinned else 0
        return self.decoded_pixels * per_pixel

    @property
    def decoded_bytes(self) -> int:
        """What it holds once decoded, until its request ends."""
        return self.decoded_pixels * DECODED_BYTES


@dataclass(frozen=True)
class Decoded:
    """A decoded image; ``size``: its file's ``(height, width)``, upright, when it
    was decoded smaller (the frame its boxes and masks are given in)."""

    image: torch.Tensor | EncodedJpeg
    size: tuple[int, int] | None = None


def probe_image(
    data: bytes, *, max_pixels: int, name: str = "image", reduce_for: InputGeometry | None = None
) -> Probe:
    """The headers of one image file; raises 400 / 413 / 415 ``AppError``s naming
    ``name`` for an empty, unknown, oversized, animated or unreadable one.
    ``reduce_for``: the geometry of the model the image is for (see ``reduction``)."""
    with open_image(data, max_pixels, name) as image:
        orientation = 1
        # Pillow reads a PNG's eXIf chunk that follows the pixels by decoding them
        if image.format != "PNG" or "exif" in image.info:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        probe = Probe(
            name=name,
            format=image.format or "",
            width=image.size[0],
            height=image.size[1],
            mode=image.mode,
            orientation=orientation if orientation in range(1, 9) else 1,
        )
        return dataclasses.replace(probe, scale=reduction(probe, reduce_for)[0])


def reduction(probe: Probe, geometry: InputGeometry | None) -> tuple[int, tuple[int, int]]:
    """The factor a JPEG larger than the model's input is decoded reduced by (1,
    2, 4 or 8: libjpeg scales while decoding, for a fraction of the time and
    memory), and the stored ``(width, height)`` to ask Pillow's ``draft`` for: the
    largest reduction that leaves it at least the size the network resizes it to,
    so the network still only ever shrinks it. 1 for other formats, models of one
    fixed input size, and images no larger than their resized size."""
    if probe.format != "JPEG" or geometry is None or geometry.fixed:
        return 1, (probe.width, probe.height)
    height, width = geometry.resized(*probe.size)
    if probe.orientation in TRANSPOSED:
        height, width = width, height  # as stored
    ratio = min(probe.width // max(1, width), probe.height // max(1, height))
    scale = next((s for s in (8, 4, 2) if ratio >= s), 1)  # Pillow's choice for that size
    return scale, (probe.width // scale, probe.height // scale)


@contextlib.contextmanager
def open_image(data: bytes, max_pixels: int, name: str) -> Iterator[Image.Image]:
    """The image Pillow opens from ``data``, its size checked and nothing decoded;
    Pillow's errors, there or in the block, as 400 / 413 / 415 ``AppError``s."""
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
            yield image
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


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    name: str = "image",
    device: torch.device | None = None,
    keep_jpeg: bool = False,
    draft: tuple[int, int] | None = None,
) -> torch.Tensor | EncodedJpeg:
    """Decode one image file; raises 400 / 413 / 415 ``AppError``s naming ``name``.

    ``device``: where the model runs; for CUDA the tensor is on that device or in
    pinned memory (see the module docstring), otherwise in ordinary memory.
    ``keep_jpeg``: an ``EncodedJpeg`` for what nvJPEG would decode. ``draft``: a
    JPEG decoded by Pillow is reduced to at least this stored ``(width, height)``
    (``reduction``)."""
    with open_image(data, max_pixels, name) as image:
        if keep_jpeg and (orientation := nvjpeg_orientation(data, image)) is not None:
            height, width = image.size if orientation in TRANSPOSED else image.size[::-1]
            return EncodedJpeg(data, name, (3, height, width))
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and (decoded := decode_jpeg_on_device(data, image, device)) is not None:
            return decoded
        if draft is not None and image.format == "JPEG":
            image.draft(image.mode, draft)
        image.load()
        tensor = pil_to_tensor(image)
        return tensor.pin_memory() if on_cuda else tensor


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


# Decoding has threads of its own: a stalled database or anything else that waits
# in threads cannot hold the ones images need.
_DECODERS = ThreadPoolExecutor(
    max(4, (os.cpu_count() or 1) + 2), thread_name_prefix="maskrcnn-decode"
)
# Headers are read in threads of their own, so that a request is refused (413, 503)
# in milliseconds however long the decoding threads are busy.
_PROBERS = ThreadPoolExecutor(2, thread_name_prefix="maskrcnn-probe")


async def in_decoder_threads(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_DECODERS, functools.partial(call, *args, **kwargs))


async def in_probing_threads(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_PROBERS, functools.partial(call, *args, **kwargs))


async def decode_all(
    blobs: Sequence[bytes],
    names: Sequence[str],
    memory: RequestMemory,
    *,
    max_pixels: int,
    device: torch.device | None = None,
    keep_jpeg: bool = False,
    reduce_for: InputGeometry | None = None,
) -> list[Decoded]:
    """A request's images: probed, their memory reserved in ``memory`` (413 / 503
    before any is decoded), then decoded in threads, the JPEGs larger than the
    input of the model of ``reduce_for`` reduced (``reduction``). The first error
    wins and cancels the decodes not yet started; those already running keep their
    memory reserved until they end (``RequestMemory.decoding``)."""
    probes = await gather_or_cancel(
        [
            in_probing_threads(
                probe_image, blob, max_pixels=max_pixels, name=name, reduce_for=reduce_for
            )
            for blob, name in zip(blobs, names, strict=True)
        ]
    )
    pinned = device is not None and device.type == "cuda"
    memory.reserve([(p.decoding_bytes(pinned=pinned), p.decoded_bytes, p.pixels) for p in probes])
    options = {"max_pixels": max_pixels, "device": device, "keep_jpeg": keep_jpeg}

    def decode(index: int, blob: bytes, probe: Probe) -> Decoded:
        scale, draft = reduction(probe, reduce_for)
        with memory.decoding(index):
            image = decode_image(
                blob, name=probe.name, draft=draft if scale > 1 else None, **options
            )
        reduced = tuple(image.shape[-2:]) != probe.size
        return Decoded(image, probe.size if reduced else None)

    return await gather_or_cancel(
        [
            in_decoder_threads(decode, i, blob, probe)
            for i, (blob, probe) in enumerate(zip(blobs, probes, strict=True))
        ]
    )


async def gather_or_cancel(coroutines: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, in order; the first error cancels the rest (a failed request
    leaves no URL fetch running and no image waiting to be decoded)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
