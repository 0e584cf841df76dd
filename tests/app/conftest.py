"""Shared helpers for the HTTP tests: an in-process app on a fake predictor, a
tiny random-weight checkpoint, real ``maskrcnn serve`` processes on free
ports and segment traffic against them, admin auth, throwaway PostgreSQL
databases, and the job store, datasets and registry rows training tests set up."""

import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.api import auth as auth_module
from app.api import error_handlers
from app.api import middleware as middleware_module
from app.main import create_app
from app.serving.predictors import InProcessPredictor
from app.settings import load_settings
from tests.app import errorbodies
from tests.app.fakes import FakePredictor
from tests.conftest import OPENVINO_CACHE

REPO = Path(__file__).resolve().parents[2]


# -- every error body, in every test ------------------------------------------

SENT_CODES: set[str] = set()  # by the in-process app, in this run


@pytest.fixture(autouse=True)
def _error_bodies_name_nothing_private(monkeypatch):
    """Fails a test whose in-process app answered with a path of this machine,
    a traceback or a database URL in an error body (``tests/app/errorbodies.py``)."""
    leaked = []
    real = error_handlers.error_response

    def watched(status_code, code, message, request_id, headers=None):
        response = real(status_code, code, message, request_id, headers)
        sent = json.loads(response.body)["error"]["message"]
        SENT_CODES.add(code)
        if found := errorbodies.leaks_in(sent):
            leaked.append(f"{status_code} {code}: {sent!r} names {found}")
        return response

    for module in (error_handlers, auth_module, middleware_module):
        monkeypatch.setattr(module, "error_response", watched)
    yield
    assert not leaked, "error bodies with private details:\n" + "\n".join(leaked)


def pytest_sessionfinish(session, exitstatus):
    """After the whole suite passed: every code the app can send was sent, so
    every kind of error body was checked."""
    config = session.config
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if not whole or config.option.keyword or config.option.markexpr or exitstatus != 0:
        return
    if missing := errorbodies.codes_in_source() - SENT_CODES:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(
            f"error codes no test was answered with, their bodies unchecked: {sorted(missing)}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    app = create_app(settings, load_predictor=lambda _: InProcessPredictor(predictor))
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


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array), "PNG")


# 8 distinct scenes: 6 of one shape (one size bucket), 2 of others
SCENES = [scene(96, 96, seed) for seed in range(6)] + [scene(64, 112, 6), scene(120, 80, 7)]
SCENE_PNGS = [png_bytes(image) for image in SCENES]


def gradient(width=40, height=30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    array = np.stack([np.tile(x, (height, 1))] * 3, axis=2)
    array[..., 1] = 100
    return Image.fromarray(array)


def corrupt_jpeg() -> bytes:
    """A JPEG whose header reads (size, mode, end marker) but that has no image data."""
    data = encode(gradient(), "JPEG")
    return data[: data.index(b"\xff\xda")] + b"\xff\xd9"


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

    def __init__(
        self,
        model: Path | str,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        cwd: Path = REPO,
        host: str | None = "127.0.0.1",
    ):
        """``host`` None: no ``--host``, the command's own default."""
        self.port = port or free_port()  # a fixed port: a replica restarted in place
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **{k: v for k, v in os.environ.items() if kept_variable(k)},
            "MASKRCNN_MAX_BATCH_DELAY_MS": "20",
            # one intra-op thread: on a shared 2-core machine OpenMP's spinning
            # threads make every op ~15x slower
            "OMP_NUM_THREADS": "1",
            **env,
        }
        command = [sys.executable, "-m", "app.cli", "serve"]
        command += ["--host", host] if host else []
        command += ["--port", str(self.port), "--model", str(model)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
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

    def accepted(self, route: str | None = "/v1/segment") -> float:
        """Requests the server holds or has answered on ``route`` (``None``: on any
        route but ``/metrics``; one scrape: both counts change together, in the same
        step of its event loop)."""
        total = -1.0  # this scrape is in flight too
        for line in self.client.get("/metrics").text.splitlines():
            answered = line.startswith("maskrcnn_http_requests_total{")
            if route is None:
                answered = answered and 'route="/metrics"' not in line
            else:
                answered = answered and f'route="{route}"' in line
            if answered or line.startswith("maskrcnn_http_requests_in_flight "):
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


def run_serve(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``maskrcnn serve *args`` run to its exit (a start-up it refuses), with none of
    the tests' ``MASKRCNN_*`` variables but ``env``'s and its ``DATA_DIR`` under
    ``tmp_path``; its output captured."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    clean["MASKRCNN_DATA_DIR"] = str(tmp_path / "data")  # never ./data in the repo
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(free_port()), *args]
    return subprocess.run(
        command, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def kept_variable(name: str) -> bool:
    """Whether a server the tests start keeps this variable of the tests' environment:
    not the ``MASKRCNN_*`` settings (each test sets its own), but the run's cache of
    OpenVINO graphs (``tests/conftest.py``)."""
    return not name.startswith("MASKRCNN_") or name == OPENVINO_CACHE


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


def served_model_id(client, png: bytes, headers: dict[str, str] | None = None) -> str:
    """The ``model.id`` of a successful ``/v1/segment`` answer for ``png``."""
    files = [("images", ("image.png", png, "image/png"))]
    response = client.post("/v1/segment", files=files, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["model"]["id"]


def timed_segment(url: str) -> tuple[int, float]:
    """One ``/v1/segment`` of ``SCENE_PNGS[0]`` on a new connection to ``url``: the
    status and the seconds it took."""
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        files = [("images", ("a.png", SCENE_PNGS[0], "image/png"))]
        response = client.post("/v1/segment", files=files)
    return response.status_code, time.monotonic() - started


class Traffic:
    """``clients`` threads sending ``png`` to ``/v1/segment`` back to back until the
    block ends; ``answers[i]`` is client ``i``'s ``(status, body)`` in order."""

    def __init__(self, url: str, png: bytes, clients: int = 2, headers: dict | None = None):
        self.url, self.png, self.headers = url, png, headers or {}
        self.answers: list[list[tuple[int, dict | str]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(a,)) for a in self.answers]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _send(self, answers: list) -> None:
        files = [("images", ("scene.png", self.png, "image/png"))]
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/segment", files=files, headers=self.headers)
                except httpx.HTTPError as e:
                    answers.append((0, repr(e)))
                    continue
                ok = response.status_code == 200
                answers.append((response.status_code, response.json() if ok else response.text))

    def count(self) -> int:
        """Answers so far, all clients together."""
        return sum(len(answers) for answers in self.answers)

    def wait_more(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` more answers arrived (of any status)."""
        deadline, target = time.monotonic() + timeout, self.count() + count
        while self.count() < target:
            assert time.monotonic() < deadline, f"traffic stalled at {self.count()} answers"
            time.sleep(0.05)

    def failures(self) -> list[tuple[int, dict | str]]:
        return [answer for answers in self.answers for answer in answers if answer[0] != 200]

    def ids(self) -> list[list[str | None]]:
        return [[b["model"]["id"] if s == 200 else None for s, b in list(a)] for a in self.answers]

    def wait_for(self, model_id: str, *, count: int = 2, timeout: float = 60.0) -> float:
        """Seconds until every client got ``count`` answers from ``model_id``."""
        start = time.monotonic()
        while any(ids.count(model_id) < count for ids in self.ids()):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{self.url} did not serve {model_id!r}: {self.ids()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def check(self, order: list[str], references: dict[str, list[tuple]] | None = None) -> None:
        """Every request succeeded; each client saw the models in ``order`` (each
        switch once, never back); with ``references`` (model id → ``(class id,
        score)`` per detection), each answer is what its named model detects."""
        for answers in self.answers:
            assert [s for s, _ in answers] == [200] * len(answers), answers
            ids = [body["model"]["id"] for _, body in answers]
            assert [m for i, m in enumerate(ids) if i == 0 or ids[i - 1] != m] == order, ids
            if references is None:
                continue
            for _, body in answers:
                found = [(d["class_id"], d["score"]) for d in body["results"][0]["detections"]]
                assert same_detections(found, references[body["model"]["id"]]), body


def predicted(model: str, image: np.ndarray) -> list:
    """``image``'s ``Detection``s by ``model`` (a spec or a file), run in process on
    the device a server picks: what a server must answer."""
    from model.inference.predictor import Predictor
    from model.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(model, device="auto")
        tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        device = next(loaded.network.parameters()).device
        [result] = Predictor(loaded.network, loaded.info, device=device).predict([tensor])
    finally:
        torch.set_num_threads(threads)
    return result.detections


def detections_by(model: str, image: np.ndarray) -> list[tuple[int, float]]:
    """``predicted``'s ``(class id, score)``s."""
    return [(d.class_id, d.score) for d in predicted(model, image)]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 1.0


def same_detections(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same classes in the same order, scores within 0.02 (enough to tell which of
    two models answered; boxes are compared in tests/app/api/test_server.py)."""
    return len(got) == len(expected) and all(
        g[0] == e[0] and abs(g[1] - e[1]) <= 0.02 for g, e in zip(got, expected, strict=True)
    )


# -- admin auth ---------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN_TOKEN = "admin-token-for-tests"
AS_ADMIN = bearer(ADMIN_TOKEN)


# -- PostgreSQL -----------------------------------------------------------------------

POSTGRES_ADMIN_URL = os.environ.get(
    "MASKRCNN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def throwaway_database(prefix: str = "maskrcnn") -> Iterator[str]:
    """A fresh database on the test PostgreSQL (``MASKRCNN_TEST_POSTGRES_URL``, by
    default the local one), dropped afterwards even with sessions still open;
    yields its URL. No PostgreSQL skips the test, or fails it where
    ``MASKRCNN_TEST_REQUIRE_TOPOLOGY=1`` (CI, which must provide one)."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("MASKRCNN_TEST_REQUIRE_TOPOLOGY") == "1":
            pytest.fail(f"no PostgreSQL at {POSTGRES_ADMIN_URL} (CI must provide it): {e}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {e}")
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urllib.parse.urlsplit(POSTGRES_ADMIN_URL)._replace(path=f"/{name}").geturl()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for one test (see ``throwaway_database``)."""
    with throwaway_database() as url:
        yield url


# -- object storage ----------------------------------------------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moto-key", "AWS_SECRET_ACCESS_KEY": "moto-secret-key"}


@contextlib.contextmanager
def s3_server(log_path: Path) -> Iterator[str]:
    """moto's S3 API server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url + "/moto-api/", timeout=2)
            return True  # any answer: it listens
        return False

    try:
        wait_for(answering, 60, "moto's S3 server to answer")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def new_bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the S3 server at ``endpoint``, with the standard ``AWS_*``
    variables that reach it set for the test (and the processes it starts);
    returns a ``STORAGE_URL`` with a prefix in it."""
    import boto3

    variables = {**S3_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    name = f"maskrcnn-{secrets.token_hex(4)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/service"


def bucket_keys(storage_url: str) -> list[str]:
    """Every key under ``storage_url``'s prefix, relative to it (boto3: not our code)."""
    import boto3

    bucket, prefix = storage_url.removeprefix("s3://").split("/", 1)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/"
    )
    found = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return sorted(key.removeprefix(prefix + "/") for key in found)


# -- training jobs ----------------------------------------------------------------

# a job body that trains in seconds on a CPU: one epoch from ``demo`` on 64 px images
TINY_JOB = {"base_model": "demo", "epochs": 1, "batch_size": 2, "image_size": 64}


def job_store(data_dir: Path, url: str | None = None):
    """The database a server with this ``DATA_DIR`` (and ``DATABASE_URL``, by default
    its SQLite file) uses, its tables created: tests arrange and inspect state
    there. The caller disposes of it."""
    from app.store.db import Database

    db = Database(url or f"sqlite:///{data_dir / 'maskrcnn.db'}", data_dir=data_dir)
    db.create_schema()
    return db


def set_job(db, job_id: str, **values) -> None:
    """Overwrite columns of a job row, as a worker would have."""
    from app.store.db import TrainingJobRecord

    with db.session() as session:
        job = session.get(TrainingJobRecord, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def upload_dataset(
    client, data: bytes, filename: str = "dataset.zip", headers=AS_ADMIN, **form
) -> httpx.Response:
    files = {"file": (filename, data, "application/zip")}
    return client.post("/v1/datasets", files=files, data=form, headers=headers)


def iter_events(response) -> Iterator[tuple[str, dict]]:
    """Server-sent events as (name, data), each as it arrives, until the server
    ends the stream."""
    name, data = None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and name:
            yield name, json.loads("\n".join(data))
            name, data = None, []


def read_events(response) -> list[tuple[str, dict]]:
    return list(iter_events(response))


def add_dataset(db, *, num_images: int = 8, image_size: int = 64, seed: int = 0) -> str:
    """A generated shapes dataset under ``DATA_DIR/datasets/`` and its row, as an
    upload leaves them (job tests need no upload route); returns its id."""
    from app.store.db import DatasetRecord, new_id
    from model.training.synthetic import generate_dataset

    dataset_id = new_id("ds")
    path = f"datasets/{dataset_id}"
    coco = generate_dataset(
        db.objects.local(path), num_images=num_images, image_size=image_size, seed=seed,
        max_objects=3, min_radius=0.15, max_radius=0.3,
    )
    with db.session() as session:
        session.add(
            DatasetRecord(
                id=dataset_id, name="shapes", path=path, num_images=len(coco["images"]),
                num_annotations=len(coco["annotations"]), size_bytes=0,
                categories=[{"id": c["id"], "name": c["name"]} for c in coco["categories"]],
            )
        )
    return dataset_id


# -- model registry ---------------------------------------------------------------


def register_model(db, checkpoint: Path, **fields) -> str:
    """Copy ``checkpoint`` to ``DATA_DIR/models/<id>.safetensors`` and add its
    registry row, as a succeeded training job leaves them; returns the id."""
    import shutil

    from app.store.db import ModelRecord, new_id

    db.create_schema()
    model_id = fields.pop("id", None) or new_id("model")
    path = f"models/{model_id}.safetensors"
    db.objects.local(path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, db.objects.local(path))
    row = {"architecture": "maskrcnn_resnet50_fpn", "base_model": "demo"}
    row |= {"classes": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], **fields}
    with db.session() as session:
        session.add(ModelRecord(id=model_id, path=path, **row))
    return model_id


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def training_processes(job_id: str) -> list[int]:
    """Pids of live training processes for ``job_id``: its ``app.training.runner``
    processes, and for a job of several the launcher that started them."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            started = b"app.training.runner" in args or b"app.training.launch" in args
            if started and job_id.encode() in args:
                found.append(int(cmdline.parent.name))
    return found


def model_children(pid: int) -> list[int]:
    """Live ``multiprocessing`` spawned children of ``pid`` (model processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found
