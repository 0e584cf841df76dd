"""A training job rides out a database outage shorter than the heartbeat timeout
and fails with the database named when it lasts longer: ``maskrcnn serve`` with
its embedded worker on PostgreSQL behind a proxy that refuses every connection
and drops the open ones for a while."""

import time
from pathlib import Path

import pytest

from app.training import jobs
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    TINY_JOB,
    add_dataset,
    job_store,
    running_server,
    throwaway_database,
    wait_for,
)
from tests.app.dbproxy import FaultyProxy

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 6.0


@pytest.fixture
def trainer(tmp_path):
    with throwaway_database("outage") as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        proxy = FaultyProxy(("127.0.0.1", port))
        db = job_store(tmp_path / "data", url)  # the tests' own view, never cut
        settings = {
            "database_url": url.replace(f":{port}/", f":{proxy.port}/"),
            "database_timeout_s": 2,
            "admin_token": ADMIN_TOKEN,
            "job_heartbeat_s": 1,
            "job_heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "worker_poll_s": 0.3,
        }
        try:
            with running_server(Path("demo"), tmp_path, **settings) as server:
                server.wait_ready()
                server.db, server.proxy = db, proxy
                server.dataset_id = add_dataset(db, num_images=8)
                yield server
        finally:
            db.dispose()
            proxy.close()


def training_job(server, epochs: int) -> str:
    """A job of ``epochs`` epochs, once its training has written progress."""
    body = {**TINY_JOB, "epochs": epochs, "val_fraction": 0, "dataset_id": server.dataset_id}
    response = server.client.post("/v1/training-jobs", json=body, headers=AS_ADMIN)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_for(
        lambda: (jobs.get_job(server.db, job_id).progress or {}).get("step", 0) >= 1,
        120,
        "the job to train",
    )
    return job_id


def cut_database(server, seconds: float) -> None:
    """An outage of ``seconds``: new connections refused, open ones dropped."""
    server.proxy.mode = "refuse"
    server.proxy.drop_connections()
    time.sleep(seconds)  # the outage itself, not a wait for other work
    server.proxy.heal()


def final(server, job_id: str):
    return wait_for(
        lambda: (job := jobs.get_job(server.db, job_id)).state in jobs.FINAL_STATES and job,
        120,
        "the job to end",
    )


def test_an_outage_of_half_the_heartbeat_timeout_loses_no_job(trainer):
    job_id = training_job(trainer, epochs=40)
    cut_database(trainer, HEARTBEAT_TIMEOUT_S / 2)
    assert jobs.get_job(trainer.db, job_id).state == "running"  # it trained on meanwhile
    job = final(trainer, job_id)
    assert job.state == "succeeded", job.error
    assert job.error is None and job.model_id is not None
    training_log = jobs.log_path(trainer.db, job_id).read_text()
    assert "database unavailable (writing the job's progress)" in training_log  # waited out


def test_a_longer_outage_fails_the_job_with_the_database_named(trainer):
    job_id = training_job(trainer, epochs=400)
    cut_database(trainer, HEARTBEAT_TIMEOUT_S * 2.5)
    job = final(trainer, job_id)
    assert job.state == "failed"
    assert "database was unreachable" in job.error, job.error
    assert "heartbeat" not in job.error
    assert job.model_id is None
