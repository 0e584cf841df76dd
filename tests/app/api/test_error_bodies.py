"""Error bodies name nothing of the server: a registry model whose checkpoint is
truncated or gone answers an inference client with what failed and the request
id, the path and the reason going to the log; and every error code the app can
send is documented in docs/api.md.
(Every error body of every in-process test is checked for paths by
``tests/app/conftest.py``, and the whole suite must send every code.)"""

import logging
import threading

import pytest
import torch
from sqlalchemy.exc import OperationalError

from app.errors import UnavailableError
from app.store import registry
from tests.app.conftest import (
    ADMIN_TOKEN,
    REPO,
    bearer,
    fake_client,
    job_store,
    png_bytes,
    register_model,
    scene,
    wait_for,
)
from tests.app.errorbodies import codes_in_source
from tests.app.fakes import FakePredictor

INFERENCE = "inference-token-123"


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_broken_registry_checkpoint_answers_without_the_servers_paths(
    tmp_path, checkpoint, caplog, damage
):
    data_dir = tmp_path / "data"
    db = job_store(data_dir)
    model_id = register_model(db, checkpoint)
    db.dispose()
    file = data_dir / "models" / f"{model_id}.safetensors"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    else:
        file.unlink()
    tokens = {"api_tokens": INFERENCE, "admin_token": ADMIN_TOKEN}
    with fake_client(data_dir=data_dir, **tokens) as client, caplog.at_level(logging.ERROR):
        files = [("images", ("a.png", png_bytes(scene(64, 64, 0)), "image/png"))]
        response = client.post(
            "/v1/segment", files=files, data={"model": model_id}, headers=bearer(INFERENCE)
        )
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "model_error"
        assert error["request_id"] in error["message"] and "server log" in error["message"]
        for private in (str(data_dir), str(tmp_path), "safetensors", "MASKRCNN_DATA_DIR"):
            assert private not in error["message"]
        logged = [r.getMessage() for r in caplog.records if error["request_id"] in r.getMessage()]
        assert any(str(file) in line for line in logged), caplog.text  # the detail, for operators


def test_every_error_code_is_documented():
    codes = codes_in_source()
    assert {"busy", "too_many_jobs", "model_error", "validation_error"} <= codes
    documented = (REPO / "docs" / "api.md").read_text()
    assert not [code for code in sorted(codes) if f"`{code}`" not in documented]


PNG = png_bytes(scene(32, 32, 1))


def post_png(client, count: int = 1):
    files = [("images", (f"{i}.png", PNG, "image/png")) for i in range(count)]
    return client.post("/v1/segment", files=files)


def unreachable(*_args, **_kwargs):
    raise OSError("no network here")


def database_gone(*_args, **_kwargs):
    raise OperationalError("SELECT", {}, Exception("connection refused"))


# codes the rest of the suite meets only from servers in processes of their own:
# here in process, so that ``tests/app/conftest.py`` checks their bodies too
IN_PROCESS = {  # code: settings, what the fake model does once started, the request
    "bad_request": ({}, None, lambda c: c.get("/v1/models%0A")),
    "busy": ({"max_decode_memory_mb": 0.001}, None, post_png),
    "too_many_pixels": ({"max_request_pixels": 100}, None, post_png),
    "deadline_exceeded": ({"request_timeout_s": 0.3}, {"forward_s": 1.5}, post_png),
    "out_of_memory": ({}, {"oom_if": lambda images: True}, post_png),
    "model_unavailable": (
        {},
        {"fail_with": UnavailableError("the model process exited", code="model_unavailable")},
        post_png,
    ),
    "database_unavailable": ({}, None, lambda c: c.get("/v1/models")),  # with database_gone
    "weights_unavailable": (
        {},
        None,
        lambda c: c.post(
            "/v1/segment", files=[("images", ("a.png", PNG, "image/png"))], data={"model": "coco"}
        ),
    ),
}


@pytest.mark.parametrize("code", sorted(IN_PROCESS))
def test_errors_met_elsewhere_out_of_process_answer_in_process_too(code, tmp_path, monkeypatch):
    settings, behaviour, call = IN_PROCESS[code]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # COCO's weights not cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)  # nor fetched
    with fake_client(data_dir=tmp_path / "data", **settings) as client:
        for name, value in (behaviour or {}).items():  # after its warm-up
            setattr(client.predictor, name, value)
        monkeypatch.setattr(registry, "list_records", database_gone)
        response = call(client)
    assert response.json()["error"]["code"] == code, response.text


def test_a_full_queue_is_refused_in_process(tmp_path):
    predictor = FakePredictor()
    settings = {"max_batch_size": 1, "max_queue_size": 2, "max_images_per_request": 2}
    with fake_client(predictor, data_dir=tmp_path / "data", **settings) as client:
        predictor.gate = threading.Event()  # after the warm-up's forward
        warm = predictor.forwards_started
        first = threading.Thread(target=post_png, args=(client, 2))  # one held, one queued
        first.start()
        try:
            wait_for(
                lambda: predictor.forwards_started == warm + 1
                and client.app.state.service.batcher.depth == 1,
                30,
                "the first request to fill the queue",
            )
            response = post_png(client, 2)
        finally:
            predictor.gate.set()
            first.join(30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
