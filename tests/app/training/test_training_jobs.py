"""``/v1/training-jobs``: validation, auth, cancel and the event
stream in-process; then real training jobs run by the worker embedded in a real
``maskrcnn serve``, followed over HTTP."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.routes.training_jobs import RETRY_MS
from app.store.db import DatasetRecord, ModelRecord, utcnow
from app.training import jobs
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    TINY_JOB,
    add_dataset,
    fake_client,
    job_store,
    read_events,
    running_server,
    set_job,
    training_processes,
    upload_dataset,
    wait_for,
)

INFERENCE = "inference-token-xyz"


# -- in-process: the API over the job store, no worker ---------------------------------


@pytest.fixture
def api():
    with fake_client(admin_token=ADMIN_TOKEN, api_tokens=INFERENCE, run_worker=False) as client:
        client.db = client.app.state.service.db
        client.dataset_id = add_dataset(client.db, num_images=2)
        yield client


def create(client, **body):
    return client.post(
        "/v1/training-jobs", json={"dataset_id": client.dataset_id, **body}, headers=AS_ADMIN
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/training-jobs"),
        ("GET", "/v1/training-jobs"),
        ("GET", "/v1/training-jobs/job-1"),
        ("GET", "/v1/training-jobs/job-1/events"),
        ("GET", "/v1/training-jobs/job-1/validation-image"),
        ("POST", "/v1/training-jobs/job-1/cancel"),
    ],
)
def test_every_route_needs_the_admin_token(api, method, path):
    expected = {
        None: (401, "unauthorized"),
        INFERENCE: (403, "forbidden"),  # an inference token never grants admin routes
        "not-a-token-at-all": (401, "unauthorized"),
    }
    for token, (status, code) in expected.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = api.request(method, path, headers=headers, json={})
        assert response.status_code == status, (token, response.text)
        assert response.json()["error"]["code"] == code


def test_without_an_admin_token_configured_training_is_refused():
    with fake_client(run_worker=False) as client:
        response = client.post("/v1/training-jobs", json={"dataset_id": "ds-x"}, headers=AS_ADMIN)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"
    assert "MASKRCNN_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_a_job_is_queued_with_defaults_and_listed_newest_first(api):
    response = create(api)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"].startswith("job-") and job["state"] == "queued"
    assert job["dataset_id"] == api.dataset_id
    assert job["config"] == {
        "base_model": "demo",
        "epochs": 10,
        "batch_size": 4,
        "learning_rate": 0.01,
        "image_size": None,
        "val_fraction": 0.1,
        "seed": 0,
        "processes": 1,
    }
    assert job["progress"] == {
        "epoch": 0,
        "epochs": 10,
        "step": 0,
        "total_steps": None,
        "loss": None,
        "eta_s": None,
    }
    assert job["metrics"] == [] and job["model_id"] is None and job["error"] is None
    assert job["started_at"] is None and not job["cancel_requested"]
    assert api.get(f"/v1/training-jobs/{job['id']}", headers=AS_ADMIN).json() == job

    later = [create(api, epochs=2).json()["id"], create(api, seed=3).json()["id"]]
    set_job(api.db, later[1], state="failed", error="x")
    listed = api.get("/v1/training-jobs", headers=AS_ADMIN).json()
    assert [j["id"] for j in listed["data"]] == [later[1], later[0], job["id"]]
    assert listed["count"] == 3
    queued = api.get("/v1/training-jobs", params={"state": "queued", "limit": 1}, headers=AS_ADMIN)
    assert [j["id"] for j in queued.json()["data"]] == [later[0]]


def test_unknown_job_is_404(api):
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/events")]:
        response = api.request(method, f"/v1/training-jobs/job-nope{path}", headers=AS_ADMIN)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert "job-nope" in response.json()["error"]["message"]


def test_bad_requests_are_refused_with_the_reason(api):
    response = api.post("/v1/training-jobs", json={"dataset_id": "ds-nope"}, headers=AS_ADMIN)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_dataset"
    assert "ds-nope" in response.json()["error"]["message"]

    response = create(api, base_model="model-nope")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_model" and "model-nope" in error["message"]

    for field, value in [
        ("epochs", 0),
        ("epochs", 10_000),
        ("batch_size", 0),
        ("learning_rate", 0),
        ("learning_rate", 5),
        ("val_fraction", 0.9),
        ("image_size", 8),
        ("seed", -1),
        ("processes", 0),
        ("surprise", 1),
    ]:
        response = create(api, **{field: value})
        assert response.status_code == 422, (field, value)
        error = response.json()["error"]
        assert error["code"] == "validation_error" and field in error["message"]
    response = api.get("/v1/training-jobs", params={"state": "done"}, headers=AS_ADMIN)
    assert response.status_code == 422
    assert list_count(api) == 0  # nothing was queued


def test_a_job_asks_for_at_most_the_processes_its_workers_run(api, tmp_path):
    """One a core here (no GPU), unless JOB_MAX_PROCESSES says what the workers run."""
    cores = len(os.sched_getaffinity(0))
    assert create(api, processes=cores).status_code == 202
    response = create(api, processes=cores + 1)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_many_processes"
    assert f"{cores + 1} asked, at most {cores} here" in error["message"]
    assert "MASKRCNN_JOB_MAX_PROCESSES" in error["message"]
    assert list_count(api) == 1

    settings = {"admin_token": ADMIN_TOKEN, "run_worker": False, "job_max_processes": 8}
    with fake_client(data_dir=tmp_path / "data", **settings) as client:
        client.dataset_id = add_dataset(client.app.state.service.db, num_images=2)
        assert create(client, processes=8).json()["config"]["processes"] == 8
        assert create(client, processes=9).json()["error"]["code"] == "too_many_processes"


def list_count(api) -> int:
    return api.get("/v1/training-jobs", headers=AS_ADMIN).json()["count"]


def test_a_registered_model_can_be_the_base(api):
    with api.db.session() as session:
        session.add(
            ModelRecord(
                id="model-abc",
                architecture="maskrcnn_small_fpn",
                path="models/model-abc.safetensors",
                classes=[],
                base_model="demo",
            )
        )
    response = create(api, base_model="model-abc")
    assert response.status_code == 202 and response.json()["config"]["base_model"] == "model-abc"
    for builtin in ("coco", "coco-v2", "scratch"):
        assert create(api, base_model=builtin).status_code == 202


@pytest.mark.parametrize("val_fraction", [0.5, 0.0])
def test_a_jobs_validation_image_is_one_the_job_holds_out(api, val_fraction):
    """The same split as training (``split_dataset`` with the job's fraction and
    seed); the whole dataset when it holds nothing out. Indices wrap around."""
    from model import CocoDataset, split_dataset

    db = api.db
    dataset_id = add_dataset(db, num_images=6, image_size=48, seed=3)
    job = create(api, dataset_id=dataset_id, val_fraction=val_fraction, seed=7).json()
    root = db.objects.local(db_dataset_path(db, dataset_id))
    full = CocoDataset(root)
    _, held_out = split_dataset(full, val_fraction, seed=7)
    expected = [(root / im["file_name"]).read_bytes() for im in (held_out or full).images]
    assert len(expected) == (3 if val_fraction else 6)

    url = f"/v1/training-jobs/{job['id']}/validation-image"
    for index in range(len(expected) + 1):
        response = api.get(url, params={"index": index}, headers=AS_ADMIN)
        assert response.status_code == 200, response.text
        assert response.content == expected[index % len(expected)]
        assert response.headers["content-type"] == "image/jpeg"  # the generator writes JPEGs

    assert api.get(url, params={"index": -1}, headers=AS_ADMIN).status_code == 422
    missing = api.get("/v1/training-jobs/job-000000000000/validation-image", headers=AS_ADMIN)
    assert missing.status_code == 404
    api.post(f"/v1/training-jobs/{job['id']}/cancel", headers=AS_ADMIN)
    assert api.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN).status_code == 204
    gone = api.get(url, headers=AS_ADMIN)
    assert gone.status_code == 404 and dataset_id in gone.json()["error"]["message"]


def db_dataset_path(db, dataset_id: str) -> str:
    with db.session() as session:
        return session.get(DatasetRecord, dataset_id).path


def test_cancel_a_queued_job_then_nothing_more(api):
    job = create(api).json()
    response = api.post(f"/v1/training-jobs/{job['id']}/cancel", headers=AS_ADMIN)
    assert response.status_code == 202
    cancelled = response.json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"] is not None
    again = api.post(f"/v1/training-jobs/{job['id']}/cancel", headers=AS_ADMIN)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    assert "cancelled" in again.json()["error"]["message"]

    done = create(api).json()
    set_job(api.db, done["id"], state="succeeded", model_id="model-x", finished_at=utcnow())
    response = api.post(f"/v1/training-jobs/{done['id']}/cancel", headers=AS_ADMIN)
    assert response.status_code == 409
    assert (
        api.get(f"/v1/training-jobs/{done['id']}", headers=AS_ADMIN).json()["state"] == "succeeded"
    )


def test_events_replay_a_finished_job_then_end(api):
    job = create(api, epochs=2).json()
    epoch = {"epoch": 1, "losses": {"loss": 1.5}, "bbox": {"AP": 0.25}, "segm": {"AP": 0.5}}
    progress = {"epoch": 2, "epochs": 2, "step": 8, "total_steps": 8, "loss": 1.0, "eta_s": 0}
    set_job(
        api.db,
        job["id"],
        state="failed",
        error="boom",
        progress=progress,
        metrics=[epoch, {**epoch, "epoch": 2}],
        finished_at=utcnow(),
    )
    with api.stream("GET", f"/v1/training-jobs/{job['id']}/events", headers=AS_ADMIN) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    assert [name for name, _ in events] == ["progress", "epoch", "epoch", "state", "done"]
    assert events[0][1] == progress
    assert events[1][1] == epoch and events[2][1]["epoch"] == 2
    assert events[3][1] == {"state": "failed", "error": "boom", "model_id": None}
    assert events[4][1]["id"] == job["id"] and events[4][1]["state"] == "failed"


def follow(response) -> Iterator[tuple[str, str, dict]]:
    """(id, event, data) of each server-sent event as it arrives, after checking the
    stream opens with its `retry:` advice and that no event lacks an id."""
    lines = response.iter_lines()
    assert [next(lines), next(lines)] == [f"retry: {RETRY_MS}", ""]
    fields: dict[str, str] = {}
    for line in lines:
        if line and not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value
        elif not line and fields:
            yield fields["id"], fields["event"], json.loads(fields["data"])
            fields = {}


def replay(client, job_id: str, last_id: str | None = None, **params) -> httpx.Response:
    headers = {**AS_ADMIN, "Last-Event-ID": last_id} if last_id is not None else AS_ADMIN
    return client.get(f"/v1/training-jobs/{job_id}/events", headers=headers, params=params)


def finished_job(api) -> str:
    job = create(api, epochs=2).json()
    epochs = [{"epoch": n, "losses": {"loss": 1.0 / n}, "bbox": None, "segm": None} for n in (1, 2)]
    progress = {"epoch": 2, "epochs": 2, "step": 8, "total_steps": 8, "loss": 0.5, "eta_s": 0}
    set_job(api.db, job["id"], state="succeeded", model_id="model-x", progress=progress,
            metrics=epochs, finished_at=utcnow())  # fmt: skip
    return job["id"]


def test_resuming_after_any_event_gives_exactly_the_rest(api):
    job_id = finished_job(api)
    full = list(follow(replay(api, job_id)))
    assert [name for _, name, _ in full] == ["progress", "epoch", "epoch", "state", "done"]
    ids = [tuple(map(int, event_id.split("."))) for event_id, _, _ in full]
    assert ids == sorted(set(ids)), ids  # strictly increasing
    for i, (event_id, _, _) in enumerate(full[:-1]):
        assert list(follow(replay(api, job_id, event_id))) == full[i + 1 :], event_id
        assert list(follow(replay(api, job_id, last_event_id=event_id))) == full[i + 1 :]
    # the header wins over the query parameter: an EventSource reconnecting to a URL
    # that carries the first id sends its newer one in the header
    resumed = replay(api, job_id, full[2][0], last_event_id=full[0][0])
    assert list(follow(resumed)) == full[3:]
    # after `done` there is nothing left: 204 tells an EventSource to stop reconnecting
    for done in (replay(api, job_id, full[-1][0]), replay(api, job_id, last_event_id=full[-1][0])):
        assert done.status_code == 204 and done.content == b""


@pytest.mark.parametrize(
    "garbled",
    [
        "",
        "garbage",
        "3.8",
        "3.8.2.1",
        " 3.8.2",
        "-1.0.0",
        "3.8.2x",
        "\u0663.8.2",  # Arabic-Indic 3: a digit to a regex, not to this format
        "5.8.2",  # a stage past done
        "2.9.2",  # a step the job never reached
        "2.8.3",  # an epoch it never finished
        "3.7.2",  # the final state without the last progress before it
        "4.0.0",  # `done` without anything before it
    ],
)
def test_an_id_that_this_job_never_sent_replays_everything(api, garbled):
    job_id = finished_job(api)
    full = list(follow(replay(api, job_id)))
    assert list(follow(replay(api, job_id, last_event_id=garbled))) == full
    if garbled.isascii() and garbled == garbled.strip():  # what a header can carry
        assert list(follow(replay(api, job_id, garbled))) == full


# -- real jobs in a real server ---------------------------------------------------


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """``maskrcnn serve`` with its embedded worker, and the job store it uses."""
    tmp = tmp_path_factory.mktemp("trainer")
    db = job_store(tmp / "data")
    env = {
        "admin_token": ADMIN_TOKEN,
        "job_heartbeat_s": 0.5,
        "job_heartbeat_timeout_s": 5,
        "worker_poll_s": 0.2,
    }
    with running_server(Path("demo"), tmp, **env) as server:
        server.db = db
        server.dataset_id = add_dataset(db, num_images=8)
        server.wait_ready()
        yield server
    db.dispose()


def post_job(server, **body) -> dict:
    body = {"dataset_id": server.dataset_id, **body}
    response = server.client.post("/v1/training-jobs", json=body, headers=AS_ADMIN)
    assert response.status_code == 202, response.text
    return response.json()


def get_job(server, job_id: str) -> dict:
    return server.client.get(f"/v1/training-jobs/{job_id}", headers=AS_ADMIN).json()


def model_files(server) -> list[str]:
    models = server.db.data_dir / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


@pytest.fixture(scope="module")
def follower(tmp_path_factory):
    """``maskrcnn serve`` without a worker, and its job store: tests move jobs along
    there, as a worker on another replica would."""
    tmp = tmp_path_factory.mktemp("follower")
    db = job_store(tmp / "data")
    with running_server(Path("demo"), tmp, admin_token=ADMIN_TOKEN, run_worker="false") as server:
        server.db = db
        server.dataset_id = add_dataset(db, num_images=2)
        server.wait_listening()
        yield server
    db.dispose()


def test_a_client_that_reconnects_misses_nothing_and_gets_nothing_twice(follower):
    """Over real HTTP: follow a running job, drop the connection, let the job move
    on, reconnect with the last id; then resume once more on another server (a
    second replica on the same store) to the end."""
    db, job_id = follower.db, post_job(follower, epochs=2)["id"]
    url = f"/v1/training-jobs/{job_id}/events"

    def progress(step: int) -> dict:
        return {"epoch": 1 + step // 4, "epochs": 2, "step": step, "total_steps": 8,
                "loss": 1.0 / step, "eta_s": 8.0 - step}  # fmt: skip

    def epoch(n: int) -> dict:
        return {"epoch": n, "losses": {"loss": 1.0 / n}, "bbox": None, "segm": None}

    set_job(db, job_id, state="running", started_at=utcnow(), progress=progress(1))
    with follower.client.stream("GET", url, headers=AS_ADMIN) as response:
        events = follow(response)
        got = [next(events), next(events)]
    assert [(name, data) for _, name, data in got] == [
        ("state", {"state": "running", "error": None, "model_id": None}),
        ("progress", progress(1)),
    ]

    # while the client is away: the first epoch ends, and a later step
    set_job(db, job_id, progress=progress(4), metrics=[epoch(1)])
    set_job(db, job_id, progress=progress(5))
    # a garbled id replays from the start (still "running" first)
    with follower.client.stream("GET", url, headers={**AS_ADMIN, "Last-Event-ID": "??"}) as r:
        assert next(follow(r))[1:] == got[0][1:]

    with follower.client.stream(
        "GET", url, headers={**AS_ADMIN, "Last-Event-ID": got[-1][0]}
    ) as response:
        events = follow(response)
        got += [next(events), next(events)]  # what it missed: the latest progress, epoch 1
        set_job(db, job_id, progress=progress(8), metrics=[epoch(1), epoch(2)])
        got.append(next(events))  # seen live: the next step, not yet the epoch
    assert [(name, data) for _, name, data in got[2:]] == [
        ("progress", progress(5)),
        ("epoch", epoch(1)),
        ("progress", progress(8)),
    ]

    set_job(db, job_id, state="succeeded", model_id="model-x", finished_at=utcnow())
    with fake_client(admin_token=ADMIN_TOKEN, run_worker=False, data_dir=db.data_dir) as other:
        got += list(follow(replay(other, job_id, got[-1][0])))
        assert replay(other, job_id, got[-1][0]).status_code == 204
    names = [name for _, name, _ in got]
    assert names == ["state", "progress", "progress", "epoch", "progress", "epoch", "state", "done"]
    assert got[5][2] == epoch(2) and got[6][2]["state"] == "succeeded"
    assert got[-1][2] == get_job(follower, job_id)
    ids = [tuple(map(int, event_id.split("."))) for event_id, _, _ in got]
    assert ids == sorted(set(ids)), ids  # strictly increasing across all four connections


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_upload_train_follow_and_find_the_new_model(trainer, tmp_path, processes):
    """End to end over HTTP: upload a generated dataset zip, train one epoch from
    ``demo`` (in one process, or two under torchrun: DDP with gloo), follow the events
    to ``succeeded``, find the version in the registry."""
    from model.inference.predictor import Predictor
    from model.loading import load_model
    from model.training.dataset import CocoDataset, split_dataset
    from model.training.evaluation import evaluate_predictor
    from model.training.synthetic import generate_dataset

    generate_dataset(
        tmp_path / "shapes.zip",
        num_images=8,
        image_size=64,
        seed=5,
        max_objects=3,
        min_radius=0.15,
        max_radius=0.3,
    )
    upload = upload_dataset(trainer.client, (tmp_path / "shapes.zip").read_bytes(), "shapes.zip")
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]

    body = {**TINY_JOB, "val_fraction": 0.25, "processes": processes}
    job = post_job(trainer, **body, dataset_id=dataset_id)
    url = f"/v1/training-jobs/{job['id']}/events"
    with trainer.client.stream("GET", url, headers=AS_ADMIN, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)  # returns only because the server ends the stream
    names = [name for name, _ in events]
    assert names[-2:] == ["state", "done"], names
    states = [data["state"] for name, data in events if name == "state"]
    assert states[-1] == "succeeded" and "running" in states, states
    progress = [data for name, data in events if name == "progress"]
    # 6 training images, 2 a step: each process steps through its share
    assert progress[-1]["step"] == progress[-1]["total_steps"] == {1: 3, 2: 2}[processes]
    [epoch] = [data for name, data in events if name == "epoch"]
    assert epoch["epoch"] == 1 and epoch["losses"]["loss"] > 0
    assert {"AP", "AP50", "AR100"} <= set(epoch["bbox"]) and {"AP", "AP50"} <= set(epoch["segm"])

    final = events[-1][1]
    assert final == get_job(trainer, job["id"])
    assert final["error"] is None and final["metrics"] == [epoch]
    model_id = final["model_id"]
    assert model_id == "model-" + job["id"].removeprefix("job-")
    assert f"{model_id}.safetensors" in model_files(trainer)
    assert not [name for name in model_files(trainer) if ".tmp" in name or ".partial" in name]
    with trainer.db.session() as session:
        record = session.get(ModelRecord, model_id)
        dataset_path = session.get(DatasetRecord, dataset_id).path
    assert record.path == f"models/{model_id}.safetensors" and record.job_id == job["id"]
    assert (record.dataset_id, record.base_model) == (dataset_id, "demo")
    assert record.metrics == {"bbox": epoch["bbox"], "segm": epoch["segm"]}
    assert record.classes == [
        {"id": c["id"], "name": c["name"]} for c in upload.json()["categories"]
    ]
    listed = trainer.client.get(f"/v1/models/{model_id}").json()
    assert (listed["id"], listed["job_id"], listed["metrics"]) == (
        model_id,
        job["id"],
        record.metrics,
    )

    # the checkpoint holds what the record says, and the metrics are its COCO mAP on
    # the validation split, re-measured here with pycocotools
    loaded = load_model(str(trainer.db.objects.local(record.path)))
    meta = loaded.info.metadata
    assert (meta["job_id"], meta["dataset_id"]) == (job["id"], dataset_id)
    assert meta["classes"] == record.classes and meta["arch_kwargs"]["min_size"] == 64
    assert meta["training"]["processes"] == processes
    _, val_set = split_dataset(CocoDataset(trainer.db.objects.local(dataset_path)), 0.25, seed=0)
    measured = evaluate_predictor(Predictor(loaded.network, loaded.info), val_set)
    for iou_type in ("bbox", "segm"):
        for stat in ("AP", "AP50", "AR100"):
            assert measured[iou_type][stat] == pytest.approx(epoch[iou_type][stat], abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_cancelling_a_running_job_stops_its_training(trainer, processes):
    job = post_job(trainer, **{**TINY_JOB, "epochs": 500}, val_fraction=0, processes=processes)
    running = wait_for(
        lambda: (j := get_job(trainer, job["id"]))["progress"]["step"] >= 1 and j,
        60,
        "the job to train",
    )
    assert running["state"] == "running" and training_processes(job["id"])

    # a client that stops following: its stream ends (no request left in flight but
    # the /metrics one that asks)
    with httpx.Client(base_url=trainer.url, timeout=30) as follower:
        url = f"/v1/training-jobs/{job['id']}/events"
        with follower.stream("GET", url, headers=AS_ADMIN) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert trainer.metric("maskrcnn_http_requests_in_flight") == 2
    wait_for(
        lambda: trainer.metric("maskrcnn_http_requests_in_flight") == 1, 10, "the stream to end"
    )

    response = trainer.client.post(f"/v1/training-jobs/{job['id']}/cancel", headers=AS_ADMIN)
    assert response.status_code == 202
    assert response.json()["cancel_requested"] and response.json()["state"] == "running"
    cancelled = wait_for(
        lambda: (j := get_job(trainer, job["id"]))["state"] != "running" and j, 20, "cancel"
    )
    assert cancelled["state"] == "cancelled" and cancelled["error"] is None
    assert cancelled["model_id"] is None and cancelled["finished_at"] is not None
    wait_for(lambda: not training_processes(job["id"]), 10, "the training process to end")
    assert not any(job["id"].removeprefix("job-") in name for name in model_files(trainer))
    with trainer.db.session() as session:
        assert session.query(ModelRecord).filter_by(job_id=job["id"]).count() == 0


@pytest.mark.slow
def test_a_job_that_cannot_train_fails_with_the_reason(trainer):
    broken = add_dataset(trainer.db, num_images=2)
    folder = trainer.db.objects.local(f"datasets/{broken}")
    (folder / "annotations.json").write_text('{"images": [], "annotations": [], "categories": []}')
    job = post_job(trainer, **TINY_JOB, dataset_id=broken)
    failed = wait_for(
        lambda: (j := get_job(trainer, job["id"]))["state"] not in ("queued", "running") and j,
        60,
        "the job to end",
    )
    assert failed["state"] == "failed", failed
    assert "invalid COCO dataset" in failed["error"]
    assert "expected at least one category" in failed["error"]
    assert failed["model_id"] is None


@pytest.mark.slow
def test_a_stopping_server_fails_its_running_job_with_the_reason(trainer):
    """Last in this module: it stops the module's server."""
    job = post_job(trainer, **{**TINY_JOB, "epochs": 500})
    wait_for(lambda: training_processes(job["id"]), 30, "the training process")
    trainer.terminate()  # SIGTERM: drain, then the embedded worker stops
    assert trainer.process.wait(30) in (0, -15)  # uvicorn re-raises the signal it handled
    stopped = jobs.get_job(trainer.db, job["id"])
    assert stopped.state == "failed" and "shut down while the job ran" in stopped.error
    wait_for(lambda: not training_processes(job["id"]), 10, "the training process to end")


def test_past_max_queued_jobs_a_job_is_refused_until_one_starts_or_ends(tmp_path):
    settings = {"admin_token": ADMIN_TOKEN, "run_worker": False, "max_queued_jobs": 3}
    with fake_client(data_dir=tmp_path / "data", **settings) as client:
        client.dataset_id = add_dataset(client.app.state.service.db, num_images=2)
        queued = [create(client).json()["id"] for _ in range(3)]
        response = create(client)
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_jobs" and "MAX_QUEUED_JOBS" in error["message"]
        assert "at most 3" in error["message"]
        listed = client.get("/v1/training-jobs", headers=AS_ADMIN).json()
        assert listed["count"] == 3  # the refused one left nothing
        assert client.post(f"/v1/training-jobs/{queued[0]}/cancel", headers=AS_ADMIN).is_success
        assert create(client).status_code == 202
