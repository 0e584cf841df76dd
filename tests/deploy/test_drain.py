"""What a load balancer relies on when a replica gets SIGTERM (``maskrcnn serve``):
it keeps answering while it drains, tells every client to drop the connection
after its answer, finishes what it accepted, and exits."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.server import DRAIN_ACCEPT_S
from tests.app.conftest import png_bytes, running_server, scene

pytestmark = pytest.mark.slow


def test_a_draining_server_answers_closes_each_connection_and_finishes_its_work(tmp_path):
    images = [
        ("images", (f"{i}.png", png_bytes(scene(256, 256, i)), "image/png")) for i in range(16)
    ]
    with running_server("demo", tmp_path, max_batch_size=1) as server:
        server.wait_ready()
        assert "connection" not in server.client.get("/healthz").headers  # keep-alive
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(server.client.post, "/v1/segment", files=images)
            deadline = time.monotonic() + 30
            while server.metric("maskrcnn_images_forwarded_total") < 1:  # work under way
                assert time.monotonic() < deadline and not slow.done()
                time.sleep(0.02)
            server.terminate()
            time.sleep(0.1)
            with httpx.Client(base_url=server.url, timeout=10) as late:
                alive, ready = late.get("/healthz"), late.get("/readyz")
            assert not slow.done(), "the slow request should outlast these checks"
            response = slow.result()
        assert alive.status_code == 200 and alive.headers["connection"] == "close"
        assert ready.status_code == 503 and ready.headers["connection"] == "close"
        assert response.status_code == 200
        assert len(response.json()["results"]) == 16
        # uvicorn re-raises the signal it handled once it has shut down cleanly
        assert server.process.wait(DRAIN_ACCEPT_S + 30) in (0, -signal.SIGTERM)
