"""``/v1/models`` and activation on one replica, in process:
listing, auth, errors, the swap, following the database, start-up resolution."""

import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.errors import NotFoundError
from app.main import create_app
from app.serving.predictors import InProcessPredictor
from app.settings import load_settings
from app.store import registry
from app.store.db import Database, DatasetRecord, TrainingJobRecord
from model.errors import CheckpointError
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    bearer,
    job_store,
    make_checkpoint,
    png_bytes,
    register_model,
    served_model_id,
    wait_for,
    wait_ready,
)
from tests.app.fakes import INFO, FakePredictor

API = "api-secret-12"
PNG = png_bytes(np.full((24, 32, 3), 200, dtype=np.uint8))


def fake_loader(spec) -> FakePredictor:
    """A fake predictor named after the model asked for (``auto``: ``fake``);
    ``model-broken*`` ids fail to load as a corrupt file would."""
    name = spec.model_id or spec.source
    if name.startswith("model-broken"):
        raise CheckpointError(f"{name}.safetensors: not a readable safetensors file")
    predictor = FakePredictor()
    if name != "auto":
        predictor.info = dataclasses.replace(INFO, id=name)
    return predictor


@contextlib.contextmanager
def app_client(data_dir: Path, loader=fake_loader, **settings) -> Iterator[TestClient]:
    settings = {
        "max_batch_delay_ms": 2,
        "run_worker": False,
        "admin_token": ADMIN_TOKEN,
        **settings,
    }
    wrapped = loader and (lambda s: InProcessPredictor(loader(s)))  # None: the real one
    app = create_app(load_settings(data_dir=data_dir, **settings), load_predictor=wrapped)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout=60)
        yield client


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def db(data_dir) -> Iterator[Database]:
    database = job_store(data_dir)
    yield database
    database.dispose()


@pytest.fixture
def dummy(tmp_path) -> Path:
    """A file standing in for a checkpoint where a fake predictor is loaded."""
    path = tmp_path / "dummy.safetensors"
    path.write_bytes(b"not read by the fake loader")
    return path


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """A second tiny real model, different weights from ``checkpoint``."""
    return make_checkpoint(tmp_path_factory.mktemp("other") / "other.safetensors", seed=1)


def test_models_lists_the_served_model_first_then_registry_versions(data_dir, db, dummy):
    old = register_model(db, dummy, metrics={"segm_mAP": 0.25}, job_id="job-1", dataset_id="ds-1")
    time.sleep(0.01)
    new = register_model(db, dummy, base_model=old, classes=[{"id": 7, "name": "cat"}])
    with app_client(data_dir) as client:
        listing = client.get("/v1/models").json()
        assert listing["count"] == 3
        assert [m["id"] for m in listing["data"]] == ["fake", new, old]
        assert [m["active"] for m in listing["data"]] == [True, False, False]
        served, newest, oldest = listing["data"]
        assert (served["device"], served["precision"]) == ("cpu", "fp32")
        assert (newest["device"], newest["precision"]) == (None, None)
        assert newest["classes"] == [{"id": 7, "name": "cat"}]
        assert newest["base_model"] == old and newest["created_at"] > oldest["created_at"]
        assert oldest["metrics"] == {"segm_mAP": 0.25}
        assert (oldest["job_id"], oldest["dataset_id"], oldest["base_model"]) == (
            "job-1",
            "ds-1",
            "demo",
        )
        assert client.get(f"/v1/models/{old}").json() == oldest
        assert client.get("/v1/models/fake").json() == served
        error_of(client.get("/v1/models/model-nope"), 404, "not_found")


def test_activation_needs_the_admin_token(data_dir, db, dummy):
    model_id = register_model(db, dummy)
    path = f"/v1/models/{model_id}/activate"
    with app_client(data_dir, admin_token=None) as client:
        assert "MASKRCNN_ADMIN_TOKEN" in error_of(client.post(path), 403, "admin_disabled")
    with app_client(data_dir, api_tokens=API) as client:
        error_of(client.post(path), 401, "unauthorized")
        error_of(client.post(path, headers={"Authorization": f"Bearer {API}"}), 403, "forbidden")
        wrong = {"Authorization": "Bearer wrong-token"}
        error_of(client.post(path, headers=wrong), 401, "unauthorized")
        assert registry.read_activation(db) is None
        assert served_model_id(client, PNG, bearer(API)) == "fake"
        response = client.post(path, headers=AS_ADMIN)
        assert response.status_code == 200, response.text
        assert served_model_id(client, PNG, bearer(API)) == model_id


def test_unknown_or_broken_models_are_refused_and_change_nothing(data_dir, db, dummy):
    broken = register_model(db, dummy, id="model-broken1")
    with app_client(data_dir) as client:
        response = client.post("/v1/models/model-nope/activate", headers=AS_ADMIN)
        assert "model-nope" in error_of(response, 404, "not_found")
        message = error_of(
            client.post(f"/v1/models/{broken}/activate", headers=AS_ADMIN), 500, "activation_failed"
        )
        assert broken in message and "not a readable safetensors file" in message
        assert "still serving 'fake'" in message
        assert served_model_id(client, PNG) == "fake"
        assert registry.read_activation(db) is None
        assert 'maskrcnn_model_switches_total{result="failed"} 1.0' in client.get("/metrics").text


def test_an_activation_the_database_cannot_record_changes_nothing(
    data_dir, db, dummy, monkeypatch
):
    """Recorded before the swap: a replica never serves a model the others don't follow."""
    model_id = register_model(db, dummy)

    def unavailable(*_, **__):
        raise OperationalError("UPDATE meta", {}, Exception("database is gone"))

    with app_client(data_dir) as client:
        monkeypatch.setattr(registry, "write_activation", unavailable)
        message = error_of(
            client.post(f"/v1/models/{model_id}/activate", headers=AS_ADMIN),
            500,
            "activation_failed",
        )
        assert "database is gone" in message and "still serving 'fake'" in message
        assert served_model_id(client, PNG) == "fake"
        assert registry.read_activation(db) is None
        monkeypatch.undo()
        assert client.post(f"/v1/models/{model_id}/activate", headers=AS_ADMIN).status_code == 200
        assert served_model_id(client, PNG) == model_id


def test_activation_swaps_the_served_model_and_frees_the_old_one(data_dir, db, dummy):
    model_id = register_model(db, dummy, metrics={"bbox_mAP": 0.5})
    with app_client(data_dir) as client:
        old = weakref.ref(client.app.state.service.predictor)
        response = client.post(f"/v1/models/{model_id}/activate", headers=AS_ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["id"], body["active"], body["device"]) == (model_id, True, "cpu")
        assert body["metrics"] == {"bbox_mAP": 0.5}
        assert served_model_id(client, PNG) == model_id
        assert client.get("/readyz").json()["model"]["id"] == model_id
        flags = {m["id"]: m["active"] for m in client.get("/v1/models").json()["data"]}
        assert flags == {model_id: True, "fake": False}  # the start-up model stays listed
        assert registry.read_activation(db).model_id == model_id
        wait_for(lambda: old() is None, 10, "the old predictor was not freed")
        metrics = client.get("/metrics").text
        labels = f'architecture="fake_arch",device="cpu",id="{model_id}"'
        labels += ',precision="fp32",runtime="fake"'
        assert f"maskrcnn_model_info{{{labels}}} 1.0" in metrics
        assert 'id="fake"' not in metrics
        # back to the start-up model by its id, and to a built-in one by name
        assert client.post("/v1/models/fake/activate", headers=AS_ADMIN).json()["active"]
        assert served_model_id(client, PNG) == "fake"
        assert client.post("/v1/models/demo/activate", headers=AS_ADMIN).status_code == 200
        assert served_model_id(client, PNG) == "demo"
        assert registry.read_activation(db).model_id == "demo"


def test_a_registered_model_is_deleted_with_its_checkpoint_unless_in_use(data_dir, db, dummy):
    kept, gone = register_model(db, dummy), register_model(db, dummy)
    checkpoint = db.objects.local(f"models/{gone}.safetensors")
    assert checkpoint.is_file()
    job = TrainingJobRecord(id="job-uses", state="queued", dataset_id="ds-1", progress={},
                            config={"base_model": kept})  # fmt: skip
    with db.session() as session:
        session.add(job)
    with app_client(data_dir, api_tokens=API) as client:
        path = f"/v1/models/{gone}"
        inference = {"Authorization": f"Bearer {API}"}
        error_of(client.delete(path, headers=inference), 403, "forbidden")
        assert client.post(f"{path}/activate", headers=AS_ADMIN).status_code == 200
        message = error_of(client.delete(path, headers=AS_ADMIN), 409, "conflict")
        assert "is the active model" in message
        assert client.post("/v1/models/fake/activate", headers=AS_ADMIN).status_code == 200

        assert client.delete(path, headers=AS_ADMIN).status_code == 204
        assert not checkpoint.exists()
        error_of(client.get(path, headers=inference), 404, "not_found")
        error_of(client.delete(path, headers=AS_ADMIN), 404, "not_found")
        error_of(client.post(f"{path}/activate", headers=AS_ADMIN), 404, "not_found")

        message = error_of(client.delete(f"/v1/models/{kept}", headers=AS_ADMIN), 409, "conflict")
        assert "job-uses (queued)" in message
        assert "built-in" in error_of(client.delete("/v1/models/demo", headers=AS_ADMIN), 404,
                                      "not_found")  # fmt: skip
    assert registry.get_record(db, kept) is not None
    assert db.objects.local(f"models/{kept}.safetensors").is_file()


def test_a_version_deleted_while_it_loads_is_never_recorded_as_active(db, dummy):
    """Activation loads the model, then records it; a delete between the two wins."""
    model_id = register_model(db, dummy)
    assert registry.delete_record(db, model_id) == f"models/{model_id}.safetensors"
    with pytest.raises(NotFoundError, match="deleted while it was being activated"):
        registry.write_activation(db, model_id, registered=True)
    assert registry.read_activation(db) is None
    assert registry.write_activation(db, "demo").model_id == "demo"  # no row to check


def test_a_model_that_fails_its_warm_up_is_freed(data_dir, db, dummy):
    """A load that succeeded and a warm-up that did not (out of memory beside the
    served model, typically): nothing may keep the new model once the error is
    answered, not even the traceback an error report holds."""
    cold = register_model(db, dummy)
    loaded = []

    def loader(spec):
        predictor = fake_loader(spec)
        if spec.model_id == cold:
            predictor.oom_if = lambda images: True  # a fresh error at every call
            loaded.append(weakref.ref(predictor))
        return predictor

    with app_client(data_dir, loader=loader) as client:
        service = client.app.state.service
        reports = []
        original = service.models._switch

        async def switch_keeping_the_error(spec, **kwargs):
            try:
                await original(spec, **kwargs)
            except Exception as e:
                reports.append(e)  # as an error reporter would
                raise

        service.models._switch = switch_keeping_the_error
        response = client.post(f"/v1/models/{cold}/activate", headers=AS_ADMIN)
        assert "CUDA out of memory" in error_of(response, 500, "activation_failed")
        assert served_model_id(client, PNG) == "fake"
        assert len(loaded) == 1 and reports
        assert loaded[0]() is None, "the model that failed its warm-up is still in memory"


def test_a_replica_follows_the_database_and_survives_a_model_it_cannot_load(
    data_dir, db, dummy, caplog
):
    broken = register_model(db, dummy, id="model-broken2")
    good = register_model(db, dummy)
    with db.session() as session:
        session.add(DatasetRecord(id="ds-1", name="d", path="datasets/ds-1", num_images=1,
                                  num_annotations=1, categories=[], size_bytes=1))  # fmt: skip
        for n, state in enumerate(["queued", "queued", "failed"]):
            session.add(TrainingJobRecord(id=f"job-{n}", state=state, dataset_id="ds-1", config={}))
    with app_client(data_dir, model_poll_s=0.05) as client, caplog.at_level(logging.INFO):

        def metric(line: str) -> bool:
            return line in client.get("/metrics").text

        wait_for(lambda: metric('maskrcnn_training_jobs{state="queued"} 2.0'), 10, "jobs gauge")
        assert metric('maskrcnn_training_jobs{state="failed"} 1.0')
        assert metric('maskrcnn_training_jobs{state="running"} 0.0')

        registry.write_activation(db, broken)  # as another replica would
        wait_for(
            lambda: metric('maskrcnn_model_switches_total{result="failed"} 1.0'), 10, "failure"
        )
        time.sleep(0.3)  # several polls: the same activation is not retried
        assert metric('maskrcnn_model_switches_total{result="failed"} 1.0')
        assert served_model_id(client, PNG) == "fake"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(f"cannot switch to the activated model {broken!r}" in m for m in errors)

        registry.write_activation(db, good)
        wait_for(lambda: client.get("/readyz").json()["model"]["id"] == good, 10, "switch")
        assert served_model_id(client, PNG) == good
        registry.write_activation(db, broken)  # activated again: tried again
        wait_for(lambda: metric('maskrcnn_model_switches_total{result="failed"} 2.0'), 10, "retry")
        assert served_model_id(client, PNG) == good


# -- the real loader: registry ids resolve to their checkpoints ----------------------


def test_a_registry_id_as_maskrcnn_model_is_served_under_its_id(
    data_dir, db, checkpoint, other_checkpoint
):
    model_id = register_model(db, other_checkpoint, metrics={"segm_mAP": 0.1})
    with app_client(data_dir, loader=None, model=model_id, device="cpu") as client:
        assert client.get("/readyz").json()["model"] == {
            "id": model_id,
            "architecture": "maskrcnn_resnet50_fpn",
            "kind": "custom",
        }
        [served] = client.get("/v1/models").json()["data"]
        assert (served["id"], served["active"], served["device"]) == (model_id, True, "cpu")
        assert served["metrics"] == {"segm_mAP": 0.1}
        assert served_model_id(client, PNG) == model_id


def test_an_unknown_model_id_stops_start_up_with_a_clear_message(data_dir, db):
    app = create_app(load_settings(data_dir=data_dir, model="model-nope", run_worker=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: "failed" in client.get("/readyz").text, 10, "start-up failure")
        assert "failed to start" in error_of(client.get("/readyz"), 503, "not_ready")
        message = app.state.service.error  # the log's, and `maskrcnn serve`'s on exit
        assert "'model-nope'" in message and "nor a model id in the registry" in message


def test_restart_serves_the_active_model_and_can_go_back_to_its_own(
    data_dir, db, checkpoint, other_checkpoint, caplog
):
    model_id = register_model(db, other_checkpoint)
    broken = register_model(db, checkpoint, id="model-bad")
    db.objects.local(f"models/{broken}.safetensors").write_bytes(b"\x00" * 64)  # corrupt on disk
    registry.write_activation(db, model_id)
    settings = {"loader": None, "model": str(checkpoint), "device": "cpu"}
    with caplog.at_level(logging.INFO), app_client(data_dir, **settings) as client:
        assert client.get("/readyz").json()["model"]["id"] == model_id
        assert any(
            "the active model in the database (it overrides MASKRCNN_MODEL" in r.getMessage()
            for r in caplog.records
        )
        listing = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["active"]) for m in listing] == [
            (model_id, True),
            ("tiny", False),  # the start-up model, described without loading it
            (broken, False),
        ]
        assert listing[1]["classes"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]

        response = client.post(f"/v1/models/{broken}/activate", headers=AS_ADMIN)
        message = error_of(response, 500, "activation_failed")
        assert "model-bad.safetensors: not a readable safetensors file" in message
        assert served_model_id(client, PNG) == model_id

        response = client.post("/v1/models/tiny/activate", headers=AS_ADMIN)
        assert response.status_code == 200, response.text
        assert served_model_id(client, PNG) == "tiny"
        assert registry.read_activation(db).model_id == "tiny"
