"""Shared helpers for the HTTP tests: an in-process app on a fake predictor, a
tiny random-weight checkpoint, and real ``maskrcnn serve`` processes on free
ports."""

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import load_settings
from tests.app.fakes import FakePredictor

REPO = Path(__file__).resolve().parents[2]


# -- in-process app on a fake predictor ---------------------------------------


def wait_ready(client, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready: {client.get('/readyz').text}")
        time.sleep(0.02)


@contextlib.contextmanager
def fake_client(predictor=None, **settings) -> Iterator[TestClient]:
    predictor = predictor or FakePredictor()
    if "data_dir" not in settings:  # a SQLite job store per client, never in the repo
        settings["data_dir"] = Path(tempfile.mkdtemp(prefix="maskrcnn-test-"))
    settings = load_settings(**{"max_batch_delay_ms": 2, **settings})
    app = create_app(settings, load_predictor=lambda _: predictor)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        client.predictor = predictor
        yield client


@pytest.fixture
def client() -> Iterator[TestClient]:
    with fake_client() as c:
        yield c


# -- images -------------------------------------------------------------------


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Noise with a few flat rectangles (structure for random-weight proposals)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        array[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3)
    return array


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# -- a tiny real model and real servers ------------------------------------------


def make_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A random-weight Mask R-CNN (2 classes, 128 px) biased to detect things.

    20 proposals per image instead of 1000 keep it to a few detections, so the
    mask head (the costly part on a CPU) stays cheap: ~0.1 s per image."""
    from model.checkpoint import save_checkpoint
    from model.networks import build_network

    torch.manual_seed(seed)
    kwargs = {"num_classes": 3, "min_size": 128, "max_size": 128}
    kwargs |= {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 20}
    network = build_network("maskrcnn_resnet50_fpn", **kwargs)
    with torch.no_grad():
        network.roi_heads.box_predictor.cls_score.bias[1:] += 4
    save_checkpoint(
        path,
        network,
        architecture="maskrcnn_resnet50_fpn",
        arch_kwargs=kwargs,
        classes=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    )
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``maskrcnn serve`` in a subprocess; ``url``, ``client`` and ``log()``."""

    def __init__(self, model: Path, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")},
            "MASKRCNN_MAX_BATCH_DELAY_MS": "20",
            # one intra-op thread: on a shared 2-core machine OpenMP's spinning
            # threads make every op ~15x slower
            "OMP_NUM_THREADS": "1",
            **env,
        }
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--model", str(model)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                self.client.get("/healthz", timeout=1)
                return
            time.sleep(0.05)
        raise TimeoutError(f"server did not listen:\n{self.log()}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while self.client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"server not ready:\n{self.log()}")
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` (no labels filter) from ``/metrics``."""
        total = 0.0
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.client.close()
        self._log.close()


@contextlib.contextmanager
def running_server(model: Path, tmp_path: Path, **env: str) -> Iterator[ServerProcess]:
    env = {"data_dir": tmp_path / "data", **env}  # its own SQLite job store by default
    env = {f"MASKRCNN_{k.upper()}": str(v) for k, v in env.items()}
    server = ServerProcess(model, env, tmp_path / f"server-{time.monotonic_ns()}.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    """One ready server for the tests that do not need special settings."""
    with running_server(checkpoint, tmp_path_factory.mktemp("server")) as s:
        s.wait_ready()
        yield s
