"""What a load balancer relies on when a replica gets SIGTERM (``maskrcnn serve``):
it keeps answering while it drains, tells every client to drop the connection
after its answer, finishes what it accepted, and exits."""

import signal
import threading
import time
from collections.abc import Iterator
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
    released = threading.Event()
    with running_server("demo", tmp_path, max_batch_size=1) as server:
        server.wait_ready()
        assert "connection" not in server.client.get("/healthz").headers  # keep-alive
        with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=server.url, timeout=60) as other:
            # in flight until released, however fast the machine: the drain cannot end
            # (and the listener close) before the late checks below
            held = pool.submit(held_upload, other, images, released)
            slow = pool.submit(server.client.post, "/v1/segment", files=images)
            deadline = time.monotonic() + 30
            while server.metric("maskrcnn_images_forwarded_total") < 1 or in_flight(server) < 2:
                assert time.monotonic() < deadline and not slow.done() and not held.done()
                time.sleep(0.02)
            server.terminate()
            time.sleep(0.1)
            with httpx.Client(base_url=server.url, timeout=10) as late:
                alive, ready = late.get("/healthz"), late.get("/readyz")
            assert not held.done(), "the held upload should outlast these checks"
            released.set()
            finished, response = held.result(), slow.result()
        assert alive.status_code == 200 and alive.headers["connection"] == "close"
        assert ready.status_code == 503 and ready.headers["connection"] == "close"
        for answer in (response, finished):
            assert answer.status_code == 200 and answer.headers["connection"] == "close"
            assert len(answer.json()["results"]) == 16
        # uvicorn re-raises the signal it handled once it has shut down cleanly
        assert server.process.wait(DRAIN_ACCEPT_S + 30) in (0, -signal.SIGTERM)


def held_upload(client: httpx.Client, files: list, released: threading.Event) -> httpx.Response:
    """POST ``files`` to ``/v1/segment``, holding back the body's last byte until
    ``released``: the request is in flight all that time."""
    request = client.build_request("POST", "/v1/segment", files=files)
    body = request.read()

    def chunks() -> Iterator[bytes]:
        yield body[:-1]
        assert released.wait(60), "never released"
        yield body[-1:]

    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return client.post("/v1/segment", content=chunks(), headers=headers)


def in_flight(server) -> float:
    """Requests the server is handling, less the scrape that asks."""
    return server.metric("maskrcnn_http_requests_in_flight") - 1
