"""nvJPEG: complete baseline JPEGs decoded on the model's GPU, with their EXIF
orientation applied there (``app.inputs.decoding`` decides which go here)."""

import contextlib
import threading
import warnings

import torch
from PIL import Image

EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations whose upright image swaps width and height


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
