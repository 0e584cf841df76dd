"""Decoded pixels are budgeted from the images' headers, before decoding, and a
large request's memory goes back to the system: against a real server on the
demo model, measuring its resident memory."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.app.conftest import running_server

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


def test_eight_6000_square_pngs_are_refused_from_their_headers(demo, big_png):
    post(demo, [flat_png(64, 64)])  # warm: the first request's allocations are not ours
    before = rss_mb(demo.process.pid)
    response = post(demo, [big_png] * 8)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_pixels" and "MAX_REQUEST_PIXELS" in error["message"]
    assert rss_mb(demo.process.pid) - before < 150
    assert post(demo, [flat_png(64, 64)]).status_code == 200  # still serving


def test_a_large_request_within_the_budget_gives_its_memory_back(demo, big_png):
    post(demo, [flat_png(64, 64)])
    before = rss_mb(demo.process.pid)
    response = post(demo, [big_png] * 3)  # 108 M pixels: under MAX_REQUEST_PIXELS
    assert response.status_code == 200, response.text
    assert [r["width"] for r in response.json()["results"]] == [6000] * 3
    after = rss_mb(demo.process.pid)
    assert after - before < 150, f"RSS {before:.0f} MB before, {after:.0f} MB after"


def test_past_the_servers_pixels_in_flight_a_request_is_told_to_retry(tmp_path):
    with running_server("demo", tmp_path, max_pixels_in_flight=1000) as server:
        server.wait_ready()
        response = post(server, [flat_png(64, 64)])
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "busy"
        assert "MAX_PIXELS_IN_FLIGHT" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert post(server, [flat_png(16, 16)]).status_code == 200  # under it: served
