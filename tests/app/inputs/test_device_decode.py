"""Decoding for a model on a CUDA device: nvJPEG for plain JPEGs with the EXIF
orientation applied on the device, pinned host memory for everything else, and
Pillow (with its 400s) for whatever nvJPEG should not see."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.errors import BadRequestError
from app.inputs.decoding import decode_image
from app.inputs.nvjpeg import apply_orientation, decode_jpeg_on_device
from model.inference.images import pil_to_tensor

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def photo(width: int = 48, height: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 3] = (250, 10, 10)  # a corner to tell turns apart
    return Image.fromarray(array).convert(mode)


def jpeg(image: Image.Image, orientation: int = 1, **kwargs) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes(), **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation):
    image = photo(7, 5)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = pil_to_tensor(ImageOps.exif_transpose(image))
    turned = apply_orientation(pil_to_tensor(photo(7, 5)), orientation)
    assert turned.is_contiguous()
    assert torch.equal(turned, expected)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: jpeg(photo(mode="CMYK")), id="cmyk"),
        pytest.param(lambda: jpeg(photo())[:-200], id="truncated"),
    ],
)
def test_jpegs_nvjpeg_must_not_see_are_left_to_pillow(data):
    blob = data()
    with Image.open(io.BytesIO(blob)) as image:
        assert decode_jpeg_on_device(blob, image, CUDA) is None  # never touches CUDA


def test_non_jpegs_are_left_to_pillow():
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert decode_jpeg_on_device(buffer.getvalue(), image, CUDA) is None


def test_cpu_model_gets_ordinary_memory():
    tensor = decode_image(jpeg(photo()), max_pixels=10_000, device=torch.device("cpu"))
    assert tensor.device.type == "cpu" and tuple(tensor.shape) == (3, 32, 48)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_cuda_decode_matches_pillow(orientation, mode):
    """Same pixels up to IDCT rounding, turned the same way. Full-resolution chroma
    (4:4:4): with 4:2:0 the two decoders upsample chroma differently (libjpeg's
    "fancy" filter), which on this pixel noise differed by 10.9 grey levels on
    average (H100 run, bench/RESULTS.md); on photos the difference is far smaller."""
    blob = jpeg(photo(mode=mode), orientation, subsampling=0)
    expected = decode_image(blob, max_pixels=10_000)
    decoded = decode_image(blob, max_pixels=10_000, device=CUDA)
    assert decoded.device.type == "cuda" and decoded.dtype == torch.uint8
    assert decoded.shape == expected.shape
    # nvJPEG and libjpeg round their inverse DCTs differently: a grey level or two
    difference = (decoded.cpu().int() - expected.int()).abs().float()
    assert difference.mean() < 2 and difference.max() <= 16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["PNG", "CMYK"])
def test_cuda_fallbacks_are_pinned(fmt):
    if fmt == "CMYK":
        blob = jpeg(photo(mode="CMYK"))
    else:
        buffer = io.BytesIO()
        photo().save(buffer, format="PNG")
        blob = buffer.getvalue()
    decoded = decode_image(blob, max_pixels=10_000, device=CUDA)
    assert decoded.device.type == "cpu" and decoded.is_pinned()
    assert torch.equal(decoded, decode_image(blob, max_pixels=10_000))


@pytest.mark.gpu
@needs_cuda
def test_cuda_truncated_jpeg_is_still_400():
    with pytest.raises(BadRequestError, match="truncated"):
        decode_image(jpeg(photo())[:-200], max_pixels=10_000, device=CUDA)


@pytest.mark.gpu
@needs_cuda
def test_decoding_beside_the_model_leaves_its_batches_intact():
    """nvJPEG writes on a stream of its own: the memory it decodes into must not be
    memory that work queued on another stream still reads: the model's (under load
    this corrupted whole batches: every image without proposals, then a 500) or
    another decoding thread's (it corrupted decoded images)."""
    import threading

    from model.inference.predictor import Predictor
    from model.info import ModelInfo
    from tests.model.conftest import TEST_CLASSES, make_network, random_image

    network = make_network(min_size=480, max_size=640)
    predictor = Predictor(network, ModelInfo("t", "r50", *TEST_CLASSES), device="cuda")
    images = [random_image(480, 640, seed) for seed in range(8)]
    reference = predictor.predict(images)
    assert sum(len(r.detections) for r in reference) > 50
    # upright and turned (orientation 6: a flip on the device after the decode)
    inputs = [jpeg(photo(640, 480)), jpeg(photo(640, 480), orientation=6)]
    expected_pixels = [decode_image(data, max_pixels=10**7, device=CUDA) for data in inputs]
    stop = threading.Event()
    decoded = [0] * 4
    failures: list[BaseException] = []

    def decode_forever(k: int):
        data, expected_image = inputs[k % 2], expected_pixels[k % 2]
        try:
            while not stop.is_set():
                image = decode_image(data, max_pixels=10**7, device=CUDA)
                assert torch.equal(image, expected_image)
                decoded[k] += 1
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=decode_forever, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(40):
            for ours, expected in zip(predictor.predict(images), reference, strict=True):
                assert len(ours.detections) == len(expected.detections)
                torch.testing.assert_close(
                    torch.tensor([d.box for d in ours.detections]),
                    torch.tensor([d.box for d in expected.detections]),
                    atol=1e-2,
                    rtol=0,
                )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures
    assert min(decoded) > 10, f"the decoders must run beside the model: {decoded}"
