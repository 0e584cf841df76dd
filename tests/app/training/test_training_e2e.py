"""Issue 6's acceptance test, over real HTTP on one ``maskrcnn serve``
with its embedded worker: upload a generated dataset, train one epoch from
``demo``, follow the job's events to ``succeeded``, activate the new version and
get answers from it, while another client's segment requests, sent the whole
time, all succeed."""

from pathlib import Path

import pytest

from model.training.synthetic import SyntheticConfig, generate_dataset, render_image
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    TINY_JOB,
    Traffic,
    detections_by,
    iter_events,
    png_bytes,
    running_server,
    same_detections,
    served_model_id,
    upload_dataset,
    wait_for,
)

SHAPES = {"image_size": 64, "max_objects": 3, "min_radius": 0.15, "max_radius": 0.3}
# a shapes image none of the datasets hold (its own seed), 96 px: demo finds shapes in it
IMAGE, _ = render_image(SyntheticConfig(**{**SHAPES, "image_size": 96}, seed=99), 0)
PNG = png_bytes(IMAGE)


@pytest.mark.slow
def test_upload_train_follow_activate_while_segment_requests_all_succeed(tmp_path):
    dataset_zip = tmp_path / "shapes.zip"
    generate_dataset(dataset_zip, num_images=10, seed=5, **SHAPES)
    env = {"admin_token": ADMIN_TOKEN, "worker_poll_s": 0.2}
    with running_server(Path("demo"), tmp_path, **env) as server:
        server.wait_ready()
        client = server.client
        with Traffic(server.url, PNG, clients=1) as traffic:
            traffic.wait_for("demo", count=1)

            uploaded = upload_dataset(client, dataset_zip.read_bytes(), "shapes.zip")
            assert uploaded.status_code == 201, uploaded.text
            assert uploaded.json()["num_images"] == 10
            body = {"dataset_id": uploaded.json()["id"], **TINY_JOB, "val_fraction": 0.2}
            created = client.post("/v1/training-jobs", json=body, headers=AS_ADMIN)
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]

            # follow the job; note how many segment answers came while it ran
            events, answered = [], {}
            url = f"/v1/training-jobs/{job_id}/events"
            with client.stream("GET", url, headers=AS_ADMIN, timeout=120) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                for name, data in iter_events(response):  # until the server ends the stream
                    events.append((name, data))
                    if name == "state":
                        answered.setdefault(data["state"], traffic.count())

            states = [data["state"] for name, data in events if name == "state"]
            assert [name for name, _ in events][-2:] == ["state", "done"], events
            assert "running" in states and states[-1] == "succeeded", states
            [epoch] = [data for name, data in events if name == "epoch"]
            assert epoch["epoch"] == 1 and epoch["losses"]["loss"] > 0
            assert {"AP", "AP50"} <= set(epoch["bbox"]) and {"AP", "AP50"} <= set(epoch["segm"])
            job = events[-1][1]
            assert (job["state"], job["error"], job["metrics"]) == ("succeeded", None, [epoch])
            new = job["model_id"]
            assert new and new.startswith("model-")
            during_training = answered["succeeded"] - answered["running"]
            assert during_training >= 10, answered

            activated = client.post(f"/v1/models/{new}/activate", headers=AS_ADMIN)
            assert activated.status_code == 200, activated.text
            assert (activated.json()["id"], activated.json()["active"]) == (new, True)
            assert served_model_id(client, PNG) == new  # swapped before answering
            traffic.wait_for(new, count=3)

        # every request succeeded; demo answered until the switch, then the new
        # version, never demo again; and each answer is what its model detects
        checkpoint = tmp_path / "data" / "models" / f"{new}.safetensors"
        references = {"demo": detections_by("demo", IMAGE)}
        references[new] = detections_by(str(checkpoint), IMAGE)
        assert not same_detections(*references.values()), references
        traffic.check(["demo", new], references)
        print(f"{traffic.count()} segment requests, {during_training} while the job ran")

        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert {model_id: m["active"] for model_id, m in listed.items()} == {
            new: True,
            "demo": False,
        }
        assert listed[new]["metrics"] == {"bbox": epoch["bbox"], "segm": epoch["segm"]}
        assert (listed[new]["job_id"], listed[new]["base_model"]) == (job_id, "demo")
        freed = "freed model 'demo' after its last batch"
        wait_for(lambda: freed in server.log(), 10, f"{freed!r} in {server.log_path}")
