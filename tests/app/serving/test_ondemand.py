"""The ``model`` option of ``/v1/segment*``: a request answered by a registry
model other than the served one, loaded on first use into a bounded cache, batched
apart from the served model's images, evicted after its last batch."""

import asyncio
import base64
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    detections_by,
    job_store,
    make_checkpoint,
    png_bytes,
    register_model,
    running_server,
    same_detections,
    scene,
    served_model_id,
    wait_for,
)
from tests.app.fakes import INFO, OPTS, FakePredictor, run, solid_image, started

IMAGE = scene(96, 96, 5)
PNG = png_bytes(IMAGE)


def segment(client, model: str | None = None, route: str = "/v1/segment"):
    files = [("images", ("image.png", PNG, "image/png"))]
    if route == "/v1/segment/visualize":
        files = [("image", ("image.png", PNG, "image/png"))]
    data = {"model": model} if model is not None else {}
    return client.post(route, files=files, data=data)


# -- the queue ---------------------------------------------------------------------------


def test_a_named_model_batches_apart_from_the_served_one():
    served, other = FakePredictor(), FakePredictor()
    other.info = dataclasses.replace(INFO, id="other")

    async def scenario():
        batcher = await started(served, max_batch_size=8, max_batch_delay_s=0.05)

        async def one(value, predictor):
            with batcher.admit(1, predictor) as ticket:
                deadline = time.monotonic() + 10
                [result] = await ticket.submit([solid_image(value)], [OPTS], deadline=deadline)
                return result.model.id

        named = [other if v % 2 else None for v in range(6)]
        ids = await asyncio.gather(*(one(v, p) for v, p in enumerate(named)))
        await batcher.stop()
        return ids

    ids = run(scenario())
    assert ids == ["fake", "other"] * 3
    assert sorted(round(s * 255) for b in served.batches for s in b) == [0, 2, 4]
    assert sorted(round(s * 255) for b in other.batches for s in b) == [1, 3, 5]


# -- a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The start-up checkpoint and two registered versions (other weights)."""
    root = tmp_path_factory.mktemp("ondemand")
    files = [make_checkpoint(root / f"seed{seed}.safetensors", seed=seed) for seed in (0, 1, 2)]
    db = job_store(root / "data")
    try:
        ids = [register_model(db, path) for path in files[1:]]
    finally:
        db.dispose()
    references = {
        model_id: detections_by(str(path), IMAGE)
        for model_id, path in zip(ids, files[1:], strict=True)
    }
    return root, files[0], ids, references


@pytest.fixture(scope="module")
def server(models):
    root, startup, _, _ = models
    with running_server(startup, root, model_cache_size="1", admin_token=ADMIN_TOKEN) as s:
        s.wait_ready()
        yield s


def detections(response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(d["class_id"], d["score"]) for d in response.json()["results"][0]["detections"]]


def test_each_request_is_answered_by_the_model_it_names(server, models):
    _, _, (first, second), references = models
    assert served_model_id(server.client, PNG) == "seed0"
    response = segment(server.client, first)
    assert response.json()["model"]["id"] == first
    assert same_detections(detections(response), references[first])

    body = {"images": [{"data": base64.b64encode(PNG).decode()}], "model": first}
    response = server.client.post("/v1/segment/json", json=body)
    assert response.json()["model"]["id"] == first
    assert same_detections(detections(response), references[first])
    drawn = segment(server.client, first, "/v1/segment/visualize")
    assert drawn.status_code == 200 and drawn.content.startswith(b"\x89PNG")

    # the cache holds one: the second model evicts the first after its last batch
    response = segment(server.client, second)
    assert response.json()["model"]["id"] == second
    assert same_detections(detections(response), references[second])
    wait_for(lambda: f"closed model {first!r}" in server.log(), 10, "the first model closed")
    assert served_model_id(server.client, PNG) == "seed0"  # the default path is unchanged
    assert segment(server.client, "seed0").json()["model"]["id"] == "seed0"


def test_concurrent_requests_for_a_model_share_one_load_and_never_mix(server, models):
    _, _, (first, second), references = models
    names = [first, None, second, None, first, second, None, first] * 2
    before = server.log().count("loaded model")
    barrier = threading.Barrier(len(names))

    def call(name):
        barrier.wait()
        response = segment(server.client, name)
        return response.json()["model"]["id"], detections(response)

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(call, names))
    for name, (model_id, found) in zip(names, answers, strict=True):
        assert model_id == (name or "seed0")
        if name is not None:
            assert same_detections(found, references[name])
    # with a cache of one, the two named models take turns, each load serving its waiters
    loads = server.log().count("loaded model") - before
    assert 1 <= loads <= names.count(first) + names.count(second)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("model-000000000000", 400, "unknown_model"),
        ("x" * 65, 422, "validation_error"),
        ("model-\x00", 422, "validation_error"),
    ],
)
def test_a_model_that_is_not_there_is_refused_clearly(server, model, status, code):
    response = segment(server.client, model)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if code == "unknown_model":
        assert "GET /v1/models" in response.json()["error"]["message"]
    assert served_model_id(server.client, PNG) == "seed0"  # and nothing else changed


def test_an_empty_form_field_means_the_served_model_and_an_empty_json_key_is_refused(server):
    assert segment(server.client, "").json()["model"]["id"] == "seed0"  # an HTML form's ""
    body = {"images": [{"data": base64.b64encode(PNG).decode()}], "model": ""}
    response = server.client.post("/v1/segment/json", json=body)
    assert response.status_code == 422
    assert "model" in response.json()["error"]["message"]


def test_a_cache_of_zero_serves_only_the_active_model(models, tmp_path):
    root, startup, (first, _), _ = models
    with running_server(startup, root, model_cache_size="0") as s:
        s.wait_ready()
        response = segment(s.client, first)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "unknown_model"
        assert "MODEL_CACHE_SIZE=0" in response.json()["error"]["message"]
        assert segment(s.client, "seed0").json()["model"]["id"] == "seed0"


def test_a_model_activated_after_its_load_on_request_is_kept_once(server, models):
    _, _, (first, _), references = models
    assert segment(server.client, first).json()["model"]["id"] == first  # in the cache
    activated = server.client.post(f"/v1/models/{first}/activate", headers=AS_ADMIN)
    assert activated.status_code == 200, activated.text
    try:
        closed = server.log().count(f"closed model {first!r}")
        response = segment(server.client, first)  # the served path now
        assert response.json()["model"]["id"] == first
        assert same_detections(detections(response), references[first])
        wait_for(
            lambda: server.log().count(f"closed model {first!r}") == closed + 1,
            10,
            "the cached copy closed",
        )
    finally:
        server.client.post("/v1/models/seed0/activate", headers=AS_ADMIN)
    assert served_model_id(server.client, PNG) == "seed0"
