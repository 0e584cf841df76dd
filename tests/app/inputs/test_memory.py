"""Decoded images are budgeted in bytes from their headers, before any is
decoded, and a large request's memory goes back to the system: against a real
server on the demo model, measuring its resident memory from ``/proc``."""

import concurrent.futures
import io
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.app.conftest import box_iou, predicted, running_server

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def flat_png(height: int, width: int) -> bytes:
    """A large image that is small on the wire (one colour compresses well)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return flat_png(6000, 6000)  # 36 M pixels, about 100 KB


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with running_server("demo", tmp_path_factory.mktemp("memory")) as server:
        server.wait_ready()
        yield server


def post(server, pngs: list[bytes]):
    files = [("images", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    return server.client.post("/v1/segment", files=files)


def peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # the peak becomes the resident memory of now


def timed_post(server, pngs: list[bytes]):
    started = time.monotonic()
    response = post(server, pngs)
    return response, time.monotonic() - started


def test_requests_past_the_pixel_limit_are_refused_from_their_headers(demo):
    post(demo, [flat_png(64, 64)])  # warm: the first request's allocations are not ours
    huge = flat_png(5500, 5500)  # six of them: 181 M pixels, past MAX_REQUEST_PIXELS
    before = rss_mb(demo.process.pid)
    reset_peak(demo.process.pid)
    for _ in range(8):
        response, seconds = timed_post(demo, [huge] * 6)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_pixels" and "MAX_REQUEST_PIXELS" in error["message"]
        assert seconds < 2.0
    # nothing was decoded: 121 MB would show for each image that was
    assert peak_mb(demo.process.pid) - before < 100
    assert rss_mb(demo.process.pid) - before < 50
    assert post(demo, [flat_png(64, 64)]).status_code == 200  # still serving


def test_four_clients_of_large_requests_stay_within_the_budget(demo, big_png):
    """Three 6000x6000 images a request (108 M pixels), four at once: those the
    budget admits are answered, the others are told to retry at once, and the
    server's memory stays within MAX_DECODE_MEMORY_MB (1536) plus the model's
    working memory over its idle size."""
    pid = demo.process.pid
    post(demo, [big_png])  # the first large image's allocations are not ours
    idle = rss_mb(pid)
    reset_peak(pid)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: timed_post(demo, [big_png] * 3), range(4)))
    peak = peak_mb(pid)
    statuses = [response.status_code for response, _ in answers]
    assert 200 in statuses and set(statuses) <= {200, 503}, statuses
    for response, seconds in answers:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "busy"
            assert "MAX_DECODE_MEMORY_MB" in response.json()["error"]["message"]
            assert seconds < 1.0, f"busy after {seconds:.1f} s"
    assert peak < 3900, f"peak {peak:.0f} MB"
    assert peak - idle < 1536 + 400, f"idle {idle:.0f} MB, peak {peak:.0f} MB"


def test_a_large_request_within_the_budget_gives_its_memory_back(demo, big_png):
    post(demo, [flat_png(64, 64)])
    before = rss_mb(demo.process.pid)
    response = post(demo, [big_png] * 3)  # 108 M pixels: under MAX_REQUEST_PIXELS
    assert response.status_code == 200, response.text
    assert [r["width"] for r in response.json()["results"]] == [6000] * 3
    after = rss_mb(demo.process.pid)
    assert after - before < 150, f"RSS {before:.0f} MB before, {after:.0f} MB after"


def test_past_the_servers_decode_memory_a_request_is_told_to_retry(tmp_path):
    with running_server("demo", tmp_path, max_decode_memory_mb=0.01) as server:
        server.wait_ready()
        response = post(server, [flat_png(64, 64)])  # 36 KB to decode, past 10 KB
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "busy"
        assert "MAX_DECODE_MEMORY_MB" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert post(server, [flat_png(16, 16)]).status_code == 200  # under it: served


def test_a_large_jpeg_is_decoded_reduced_and_answered_in_its_own_frame(demo):
    """A 3072x2048 photo of shapes, for the demo model (which resizes to 384x256):
    libjpeg decodes it at an eighth, and the boxes and masks come back for the
    whole photo, as the model finds them in the full decode."""
    from model.training.synthetic import render_scenes

    scene = render_scenes(1, 384, seed=11)[0].permute(1, 2, 0).numpy()
    photo = Image.fromarray(scene).resize((3072, 2048), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    files = [("images", ("photo.jpg", buffer.getvalue(), "image/jpeg"))]
    response = demo.client.post("/v1/segment", files=files)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["width"], result["height"]) == (3072, 2048)
    served = [d for d in result["detections"] if d["score"] >= 0.5]
    full = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    expected = [d for d in predicted("demo", full) if d.score >= 0.5]
    assert served and len(served) == len(expected)
    for got in served:  # each found in the full decode: same class, nearly the same box
        assert any(
            got["class_id"] == d.class_id and box_iou(got["box"], d.box) > 0.9 for d in expected
        ), (got, expected)
        assert got["mask"]["size"] == [2048, 3072]
        assert mask_utils.area(got["mask"]) > 0


def test_the_demo_model_says_what_it_is_in_every_answer(demo):
    """Not about memory: this module's server is the demo's. Its answers name the
    kind of model, so no client takes a shapes detector for a photo model."""
    assert demo.client.get("/readyz").json()["model"]["kind"] == "demo"
    answer = post(demo, [flat_png(64, 64)]).json()
    assert answer["model"] == {
        "id": "demo",
        "architecture": "maskrcnn_small_fpn",
        "kind": "demo",
    }
    listed = demo.client.get("/v1/models").json()["data"]
    assert [(m["id"], m["kind"]) for m in listed if m["active"]] == [("demo", "demo")]
