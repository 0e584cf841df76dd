"""Zero-downtime activation: the queue swaps models between batches,
and real ``maskrcnn serve`` replicas switch under load without failing a request,
together when they share a PostgreSQL database. (A restart serving the active
version is in ``tests/app/store/test_registry.py``.)"""

import asyncio
import contextlib
import dataclasses
import gc
import threading
import weakref
from pathlib import Path

import pytest

from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    Traffic,
    detections_by,
    job_store,
    make_checkpoint,
    model_children,
    png_bytes,
    register_model,
    running_server,
    same_detections,
    scene,
    served_model_id,
    wait_for,
)
from tests.app.fakes import INFO, FakePredictor, run, solid_image, started, submit, until

IMAGE = scene(96, 96, 3)
PNG = png_bytes(IMAGE)


# -- the queue -------------------------------------------------------------------------


def test_a_swap_lets_admitted_requests_finish_on_the_old_model_and_never_mixes_batches():
    old, new = FakePredictor(forward_s=0.02), FakePredictor()
    new.info = dataclasses.replace(INFO, id="new")
    old.gate = threading.Event()  # the old model's first forward hangs until released

    async def scenario():
        batcher = await started(old, max_batch_size=2)
        before = [asyncio.create_task(submit(batcher, [solid_image(v)])) for v in (1, 2, 3)]
        await until(
            lambda: old.forwards_started == 1 and batcher.depth == 1,
            "1 and 2 in a forward, 3 queued",
        )
        assert batcher.swap(new) is old
        after = [asyncio.create_task(submit(batcher, [solid_image(v)])) for v in (4, 5)]
        retired = asyncio.create_task(batcher.retire(old))
        await until(lambda: batcher.depth == 3, "4 and 5 queued behind 3")
        assert not retired.done(), "the old model still has a batch and a queued image"
        assert new.batches == []  # its images wait behind the old model's, in the same loop
        old.gate.set()
        results = await asyncio.gather(*before, *after)
        await asyncio.wait_for(retired, 5)
        assert old not in batcher._users  # the queue keeps no reference to it
        await batcher.stop()
        return results

    results = run(scenario())
    assert [r[0].model.id for r in results] == ["fake", "fake", "fake", "new", "new"]
    assert sorted(round(s * 255) for b in old.batches for s in b) == [1, 2, 3]
    assert sorted(round(s * 255) for b in new.batches for s in b) == [4, 5]


def test_a_retired_model_is_freed_though_no_batch_follows():
    """The queue's dispatch loop, idle after the old model's last batch, must not
    keep that batch (its items and outputs name the old model) while it waits."""
    old, new = FakePredictor(), FakePredictor()
    new.info = dataclasses.replace(INFO, id="new")
    gone = weakref.ref(old)

    async def scenario():
        nonlocal old
        batcher = await started(old)
        await submit(batcher, [solid_image(1)])
        assert batcher.swap(new) is old
        await asyncio.wait_for(batcher.retire(old), 5)
        old = None
        gc.collect()
        alive = gone() is not None  # the batcher is still running, idle
        await batcher.stop()
        return alive

    assert not run(scenario()), "the idle queue still holds the retired model"


# -- real servers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("new") / "new.safetensors", seed=1)


@pytest.fixture(scope="module")
def references(checkpoint, new_checkpoint) -> dict[Path, list[tuple[int, float]]]:
    """``IMAGE``'s detections by each checkpoint."""
    found = {path: detections_by(str(path), IMAGE) for path in (checkpoint, new_checkpoint)}
    old, new = found.values()
    assert old and new and not same_detections(old, new), "the models must tell apart"
    return found


@pytest.mark.slow
@pytest.mark.parametrize("model_processes", [0, 2])
def test_activation_under_load_fails_no_request_and_switches_once(
    checkpoint, new_checkpoint, references, tmp_path, model_processes
):
    data = tmp_path / "data"
    db = job_store(data)
    new = register_model(db, new_checkpoint)
    broken = register_model(db, new_checkpoint, id="model-broken")
    db.objects.local(f"models/{broken}.safetensors").write_bytes(b"truncated")
    db.dispose()
    env = {"data_dir": data, "admin_token": ADMIN_TOKEN, "max_batch_size": 4, "run_worker": "false"}
    env["model_processes"] = model_processes
    with running_server(checkpoint, tmp_path, **env) as server:
        server.wait_ready()
        children = model_children(server.process.pid)
        assert len(children) == model_processes
        with Traffic(server.url, PNG) as traffic:
            traffic.wait_for("tiny")
            response = server.client.post(f"/v1/models/{broken}/activate", headers=AS_ADMIN)
            assert response.status_code == 500, response.text
            assert response.json()["error"]["code"] == "activation_failed"
            traffic.wait_for("tiny", count=4)
            response = server.client.post(f"/v1/models/{new}/activate", headers=AS_ADMIN)
            assert response.status_code == 200, response.text
            assert response.json()["id"] == new and response.json()["active"] is True
            assert served_model_id(server.client, PNG) == new
            traffic.wait_for(new, count=3)
        expected = {"tiny": references[checkpoint], new: references[new_checkpoint]}
        traffic.check(["tiny", new], expected)
        flags = {m["id"]: m["active"] for m in server.client.get("/v1/models").json()["data"]}
        assert flags == {new: True, "tiny": False, broken: False}
        freed = "freed model 'tiny' after its last batch"
        wait_for(lambda: freed in server.log(), 10, f"{freed!r} in {server.log_path}")
        # the old model's processes exited, the new one's serve
        serving = model_children(server.process.pid)
        assert len(serving) == model_processes and not set(serving) & set(children)


@pytest.mark.slow
def test_replicas_sharing_postgresql_switch_together(
    checkpoint, new_checkpoint, references, postgres_url, tmp_path
):
    data = tmp_path / "data"
    db = job_store(data, postgres_url)
    new = register_model(db, new_checkpoint)
    db.dispose()
    poll_s = 0.5
    env = {"data_dir": data, "database_url": postgres_url, "admin_token": ADMIN_TOKEN}
    env |= {"model_poll_s": poll_s, "run_worker": "false"}
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(running_server(checkpoint, tmp_path, **env))
        b = stack.enter_context(running_server(checkpoint, tmp_path, **env))
        a.wait_ready()
        b.wait_ready()
        with Traffic(a.url, PNG) as on_a, Traffic(b.url, PNG, clients=1) as on_b:
            on_a.wait_for("tiny")
            on_b.wait_for("tiny")
            response = a.client.post(f"/v1/models/{new}/activate", headers=AS_ADMIN)
            assert response.status_code == 200, response.text
            assert served_model_id(a.client, PNG) == new  # a swapped before answering
            followed_s = on_b.wait_for(new, count=1)
            on_b.wait_for(new)
        print(f"replica b served {new} {followed_s:.1f} s after the activation through a")
        expected = {"tiny": references[checkpoint], new: references[new_checkpoint]}
        on_a.check(["tiny", new], expected)
        on_b.check(["tiny", new], expected)
        assert "was activated; switching to it" in b.log()
        for server in (a, b):
            [served] = [m for m in server.client.get("/v1/models").json()["data"] if m["active"]]
            assert served["id"] == new
