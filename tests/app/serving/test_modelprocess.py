"""The model in processes of its own (``MASKRCNN_MODEL_PROCESSES``): the answers of
the in-process predictor, its errors carried over, the queue's out-of-memory
split unchanged; a pool's children forward batches at once; a child that dies
fails what waits on it with 503 and stops the service; closing and shutting down
leave no process behind."""

import asyncio
import concurrent.futures
import functools
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import BadRequestError, UnavailableError
from app.inputs.decoding import EncodedJpeg, decode_image
from app.main import create_app
from app.serving.loading import load_predictor, model_spec
from app.serving.modelprocess import ModelPool, ModelProcess
from app.serving.predictors import GPU_MODEL_PROCESSES, model_processes
from app.settings import load_settings
from model.errors import InvalidImageError, InvalidOptionError
from model.geometry import input_geometry
from model.inference.options import PredictOptions
from tests.app.conftest import (
    corrupt_jpeg,
    encode,
    job_store,
    model_children,
    png_bytes,
    register_model,
    running_server,
    scene,
    wait_for,
    wait_ready,
)
from tests.app.fakes import load_fake, run, solid_image, started, submit

IMAGES = [scene(96, 96, seed) for seed in range(3)] + [scene(64, 112, 3)]
TENSORS = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in IMAGES]


def running(process) -> bool:
    """Whether a child runs, by its sentinel: ``is_alive()`` would reap it too,
    racing the pool's own reaping."""
    return not wait([process.sentinel], 0)


def settings_for(model: str, tmp_path: Path, **values):
    return load_settings(model=model, device="cpu", data_dir=tmp_path / "data", **values)


def spec_for(model: str, tmp_path: Path, **values):
    return model_spec(settings_for(model, tmp_path, **values))


@pytest.mark.slow
def test_answers_as_the_predictor_in_this_process(checkpoint, tmp_path):
    spec = spec_for(str(checkpoint), tmp_path)
    local = load_predictor(spec)
    remote = ModelProcess(spec)
    try:
        assert remote.info == local.info
        assert (remote.device, remote.precision) == (local.device, local.precision)
        assert remote.runtime == local.runtime.name == "openvino"  # auto, on the CPU
        assert remote.input_geometry == input_geometry(local.network)
        options = [
            PredictOptions(),
            PredictOptions(mask_format="polygon", score_threshold=0.3),
            PredictOptions(mask_format="none", classes=frozenset({1})),
            PredictOptions(max_detections=2),
        ]
        expected = local.predict(TENSORS, options)
        got = remote.predict(TENSORS, options)
        assert sum(len(r.detections) for r in expected) > 0, "the test model should detect"
        for g, e in zip(got, expected, strict=True):
            assert (g.width, g.height) == (e.width, e.height)
            assert [d.class_id for d in g.detections] == [d.class_id for d in e.detections]
            for a, b in zip(g.detections, e.detections, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-5)
                assert a.box == pytest.approx(b.box, abs=1e-3)
                assert a.mask == b.mask
        # the child's errors come back as themselves
        with pytest.raises(InvalidOptionError, match="score_threshold"):
            remote.predict(TENSORS[:1], [PredictOptions(score_threshold=2.0)])
        with pytest.raises(InvalidImageError, match="uint8"):
            remote.predict([TENSORS[0].float()], [PredictOptions()])
        assert len(remote.predict(TENSORS[:1])) == 1  # and it goes on serving
        assert remote.predict([]) == local.predict([]) == []
        # JPEGs left encoded are decoded by the child, as here; one that does not
        # decode gets its error in its result's place, and the rest are answered
        jpegs = [encode(Image.fromarray(image), "JPEG", quality=95) for image in IMAGES[:2]]
        bad = jpeg_for_the_child(corrupt_jpeg(), "bad.jpg")
        mixed = [jpeg_for_the_child(jpegs[0]), TENSORS[2], bad]
        mixed.append(jpeg_for_the_child(jpegs[1]))
        decoded = [decode_image(data, max_pixels=10**6) for data in jpegs]
        expected = local.predict([decoded[0], TENSORS[2], decoded[1]])
        got = remote.predict(mixed)
        assert isinstance(got[2], BadRequestError) and got[2].code == "invalid_image"
        assert "bad.jpg: corrupt" in str(got[2])
        assert [r.detections for r in got[:2] + got[3:]] == [r.detections for r in expected]
        [failed] = remote.predict([bad])
        assert isinstance(failed, BadRequestError)
    finally:
        remote.close()
    assert not remote.process.is_alive()
    with pytest.raises(UnavailableError, match="closed"):
        remote.predict(TENSORS[:1])


def test_a_registry_model_is_resolved_here_and_its_process_reads_no_database(
    checkpoint, tmp_path
):
    """The spec a model process gets names the checkpoint itself: the child loads it
    with the database gone (it never opens one, nor reads the settings)."""
    data_dir = tmp_path / "data"
    db = job_store(data_dir)
    model_id = register_model(db, checkpoint)
    settings = load_settings(model=model_id, device="cpu", data_dir=data_dir)
    spec = model_spec(settings, db=db)
    db.dispose()
    (data_dir / "maskrcnn.db").unlink()
    assert spec.model_id == model_id and Path(spec.source).is_file()
    assert Path(spec.source).parent == data_dir / "models"
    remote = ModelProcess(spec)
    try:
        assert remote.info.id == model_id and remote.runtime == "openvino"
        [result] = remote.predict(TENSORS[:1])
        assert result.width == TENSORS[0].shape[2]
    finally:
        remote.close()


def jpeg_for_the_child(data: bytes, name: str = "image.jpg") -> EncodedJpeg:
    kept = decode_image(data, max_pixels=10**6, name=name, keep_jpeg=True)
    assert isinstance(kept, EncodedJpeg)
    return kept


def test_a_jpeg_the_model_process_cannot_decode_fails_alone_in_its_batch(tmp_path):
    """Over HTTP: with the children decoding JPEGs (as on a GPU), a corrupt one is
    queued and sent with the others, and only its own request gets the 400."""
    from fastapi.testclient import TestClient

    settings = settings_for(
        "demo", tmp_path, model_processes=1, max_batch_size=2, max_batch_delay_ms=10_000
    )

    def load(s):
        remote = ModelProcess(s, load=load_fake)
        assert not remote.decodes_jpeg  # on the CPU the HTTP process decodes
        remote.decodes_jpeg = True
        return remote

    # the size of corrupt_jpeg(): one bucket
    good = encode(Image.fromarray(np.full((30, 40, 3), 200, np.uint8)), "JPEG", quality=95)
    with TestClient(create_app(settings, load_predictor=load)) as client:
        wait_ready(client)

        def post(name: str, data: bytes) -> httpx.Response:
            return client.post("/v1/segment", files=[("images", (name, data, "image/jpeg"))])

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, ["good.jpg", "bad.jpg"], [good, corrupt_jpeg()]))
        metrics = client.app.state.service.batcher.metrics
        forwards, forwarded = metrics.forwards._value.get(), metrics.images_forwarded._value.get()
    assert answers[0].status_code == 200, answers[0].text
    [result] = answers[0].json()["results"]
    assert result["detections"][0]["score"] == pytest.approx(200 / 255, abs=2 / 255)
    assert answers[1].status_code == 400
    error = answers[1].json()["error"]
    assert error["code"] == "invalid_image" and error["message"].startswith("bad.jpg: corrupt")
    assert (forwards, forwarded) == (1, 2)  # one batch: the child found it corrupt


def test_auto_runs_the_model_in_processes_of_its_own_on_a_gpu_only(tmp_path, monkeypatch):
    def resolved(**values) -> int:
        return model_processes(load_settings(data_dir=tmp_path / "data", **values))

    assert resolved(device="cpu") == 0
    assert resolved(device="cuda:1") == GPU_MODEL_PROCESSES == 2
    assert resolved(device="cuda", model_processes=0) == 0
    assert resolved(device="cpu", model_processes=3) == 3
    for available, expected in [(True, GPU_MODEL_PROCESSES), (False, 0)]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolved(device="auto") == expected


def test_a_model_that_cannot_load_raises_its_error_and_leaves_no_process(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(Exception, match=r"missing\.safetensors") as caught:
        ModelProcess(spec_for(str(missing), tmp_path))
    assert not isinstance(caught.value, UnavailableError)
    assert model_children(os.getpid()) == []


def test_out_of_memory_in_the_child_splits_the_batch_as_in_process(tmp_path):
    load = functools.partial(load_fake, oom_over=1)
    remote = ModelProcess(spec_for("demo", tmp_path), load=load)

    async def scenario():
        batcher = await started(remote, max_batch_size=4, max_batch_delay_s=0.2)
        requests = [submit(batcher, [solid_image(v)]) for v in (10, 20, 30, 40)]
        results = await asyncio.gather(*requests)
        await batcher.stop()
        return results, batcher.metrics.oom_retries._value.get()

    try:
        results, retries = run(scenario())
    finally:
        remote.close()
    scores = [round(r[0].result.detections[0].score * 255) for r in results]
    assert scores == [10, 20, 30, 40]  # each answer is its own image's
    assert retries == 3  # 4 → 2 + 2 → 1 + 1 + 1 + 1


def test_a_child_that_dies_fails_waiting_calls_with_503_and_reports_it(tmp_path):
    exited = threading.Event()
    remote = ModelProcess(
        spec_for("demo", tmp_path),
        load=functools.partial(load_fake, forward_s=60),
        on_exit=exited.set,
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(remote.forward, [solid_image(1)], [PredictOptions()])
        # sent, and waiting for the child's minute-long forward (a look inside: no
        # public surface says it)
        wait_for(lambda: remote._waiting, 30, "the call to be sent")
        assert not waiting.done()
        os.kill(remote.process.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="exited") as caught:
            waiting.result(timeout=10)
    assert caught.value.code == "model_unavailable" and caught.value.status_code == 503
    assert exited.wait(5)
    with pytest.raises(UnavailableError):  # later calls fail at once
        remote.forward([solid_image(1)], [PredictOptions()])
    remote.close()  # closing a dead child does not hang


def test_a_pool_forwards_one_batch_per_child_at_once(tmp_path, caplog):
    pool = ModelPool(
        spec_for("demo", tmp_path), 2, load=functools.partial(load_fake, forward_s=0.6)
    )
    assert len(set(model_children(os.getpid()))) == 2
    assert all(running(child.process) for child in pool.children)
    assert (pool.info.id, pool.concurrency, pool.input_device.type) == ("fake", 2, "cpu")

    async def scenario():
        batcher = await started(pool, max_batch_size=1, max_batch_delay_s=0, concurrency=2)
        start = time.monotonic()
        results = await asyncio.gather(*(submit(batcher, [solid_image(v)]) for v in range(4)))
        elapsed = time.monotonic() - start
        await batcher.stop()
        return results, elapsed

    try:
        results, elapsed = run(scenario())
    finally:
        pool.close()
    assert [round(r[0].result.detections[0].score * 255) for r in results] == [0, 1, 2, 3]
    assert elapsed < 4 * 0.6 * 0.75, f"4 forwards of 0.6 s took {elapsed:.2f} s: not 2 at once"
    assert model_children(os.getpid()) == []
    assert "did not exit" not in caplog.text  # closed, not killed


def test_a_pool_whose_child_cannot_load_raises_its_error_and_leaves_no_process(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(Exception, match=r"missing\.safetensors"):
        ModelPool(spec_for(str(missing), tmp_path), 2)
    assert model_children(os.getpid()) == []


def test_a_pool_reports_a_dead_child(tmp_path):
    exited = threading.Event()
    pool = ModelPool(spec_for("demo", tmp_path), 2, load=load_fake, on_exit=exited.set)
    os.kill(pool.children[1].process.pid, signal.SIGKILL)
    assert exited.wait(10) and not running(pool.children[1].process)
    pool.close()
    assert model_children(os.getpid()) == []


def test_the_service_stops_when_its_model_process_dies_and_closes_it_at_shutdown(tmp_path):
    from fastapi.testclient import TestClient

    settings = settings_for("demo", tmp_path, model_processes=1)
    remote: list[ModelProcess] = []

    def load(s):
        remote.append(ModelProcess(s, load=functools.partial(load_fake)))
        return remote[-1]

    app = create_app(settings, load_predictor=load)
    fatal = []
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        service = app.state.service
        service.on_fatal = fatal.append
        files = [("images", ("a.png", png_bytes(IMAGES[0]), "image/png"))]
        response = client.post("/v1/segment", files=files)
        assert response.status_code == 200, response.text
        assert response.json()["model"]["id"] == "fake"
        [child] = remote
        os.kill(child.process.pid, signal.SIGKILL)
        wait_for(lambda: fatal, 10, "the service's fatal error")
        assert service.state == "failed" and "exited" in str(fatal[0])
        assert client.get("/readyz").status_code == 503

    settings = settings_for("demo", tmp_path, model_processes=1)
    with TestClient(create_app(settings, load_predictor=load)) as client:
        wait_ready(client)
        child = remote[-1]
        assert running(child.process)
    assert not child.process.is_alive()  # the lifespan's shutdown closed it


@pytest.mark.slow
def test_a_real_server_answers_from_its_model_process_and_drains_on_sigterm(checkpoint, tmp_path):
    from tests.app.conftest import detections_by, same_detections

    expected = [detections_by(str(checkpoint), image) for image in IMAGES]
    with running_server(checkpoint, tmp_path, model_processes=2, max_batch_size=4) as server:
        server.wait_ready()
        children = model_children(server.process.pid)
        assert len(children) == 2

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                files = [("images", (f"{i}.png", png_bytes(IMAGES[i % 4]), "image/png"))]
                return client.post("/v1/segment", files=files)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            wait_for(lambda: server.accepted() >= 8, 30, "all 8 requests to reach the server")
            # as systemd stops a unit: SIGTERM to every process; the HTTP process
            # drains, and the models answer what is in flight before they are closed
            for child in children:
                os.kill(child, signal.SIGTERM)
            server.terminate()
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 8
        for i, response in enumerate(responses):
            [result] = response.json()["results"]
            found = [(d["class_id"], d["score"]) for d in result["detections"]]
            assert same_detections(found, expected[i % 4])
        assert server.process.wait(30) in (0, -15), server.log()  # uvicorn re-raises SIGTERM
        assert "did not exit" not in server.log()  # the children were closed, not killed

        def gone() -> bool:
            return not any(Path(f"/proc/{child}").exists() for child in children)

        wait_for(gone, 10, "the model processes to exit")


@pytest.mark.slow
def test_a_real_server_exits_when_one_of_its_model_processes_is_killed(checkpoint, tmp_path):
    with running_server(checkpoint, tmp_path, model_processes=2) as server:
        server.wait_ready()
        first, second = model_children(server.process.pid)
        os.kill(first, signal.SIGKILL)
        assert server.process.wait(30) == 1
        assert "exited unexpectedly" in server.log()
        wait_for(lambda: not Path(f"/proc/{second}").exists(), 10, "the other child to exit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_processes_answer_as_in_process_and_leave_this_process_off_cuda(
    checkpoint, tmp_path
):
    """The children own the device and decode JPEGs there; this process (the HTTP
    server's) decodes other images on the CPU and creates no CUDA context."""
    spec = model_spec(
        load_settings(
            model=str(checkpoint), device="cuda", precision="fp16", data_dir=tmp_path / "data"
        )
    )
    initialized = torch.cuda.is_initialized()
    jpegs = [encode(Image.fromarray(image), "JPEG", quality=95) for image in IMAGES]
    remote = ModelPool(spec, 2)
    try:
        assert remote.device.type == "cuda" and remote.input_device.type == "cpu"
        assert remote.decodes_jpeg  # by nvJPEG, in the children
        got = [remote.predict(TENSORS) for _ in remote.children]  # they take turns
        got_jpegs = remote.predict([jpeg_for_the_child(data) for data in jpegs])
        assert torch.cuda.is_initialized() == initialized
        local = load_predictor(spec)
        expected = local.predict(TENSORS)
        on_device = [decode_image(data, max_pixels=10**6, device=local.device) for data in jpegs]
        assert all(image.device.type == "cuda" for image in on_device)
        expected_jpegs = local.predict(on_device)
    finally:
        remote.close()
    pairs = zip(got[0] + got[1] + got_jpegs, expected + expected + expected_jpegs, strict=True)
    for g, e in pairs:
        assert [d.class_id for d in g.detections] == [d.class_id for d in e.detections]
        for a, b in zip(g.detections, e.detections, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-3)
            assert a.box == pytest.approx(b.box, abs=0.5)
