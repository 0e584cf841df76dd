"""Upload decoding: allowed formats by content, limits, orientation, modes."""

import asyncio
import dataclasses

import pytest
import torch
from PIL import Image

from app.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.inputs.decoding import EncodedJpeg, Probe, decode_all, decode_image, reduction
from app.inputs.memory import DecodeMemory, RequestMemory
from model import InputGeometry
from tests.app.conftest import corrupt_jpeg, encode, gradient


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_allowed_formats_decode_to_rgb_uint8(fmt):
    tensor = decode_image(encode(gradient(), fmt), max_pixels=10_000)
    assert tensor.dtype.is_floating_point is False and tuple(tensor.shape) == (3, 30, 40)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_other_formats_are_415_whatever_the_name(fmt):
    with pytest.raises(UnsupportedMediaTypeError, match=r"photo\.jpg"):
        decode_image(encode(gradient(), fmt), max_pixels=10_000, name="photo.jpg")


def test_corrupt_and_truncated_files_are_400():
    data = encode(gradient(), "PNG")
    with pytest.raises(BadRequestError):
        decode_image(data[: len(data) // 2], max_pixels=10_000)
    with pytest.raises(BadRequestError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, max_pixels=10_000)
    with pytest.raises(BadRequestError):
        decode_image(b"", max_pixels=10_000)


def test_pixel_limit_is_checked_from_the_header():
    # a 1 bit-per-pixel PNG of 100 Mpx is tiny on the wire
    huge = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(huge) < 100_000
    with pytest.raises(PayloadTooLargeError, match="10000x10000"):
        decode_image(huge, max_pixels=40_000_000)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(gradient(40, 30), "JPEG", exif=exif)
    assert tuple(decode_image(data, max_pixels=10_000).shape) == (3, 40, 30)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = gradient().convert("L").convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30))
    tensor = decode_image(encode(image, "PNG"), max_pixels=10_000)
    assert tuple(tensor.shape) == (3, 30, 40)


def test_multi_frame_images_are_refused():
    frames = [gradient(), gradient().rotate(90)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(BadRequestError, match="multi-frame"):
        decode_image(data, max_pixels=10_000)


def test_decode_all_names_the_bad_one():
    good = encode(gradient(), "PNG")
    memory = RequestMemory(DecodeMemory(request_pixels=10**6, limit_bytes=10**8))
    with pytest.raises(UnsupportedMediaTypeError, match="images\\[1\\]"):
        names = ["images[0]", "images[1]"]
        asyncio.run(decode_all([good, b"hello"], names, memory, max_pixels=10_000))
    assert memory.budget.used == 0  # refused from the headers: nothing reserved


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpegs_for_a_model_process_are_checked_and_left_encoded(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    for image in (gradient(40, 30), gradient(40, 30).convert("L")):
        data = encode(image, "JPEG", exif=exif)
        kept = decode_image(data, max_pixels=10_000, name="a.jpg", keep_jpeg=True)
        assert isinstance(kept, EncodedJpeg) and (kept.data, kept.name) == (data, "a.jpg")
        assert kept.shape == tuple(decode_image(data, max_pixels=10_000).shape)
    # the checks still happen here
    with pytest.raises(PayloadTooLargeError, match="40x30"):
        decode_image(data, max_pixels=1_000, keep_jpeg=True)
    truncated = encode(gradient(), "JPEG")[:-2]  # no end marker
    with pytest.raises(BadRequestError, match="truncated"):
        decode_image(truncated, max_pixels=10_000, keep_jpeg=True)
    # what nvJPEG is not given is decoded here
    for other in (encode(gradient(), "PNG"), encode(gradient().convert("CMYK"), "JPEG")):
        assert isinstance(decode_image(other, max_pixels=10_000, keep_jpeg=True), torch.Tensor)
    # corrupt past the header: only decoding tells, so decode_image there does
    assert isinstance(decode_image(corrupt_jpeg(), max_pixels=10_000, keep_jpeg=True), EncodedJpeg)
    with pytest.raises(BadRequestError, match="corrupt"):
        decode_image(corrupt_jpeg(), max_pixels=10_000)


R50 = InputGeometry(min_size=800, max_size=1333, size_divisible=32)


@pytest.mark.parametrize(
    ("size", "fmt", "orientation", "expected"),
    [
        ((4000, 3000), "JPEG", 1, (2, (2000, 1500))),  # resized to 1333x1000
        ((6000, 4000), "JPEG", 1, (4, (1500, 1000))),
        ((3000, 4000), "JPEG", 6, (2, (1500, 2000))),  # stored turned: asked for as stored
        ((1600, 1200), "JPEG", 1, (1, (1600, 1200))),  # 1.2x its resized size: kept
        ((640, 480), "JPEG", 1, (1, (640, 480))),  # enlarged by the network: kept
        ((4000, 3000), "PNG", 1, (1, (4000, 3000))),  # no reduced decoding in PNG
    ],
)
def test_jpegs_larger_than_the_models_input_are_reduced_no_further(
    size, fmt, orientation, expected
):
    probe = Probe("a", fmt, *size, "RGB", orientation)
    assert reduction(probe, R50) == expected
    assert reduction(probe, None) == (1, size)
    fixed = dataclasses.replace(R50, fixed=True)
    assert reduction(probe, fixed) == (1, size)


def test_a_reduced_jpeg_is_decoded_small_and_remembers_its_files_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 4000x3000, upright 3000 wide and 4000 high
    data = encode(gradient(4000, 3000), "JPEG", exif=exif)
    memory = RequestMemory(DecodeMemory(request_pixels=10**8, limit_bytes=10**9))
    [decoded] = asyncio.run(decode_all([data], ["a"], memory, max_pixels=10**8, reduce_for=R50))
    assert tuple(decoded.image.shape) == (3, 2000, 1500) and decoded.size == (4000, 3000)
    assert memory.budget.used == 3 * 2000 * 1500  # the reduced image, not the file's 12 M pixels
    full = decode_image(data, max_pixels=10**8)
    small = decoded.image.float()
    assert (small - full[:, ::2, ::2].float()).abs().mean() < 3  # the same picture
