"""Past one machine: two API replicas and a worker, each with a ``DATA_DIR`` of its
own, that share only PostgreSQL and an S3 bucket (moto's S3 API server on
loopback). A dataset uploaded through one replica trains on the worker in a job
of two processes; the model, activated through the other replica, is served by
both; every file is in the bucket, and deleting the dataset or the model deletes
its objects."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from model.checkpoint import read_checkpoint
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    REPO,
    ServerProcess,
    bucket_keys,
    kept_variable,
    new_bucket,
    png_bytes,
    s3_server,
    scene,
    throwaway_database,
    upload_dataset,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def storage(tmp_path, monkeypatch) -> Iterator[str]:
    with s3_server(tmp_path / "moto.log") as endpoint:
        yield new_bucket(endpoint, monkeypatch)


def settings(storage_url: str, database_url: str, data_dir) -> dict[str, str]:
    return {
        "MASKRCNN_STORAGE_URL": storage_url,
        "MASKRCNN_DATABASE_URL": database_url,
        "MASKRCNN_DATA_DIR": str(data_dir),
        "MASKRCNN_RUN_WORKER": "false",
        "MASKRCNN_ADMIN_TOKEN": ADMIN_TOKEN,
        "MASKRCNN_JOB_MAX_PROCESSES": "2",
        "MASKRCNN_JOB_HEARTBEAT_S": "1",
        "MASKRCNN_WORKER_POLL_S": "0.2",
        "MASKRCNN_MODEL_POLL_S": "0.5",
    }


def segment_with(replica: ServerProcess) -> str:
    """The id of the model that answered a segment request on ``replica``."""
    files = [("images", ("a.png", png_bytes(scene(96, 96, 1)), "image/png"))]
    response = replica.client.post("/v1/segment", files=files)
    assert response.status_code == 200, response.text
    return response.json()["model"]["id"]


def test_replicas_and_a_worker_share_only_the_database_and_the_bucket(storage, tmp_path):
    from model.training.synthetic import generate_dataset

    archive = tmp_path / "shapes.zip"
    generate_dataset(archive, num_images=8, image_size=64, seed=3, max_objects=2)
    dirs = {name: tmp_path / name for name in ("a", "b", "worker")}
    with throwaway_database("maskrcnn_objects") as database_url:
        env = {name: settings(storage, database_url, path) for name, path in dirs.items()}
        a = ServerProcess("demo", env["a"], tmp_path / "a.log")
        b = ServerProcess("demo", env["b"], tmp_path / "b.log")
        clean = {k: v for k, v in os.environ.items() if kept_variable(k)}
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                cwd=REPO,
                env={**clean, "OMP_NUM_THREADS": "1", **env["worker"]},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            a.wait_ready()
            b.wait_ready()
            run_the_flow(a, b, archive, storage, dirs)
        except Exception:
            for name in ("a.log", "b.log", "worker.log"):
                print(f"--- {name} ---\n" + (tmp_path / name).read_text(errors="replace")[-6000:])
            raise
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            a.stop()
            b.stop()


def run_the_flow(a: ServerProcess, b: ServerProcess, archive, storage: str, dirs) -> None:
    upload = upload_dataset(a.client, archive.read_bytes(), "shapes.zip")
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]
    stored = bucket_keys(storage)
    assert f"datasets/{dataset_id}/annotations.json" in stored
    assert len(stored) == 1 + 8  # the annotations and every image

    job = a.client.post(
        "/v1/training-jobs",
        json={
            "dataset_id": dataset_id,
            "base_model": "demo",
            "epochs": 1,
            "batch_size": 2,
            "image_size": 64,
            "val_fraction": 0.25,
            "processes": 2,
        },
        headers=AS_ADMIN,
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]

    def ended() -> dict | None:
        job = b.client.get(f"/v1/training-jobs/{job_id}", headers=AS_ADMIN).json()
        return job if job["state"] not in ("queued", "running") else None

    done = wait_for(ended, 240, "the job to end")
    assert done["state"] == "succeeded", done
    model_id = done["model_id"]
    assert f"models/{model_id}.safetensors" in bucket_keys(storage)
    # the worker fetched the dataset into its own cache; the replicas hold no model yet
    assert (dirs["worker"] / "datasets" / dataset_id / "annotations.json").is_file()
    assert not (dirs["a"] / "models").exists() and not (dirs["b"] / "models").exists()

    # an image of its validation split, through the replica that never had the dataset
    image = b.client.get(f"/v1/training-jobs/{job_id}/validation-image", headers=AS_ADMIN)
    assert image.status_code == 200, image.text
    images = dirs["worker"] / "datasets" / dataset_id  # the worker's copy, fetched apart
    assert image.content in {p.read_bytes() for p in images.rglob("*.jpg")}

    activated = b.client.post(f"/v1/models/{model_id}/activate", headers=AS_ADMIN)
    assert activated.status_code in (200, 202), activated.text
    wait_for(lambda: segment_with(b) == model_id, 60, "b to serve the new model")
    wait_for(lambda: segment_with(a) == model_id, 60, "a to follow the activation")
    for name in ("a", "b"):  # each fetched the checkpoint into its own cache
        assert (dirs[name] / "models" / f"{model_id}.safetensors").is_file()
    _, metadata = read_checkpoint(dirs["a"] / "models" / f"{model_id}.safetensors")
    assert metadata["training"]["processes"] == 2 and metadata["job_id"] == job_id

    deleted = b.client.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN)
    assert deleted.status_code == 204, deleted.text
    assert bucket_keys(storage) == [f"models/{model_id}.safetensors"]

    # a version no longer served is deleted with its object
    assert a.client.delete(f"/v1/models/{model_id}", headers=AS_ADMIN).status_code == 409
    assert a.client.post("/v1/models/demo/activate", headers=AS_ADMIN).status_code == 200
    assert a.client.delete(f"/v1/models/{model_id}", headers=AS_ADMIN).status_code == 204
    assert bucket_keys(storage) == []
