"""Uploads through the API: body cap before parsing, image count,
formats by content, pixel cap before decoding, EXIF orientation, colour modes.

The in-process tests run on a predictor stand-in whose "detections" are read off
the pixels it was given, so each answer shows what the decoder handed the model.
The body-cap tests run a real ``maskrcnn serve`` and watch its resident memory."""

import base64
import io
import re
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from model.inference.predictor import Detection, ImageResult
from tests.app.conftest import encode, fake_client, png_bytes, running_server
from tests.app.fakes import FakePredictor


def upload(client, data: bytes, name: str = "photo.jpg", **options):
    files = [("images", (name, data, "image/jpeg"))]
    return client.post("/v1/segment", files=files, data={"score_threshold": 0, **options})


def upload_json(client, data: bytes, **options):
    images = [{"data": base64.b64encode(data).decode()}]
    return client.post("/v1/segment/json", json={"images": images, "score_threshold": 0})


def error_code(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


# -- formats, sizes, damage ---------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (a few bytes of data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_a_huge_png_header_is_413_before_decoding():
    data = png_header(50_000, 50_000)
    with fake_client() as client:
        warm_up = client.predictor.images_forwarded
        for send in (upload, upload_json):
            started = time.monotonic()
            response = send(client, data, name="huge.png")
            assert time.monotonic() - started < 1.0
            assert error_code(response, 413) == "image_too_large"
            assert "2500000000 pixels" in response.json()["error"]["message"]
        assert client.predictor.images_forwarded == warm_up


@pytest.mark.parametrize("fmt", ["TIFF", "EPS", "PDF", "GIF", "ICO", "PPM"])
def test_other_formats_named_jpg_are_415(fmt):
    data = encode(Image.new("RGB", (16, 16), (10, 20, 30)), fmt)
    with fake_client() as client:
        response = upload(client, data, name="photo.jpg")
        assert error_code(response, 415) == "unsupported_media_type"
        assert "photo.jpg" in response.json()["error"]["message"]
        assert error_code(upload_json(client, data), 415) == "unsupported_media_type"


def test_truncated_and_corrupt_jpegs_are_400():
    photo = encode(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)), "JPEG")
    with fake_client() as client:
        warm_up = client.predictor.images_forwarded
        for data in (photo[: len(photo) // 2], photo[:200], photo[:4] + b"\0" * 400):
            response = upload(client, data)
            assert error_code(response, 400) == "invalid_image"
            assert "photo.jpg" in response.json()["error"]["message"]
        assert client.predictor.images_forwarded == warm_up


def test_more_images_than_allowed_is_413_in_both_routes():
    data = png_bytes(np.full((8, 8, 3), 9, np.uint8))
    with fake_client(max_images_per_request=2) as client:
        warm_up = client.predictor.images_forwarded
        files = [("images", (f"{i}.png", data, "image/png")) for i in range(3)]
        assert error_code(client.post("/v1/segment", files=files), 413) == "too_many_images"
        images = [{"data": base64.b64encode(data).decode()}] * 3
        response = client.post("/v1/segment/json", json={"images": images})
        assert error_code(response, 413) == "too_many_images"
        assert client.predictor.images_forwarded == warm_up


# -- what the model is given -----------------------------------------------------------


class BrightSpotPredictor(FakePredictor):
    """Detects the box around the pixels brighter than 128, scored by the mean."""

    def finish(self, pending):
        _, pairs = pending
        results = []
        for image, _ in pairs:
            gray = image.float().mean(dim=0)
            ys, xs = np.nonzero((gray > 128).numpy())
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            score = float(image.float().mean()) / 255
            height, width = image.shape[-2:]
            results.append(ImageResult(int(width), int(height), [Detection(1, "a", score, box)]))
        return results


def bright_box(image: Image.Image) -> list[float]:
    gray = np.asarray(image.convert("L"))
    ys, xs = np.nonzero(gray > 128)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_photos_give_boxes_in_the_upright_frame(orientation):
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[4:16, 8:24] = 255  # a white patch near the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(photo)))  # Pillow as the reference
    with fake_client(BrightSpotPredictor()) as client:
        response = upload(client, photo, mask_format="none")
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert (result["width"], result["height"]) == upright.size
    assert result["detections"][0]["box"] == bright_box(upright)
    if orientation in (5, 6, 7, 8):
        assert upright.size == (48, 64)  # a quarter turn: the frame is portrait


def sixteen_bit(value: int) -> Image.Image:
    return Image.fromarray(np.full((20, 30), value, np.uint16))


def palette() -> Image.Image:
    image = Image.new("P", (30, 20))
    image.putpalette([10, 200, 90] + [0] * 765)
    return image


@pytest.mark.parametrize(
    ("make", "fmt", "mean"),
    [
        (lambda: sixteen_bit(40_000), "PNG", round(40_000 / 65535 * 255)),
        (lambda: sixteen_bit(65_535), "PNG", 255),
        (palette, "PNG", 100),
        (lambda: Image.new("RGBA", (30, 20), (200, 100, 0, 0)), "PNG", 100),
        (lambda: Image.new("LA", (30, 20), (77, 255)), "PNG", 77),
        (lambda: Image.new("L", (30, 20), 150), "PNG", 150),
        (lambda: Image.new("1", (30, 20), 1), "PNG", 255),
        (lambda: Image.new("L", (30, 20), 150), "JPEG", 150),
        (lambda: Image.new("RGBA", (30, 20), (30, 60, 90, 255)), "WEBP", 60),
        (lambda: Image.new("P", (30, 20), 0), "BMP", 0),
    ],
)
def test_every_colour_mode_reaches_the_model_as_8_bit_rgb(make, fmt, mean):
    with fake_client() as client:
        response = upload(client, encode(make(), fmt), name=f"image.{fmt.lower()}")
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert (result["width"], result["height"]) == (30, 20)
    assert result["detections"][0]["score"] == pytest.approx(mean / 255, abs=1.5 / 255)


# -- the body cap, on a real server -----------------------------------------------------

LIMIT_MB = 24
LIMIT = LIMIT_MB * 2**20


def resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakMemory:
    """The highest resident size of ``pid`` while the block runs, in bytes above
    what it was on entry (sampled every 5 ms)."""

    def __init__(self, pid: int):
        self.pid, self.growth = pid, 0

    def __enter__(self):
        self.base = resident_kb(self.pid)
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, resident_kb(self.pid))

    def __exit__(self, *exc):
        time.sleep(0.05)
        self.done.set()
        self.thread.join()
        self.growth = (self.peak - self.base) * 1024


def send_raw(port: int, head: bytes, body_size: int, chunked: bool) -> tuple[int, int, bytes]:
    """Send ``head`` then a body of ``body_size`` bytes (chunked or not) for as long
    as the server reads it; stop when it answers. Returns (status, body bytes handed
    to the socket, the answer)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    sock.setblocking(False)
    sent, answer, pending, writing = 0, b"", b"", True
    try:
        while b"\r\n\r\n" not in answer:
            writing = writing and (bool(pending) or sent < body_size)
            readable, writable, _ = select.select([sock], [sock] if writing else [], [], 10)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                if not pending:
                    part = b"-" * min(65536, body_size - sent)
                    sent += len(part)
                    pending = b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
                    pending += b"0\r\n\r\n" if chunked and sent == body_size else b""
                try:
                    pending = pending[sock.send(pending) :]
                except (BrokenPipeError, ConnectionResetError):
                    writing = False  # the server closed its side: read its answer
            else:
                raise TimeoutError("the server neither read nor answered for 10 s")
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        sock.setblocking(True)
        sock.settimeout(10)
        while len(body) < length:
            body += sock.recv(65536)
    finally:
        sock.close()
    return int(head.split(b" ", 2)[1]), sent, head + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def capped_server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capped")
    with running_server(checkpoint, tmp, max_upload_mb=LIMIT_MB) as server:
        server.wait_ready()
        yield server


def request_head(path: str, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


@pytest.mark.slow
def test_a_declared_body_over_the_cap_is_413_before_it_is_read(capped_server):
    pid = capped_server.process.pid
    head = request_head("/v1/segment", "multipart/form-data; boundary=b", LIMIT + 1)
    with PeakMemory(pid) as memory:
        started = time.monotonic()
        status, sent, answer = send_raw(capped_server.port, head, LIMIT + 1, chunked=False)
        elapsed = time.monotonic() - started
    assert status == 413 and b"payload_too_large" in answer and b"MAX_UPLOAD_MB" in answer
    assert elapsed < 2 and sent < LIMIT // 2  # answered without waiting for the body
    assert memory.growth < LIMIT // 8, memory.growth


@pytest.mark.slow
def test_a_chunked_multipart_body_over_the_cap_is_413_without_holding_it(capped_server):
    pid = capped_server.process.pid
    head = request_head("/v1/segment", "multipart/form-data; boundary=b", None)
    prefix = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    with PeakMemory(pid) as memory:
        sock_status, _, answer = send_raw(
            capped_server.port, head + b"%x\r\n%s\r\n" % (len(prefix), prefix), LIMIT, True
        )
    assert sock_status == 413 and b"payload_too_large" in answer
    assert memory.growth < LIMIT // 4, memory.growth  # the parser spools files to disk
    assert capped_server.client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_the_memory_probe_sees_a_body_the_server_does_hold(capped_server):
    """Control for the two tests above: a JSON body under the cap is held whole
    (it must be, to be parsed), and the probe shows it."""
    pid = capped_server.process.pid
    size = LIMIT // 2
    head = request_head("/v1/segment/json", "application/json", size)
    with PeakMemory(pid) as memory:
        status, sent, _ = send_raw(capped_server.port, head, size, chunked=False)
    assert status == 422 and sent == size
    assert memory.growth > size // 2, memory.growth
