"""The training worker and the shared job store: claims race-free on
SQLite and PostgreSQL, heartbeats and dead workers, ``maskrcnn worker`` killed or
stopped mid-job, and two API replicas sharing one PostgreSQL database."""

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from app.settings import SettingsError, load_settings
from app.store.db import Database, DatasetRecord, Meta, ModelRecord, TrainingJobRecord, utcnow
from app.training import jobs
from app.training.worker import Worker
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    REPO,
    add_dataset,
    job_store,
    running_server,
    training_processes,
    wait_for,
)

CONFIG = {
    "base_model": "demo",
    "epochs": 1,
    "batch_size": 2,
    "learning_rate": 0.01,
    "image_size": 64,
    "val_fraction": 0.0,
    "seed": 0,
}
LONG = {**CONFIG, "epochs": 500}  # runs for minutes: long enough to be interrupted
FAST_JOBS = {"job_heartbeat_s": "0.5", "job_heartbeat_timeout_s": "3", "worker_poll_s": "0.2"}


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'data' / 'maskrcnn.db'}"


def queue_jobs(db: Database, count: int, config=CONFIG) -> list[str]:
    """``count`` queued jobs on a dataset row (no files: claiming reads none)."""
    with db.session() as session:
        if session.get(DatasetRecord, "ds-rows") is None:
            session.add(
                DatasetRecord(
                    id="ds-rows",
                    name="rows",
                    path="datasets/none",
                    num_images=8,
                    num_annotations=8,
                    categories=[],
                    size_bytes=0,
                )
            )
    return [jobs.create_job(db, "ds-rows", dict(config), max_queued=100).id for _ in range(count)]


def claim_race(dbs: list[Database]) -> dict[str, list[str]]:
    """Every worker claims until nothing is left, all starting at once."""
    start = threading.Barrier(len(dbs))

    def claim_all(db: Database, worker_id: str) -> list[str]:
        start.wait()
        claimed = []
        while (job := jobs.claim_next_job(db, worker_id)) is not None:
            assert job.state == "running" and job.worker_id == worker_id
            claimed.append(job.id)
        return claimed

    with concurrent.futures.ThreadPoolExecutor(len(dbs)) as pool:
        futures = {
            f"worker-{i}": pool.submit(claim_all, db, f"worker-{i}") for i, db in enumerate(dbs)
        }
        return {name: future.result(60) for name, future in futures.items()}


def assert_claimed_once(db: Database, queued: list[str], claims: dict[str, list[str]]) -> None:
    everything = [job_id for claimed in claims.values() for job_id in claimed]
    assert sorted(everything) == sorted(queued)  # each one, exactly once
    with db.session() as session:
        for worker_id, claimed in claims.items():
            for job_id in claimed:
                job = session.get(TrainingJobRecord, job_id)
                assert (job.state, job.worker_id) == ("running", worker_id)
                assert job.started_at is not None and job.heartbeat_at is not None


def test_the_heartbeat_timeout_must_outlast_two_heartbeats():
    with pytest.raises(SettingsError, match="MASKRCNN_JOB_HEARTBEAT_TIMEOUT_S=6"):
        load_settings(job_heartbeat_s=5, job_heartbeat_timeout_s=6)
    assert (
        load_settings(job_heartbeat_s=5, job_heartbeat_timeout_s=10).job_heartbeat_timeout_s == 10
    )


# -- claims ------------------------------------------------------------------------


def test_two_workers_claim_each_job_once_on_sqlite(sqlite_url, tmp_path):
    db = job_store(tmp_path / "data", sqlite_url)
    queued = queue_jobs(db, 10)
    dbs = [Database(sqlite_url, data_dir=tmp_path / "data") for _ in range(2)]
    assert_claimed_once(db, queued, claim_race(dbs))
    assert jobs.claim_next_job(db, "late") is None


def test_two_workers_claim_each_job_once_on_postgresql(postgres_url, tmp_path):
    db = job_store(tmp_path / "data", postgres_url)
    queued = queue_jobs(db, 10)
    dbs = [Database(postgres_url, data_dir=tmp_path / "data") for _ in range(2)]
    try:
        claims = claim_race(dbs)
    finally:
        for other in dbs:
            other.dispose()
    assert_claimed_once(db, queued, claims)
    db.dispose()


def test_postgresql_claims_skip_a_locked_job_without_waiting(postgres_url, tmp_path):
    import psycopg

    db = job_store(tmp_path / "data", postgres_url)
    first, second = queue_jobs(db, 2)
    with psycopg.connect(postgres_url) as holder:
        # another worker's claim transaction, still open, holds the oldest job
        holder.execute("SELECT id FROM training_jobs WHERE id = %s FOR UPDATE", (first,))
        started = time.monotonic()
        job = jobs.claim_next_job(db, "w2")
        assert time.monotonic() - started < 2
        assert job.id == second
        assert jobs.claim_next_job(db, "w3") is None
        holder.rollback()
    assert jobs.claim_next_job(db, "w3").id == first
    db.dispose()


def test_jobs_are_claimed_oldest_first(sqlite_url, tmp_path):
    db = job_store(tmp_path / "data", sqlite_url)
    queued = queue_jobs(db, 3)
    assert [jobs.claim_next_job(db, "w").id for _ in queued] == queued


# -- ownership and dead workers ------------------------------------------------------


def test_a_job_answers_only_to_its_worker(sqlite_url, tmp_path):
    db = job_store(tmp_path / "data", sqlite_url)
    [job_id] = queue_jobs(db, 1)
    jobs.claim_next_job(db, "w1")
    assert jobs.heartbeat(db, job_id, "w1") == "run"
    assert jobs.heartbeat(db, job_id, "w2") == "drop"
    assert jobs.record_progress(db, job_id, "w1", {"step": 1, "loss": float("nan")})
    assert jobs.get_job(db, job_id).progress == {"step": 1, "loss": None}  # JSON-safe
    assert not jobs.finish_job(db, job_id, "w2", "failed", "not mine")
    jobs.request_cancel(db, job_id)
    assert jobs.heartbeat(db, job_id, "w1") == "cancel"
    assert not jobs.record_progress(db, job_id, "w1", {"step": 2})  # the process stops
    model = ModelRecord(
        id=jobs.model_id_for(job_id),
        architecture="a",
        path="p",
        classes=[],
        base_model="demo",
        job_id=job_id,
    )
    assert not jobs.complete_job(db, job_id, "w1", model)  # a requested cancel wins
    with db.session() as session:
        assert session.get(ModelRecord, model.id) is None
    assert jobs.finish_job(db, job_id, "w1", "cancelled")
    assert jobs.get_job(db, job_id).state == "cancelled"
    assert jobs.heartbeat(db, job_id, "w1") == "drop"


def test_a_silent_worker_s_job_fails_and_its_files_go(sqlite_url, tmp_path):
    db = job_store(tmp_path / "data", sqlite_url)
    stale, alive = queue_jobs(db, 2)
    jobs.claim_next_job(db, "host:1:dead")
    jobs.claim_next_job(db, "host:2:alive")
    with db.session() as session:
        session.get(TrainingJobRecord, stale).heartbeat_at = utcnow() - timedelta(seconds=31)
    checkpoint = db.objects.local(jobs.checkpoint_path(stale))
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"written, never registered")
    partial = checkpoint.with_name(f".{checkpoint.name}.tmp-123")
    partial.write_bytes(b"half")
    kept = db.objects.local(jobs.checkpoint_path(alive))
    kept.write_bytes(b"still training")

    assert jobs.fail_stale_jobs(db, timeout_s=30) == [stale]
    job = jobs.get_job(db, stale)
    assert job.state == "failed" and job.finished_at is not None
    assert "worker host:1:dead stopped heartbeating" in job.error
    assert not checkpoint.exists() and not partial.exists() and kept.exists()
    assert jobs.get_job(db, alive).state == "running"
    # the dead worker, should it come back, changes nothing
    assert jobs.heartbeat(db, stale, "host:1:dead") == "drop"
    assert not jobs.finish_job(db, stale, "host:1:dead", "cancelled")
    assert jobs.get_job(db, stale).state == "failed"


def test_replica_clocks_that_disagree_fail_no_live_job_on_postgresql(
    postgres_url, tmp_path, monkeypatch
):
    """Heartbeats are judged on the database's clock: a worker whose clock is
    behind, or a checker whose clock is ahead, declares no live worker dead."""
    db = job_store(tmp_path / "data", postgres_url)
    first, second = queue_jobs(db, 2)
    real_now = jobs.utcnow
    monkeypatch.setattr(jobs, "utcnow", lambda: real_now() - timedelta(seconds=60))
    jobs.claim_next_job(db, "slow-clock")  # claims and beats on a clock 60 s behind
    assert jobs.heartbeat(db, first, "slow-clock") == "run"
    monkeypatch.setattr(jobs, "utcnow", real_now)
    assert jobs.fail_stale_jobs(db, timeout_s=30) == []
    jobs.claim_next_job(db, "true-clock")
    monkeypatch.setattr(jobs, "utcnow", lambda: real_now() + timedelta(seconds=60))
    assert jobs.fail_stale_jobs(db, timeout_s=30) == []  # checked from a clock ahead
    monkeypatch.setattr(jobs, "utcnow", real_now)
    assert [jobs.get_job(db, j).state for j in (first, second)] == ["running", "running"]
    with db.session() as session:  # a truly silent one still fails
        session.execute(
            text(
                "UPDATE training_jobs SET heartbeat_at = now() - interval '31 seconds' "
                "WHERE id = :id"
            ),
            {"id": second},
        )
    assert jobs.fail_stale_jobs(db, timeout_s=30) == [second]
    db.dispose()


def test_a_busy_worker_still_fails_the_jobs_of_dead_workers(sqlite_url, tmp_path):
    """A worker supervising a long job keeps sweeping: in a single-server deployment
    it is the only one, and a job of its crashed predecessor must not stay
    ``running`` for as long as the next job trains."""
    db = job_store(tmp_path / "data", sqlite_url)
    orphan, current = queue_jobs(db, 2)
    jobs.claim_next_job(db, "host:1:crashed")
    settings = load_settings(
        database_url=sqlite_url, data_dir=db.data_dir, **FAST_JOBS, run_worker=False
    )
    worker = Worker(db, settings, worker_id="host:2:busy")
    assert jobs.claim_next_job(db, worker.worker_id).id == current
    with db.session() as session:
        session.get(TrainingJobRecord, orphan).heartbeat_at = utcnow() - timedelta(seconds=10)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    supervising = threading.Thread(target=worker._supervise, args=(process, current))
    supervising.start()
    try:
        wait_for(lambda: jobs.get_job(db, orphan).state == "failed", 5, "the orphan to fail")
        assert jobs.get_job(db, current).state == "running"
    finally:
        worker.request_stop()
        supervising.join(20)
        process.kill()
        process.wait()
    db.dispose()


def test_a_file_it_cannot_remove_does_not_stop_the_worker(sqlite_url, tmp_path):
    """A sweep that fails on the shared volume (here: a checkpoint path that is a
    directory) is logged; the worker thread lives on to sweep and claim again."""
    db = job_store(tmp_path / "data", sqlite_url)
    first, second = queue_jobs(db, 2)
    jobs.claim_next_job(db, "host:1:dead")
    jobs.claim_next_job(db, "host:1:dead")
    db.objects.local(jobs.checkpoint_path(first)).mkdir(parents=True)  # unlink() fails
    with db.session() as session:
        session.get(TrainingJobRecord, first).heartbeat_at = utcnow() - timedelta(seconds=10)
    settings = load_settings(database_url=sqlite_url, data_dir=db.data_dir, **FAST_JOBS)
    worker = Worker(db, settings, claim_jobs=False)
    worker.start()
    try:
        wait_for(lambda: jobs.get_job(db, first).state == "failed", 10, "the first sweep")
        with db.session() as session:
            session.get(TrainingJobRecord, second).heartbeat_at = utcnow() - timedelta(seconds=10)
        wait_for(lambda: jobs.get_job(db, second).state == "failed", 5, "a second sweep")
        assert worker.alive
    finally:
        worker.stop()
    db.dispose()


def test_a_job_of_more_processes_than_its_worker_runs_fails_with_the_reason(
    sqlite_url, tmp_path
):
    """The API's limit is JOB_MAX_PROCESSES where set; a worker that runs fewer
    processes (one a core here) fails the job, saying so, and leaves nothing."""
    db = job_store(tmp_path / "data", sqlite_url)
    cores = len(os.sched_getaffinity(0))
    job_id = jobs.create_job(
        db, add_dataset(db, num_images=2), {**CONFIG, "processes": cores + 1}, max_queued=1
    ).id
    settings = load_settings(database_url=sqlite_url, data_dir=db.data_dir, **FAST_JOBS)
    worker = Worker(db, settings)
    worker.run_job(jobs.claim_next_job(db, worker.worker_id))
    job = jobs.get_job(db, job_id)
    assert job.state == "failed"
    assert f"asks for {cores + 1} processes; this worker runs at most {cores}" in job.error
    assert_nothing_left(db, job_id)
    db.dispose()


# -- real worker processes ---------------------------------------------------------------


@contextlib.contextmanager
def worker_process(env: dict[str, str], log: Path):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    full_env |= {f"MASKRCNN_{k.upper()}": str(v) for k, v in env.items()}
    full_env["OMP_NUM_THREADS"] = "1"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_the_worker_command_refuses_what_it_cannot_use(sqlite_url, tmp_path, monkeypatch, capsys):
    from app.cli import main

    for name in [n for n in os.environ if n.startswith("MASKRCNN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASKRCNN_JOB_HEARTBEAT_TIMEOUT_S", "1")  # under twice the 5 s beat
    assert main(["worker"]) == 2
    assert "MASKRCNN_JOB_HEARTBEAT_TIMEOUT_S" in capsys.readouterr().err

    db = job_store(tmp_path / "data", sqlite_url)
    with db.session() as session:  # written by a newer release
        session.merge(Meta(key="schema_version", value="99", updated_at=utcnow()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    env |= {"MASKRCNN_DATABASE_URL": sqlite_url, "MASKRCNN_DATA_DIR": str(db.data_dir)}
    command = [sys.executable, "-m", "app.cli", "worker"]
    newer = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert newer.returncode == 1 and "upgrade the service" in newer.stderr


def job_pid(job: TrainingJobRecord) -> int:
    """Worker ids are host:pid:tag."""
    return int(job.worker_id.split(":")[1])


def wait_training(db: Database, job_id: str) -> TrainingJobRecord:
    return wait_for(
        lambda: (j := jobs.get_job(db, job_id)).progress.get("step", 0) >= 1 and j,
        90,
        f"job {job_id} to train",
    )


def assert_nothing_left(db: Database, job_id: str) -> None:
    """No model registered, no checkpoint file, no training process."""
    wait_for(lambda: not training_processes(job_id), 15, "the training process to end")
    with db.session() as session:
        assert session.query(ModelRecord).filter_by(job_id=job_id).count() == 0
    tag = job_id.removeprefix("job-")
    assert not list((db.data_dir / "models").glob(f"*{tag}*"))  # temporary files too


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_worker_s_job_fails_within_the_heartbeat_timeout(
    postgres_url, tmp_path, processes
):
    """Whether a job runs in one process or in two under torchrun, none outlives the
    worker that started it, or the job."""
    db = job_store(tmp_path / "data", postgres_url)
    dataset = add_dataset(db)
    env = {"database_url": postgres_url, "data_dir": db.data_dir, **FAST_JOBS}
    with (
        worker_process(env, tmp_path / "w1.log") as w1,
        worker_process(env, tmp_path / "w2.log") as w2,
    ):
        job_id = jobs.create_job(db, dataset, {**LONG, "processes": processes}, max_queued=100).id
        job = wait_training(db, job_id)
        assert len(training_processes(job_id)) == {1: 1, 2: 3}[processes]  # with the launcher
        owner, other = (w1, w2) if job_pid(job) == w1.pid else (w2, w1)
        assert job_pid(job) == owner.pid and job.state == "running"

        owner.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        failed = wait_for(
            lambda: (j := jobs.get_job(db, job_id)).state != "running" and j, 30, "failure"
        )
        elapsed = time.monotonic() - killed_at
        assert failed.state == "failed"
        assert f"worker {job.worker_id} stopped heartbeating" in failed.error
        assert 2 < elapsed < 3 + 5, elapsed  # the timeout, plus a sweep and a busy machine
        assert failed.model_id is None
        assert_nothing_left(db, job_id)

        # the survivor stops gracefully on SIGTERM: its job ends failed, with the reason
        second = jobs.create_job(db, dataset, {**LONG, "processes": processes}, max_queued=100).id
        job = wait_for(
            lambda: (j := jobs.get_job(db, second)).state == "running" and j, 30, "a claim"
        )
        assert job_pid(job) == other.pid
        wait_for(lambda: training_processes(second), 10, "the training process")
        other.send_signal(signal.SIGTERM)
        assert other.wait(20) == 0
        stopped = jobs.get_job(db, second)
        assert stopped.state == "failed" and "shut down while the job ran" in stopped.error
        assert_nothing_left(db, second)
    db.dispose()


def job_via(server, job_id: str) -> dict:
    return server.client.get(f"/v1/training-jobs/{job_id}", headers=AS_ADMIN).json()


@pytest.mark.slow
def test_two_servers_share_one_job_store(postgres_url, tmp_path):
    db = job_store(tmp_path / "data", postgres_url)
    dataset = add_dataset(db)
    env = {
        "database_url": postgres_url,
        "data_dir": db.data_dir,
        "admin_token": ADMIN_TOKEN,
        **FAST_JOBS,
    }
    with (
        running_server(Path("demo"), tmp_path, **env, run_worker="true") as a,
        running_server(Path("demo"), tmp_path, **env, run_worker="false") as b,
    ):
        a.wait_ready()
        b.wait_ready()
        body = {"dataset_id": dataset, **LONG}
        created = b.client.post("/v1/training-jobs", json=body, headers=AS_ADMIN)
        assert created.status_code == 202
        first = created.json()["id"]
        running = wait_for(
            lambda: job_via(a, first)["state"] == "running" and job_via(a, first),
            30,
            "A's worker to claim the job made through B",
        )
        assert running["worker_id"].split(":")[1] == str(a.process.pid)

        second = a.client.post("/v1/training-jobs", json=body, headers=AS_ADMIN).json()["id"]
        listed = b.client.get("/v1/training-jobs", headers=AS_ADMIN).json()
        assert [(j["id"], j["state"]) for j in listed["data"]] == [
            (second, "queued"),  # B runs no worker; A's is busy
            (first, "running"),
        ]
        cancelled = b.client.post(f"/v1/training-jobs/{second}/cancel", headers=AS_ADMIN)
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        assert job_via(a, second)["state"] == "cancelled"

        flagged = b.client.post(f"/v1/training-jobs/{first}/cancel", headers=AS_ADMIN)
        assert flagged.status_code == 202 and flagged.json()["cancel_requested"]
        ended = wait_for(
            lambda: job_via(a, first)["state"] != "running" and job_via(a, first),
            20,
            "A's worker to stop the job cancelled through B",
        )
        assert ended["state"] == "cancelled" and ended["error"] is None
        assert_nothing_left(db, first)
    db.dispose()
