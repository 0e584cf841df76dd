"""A database that refuses, stalls or is locked never takes inference down: with
PostgreSQL behind a TCP proxy that refuses, stalls and recovers, and with a
SQLite file another process holds locked, ``/v1/segment`` keeps answering in its
usual time and ``/readyz`` stays 200, while the routes that need the database
answer 503 ``database_unavailable`` within ``DATABASE_TIMEOUT_S`` and work again
once the database is back."""

import concurrent.futures
import socket
import sqlite3
import time

import httpx
import pytest

from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    add_dataset,
    job_store,
    run_serve,
    running_server,
    throwaway_database,
    timed_segment,
    wait_for,
)
from tests.app.dbproxy import FaultyProxy

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0  # MASKRCNN_DATABASE_TIMEOUT_S of these servers


def database_call(url: str, path: str, method: str = "GET") -> tuple[int, str, float]:
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.request(method, path, headers=AS_ADMIN)
    code = response.json()["error"]["code"] if response.status_code >= 400 else ""
    return response.status_code, code, time.monotonic() - started


def inference_holds_while(server, calls: list[tuple[str, str]]) -> list[tuple[int, str, float]]:
    """Send the database ``calls`` at once, and segment requests one after the
    other meanwhile: each segment must be answered in its usual time."""
    usual = max(timed_segment(server.url)[1] for _ in range(3))
    before = server.accepted(route=None)
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        waiting = [pool.submit(database_call, server.url, path, method) for method, path in calls]
        arrived = before + len(calls)
        wait_for(lambda: server.accepted(route=None) >= arrived, 30, "the database calls")
        while not all(w.done() for w in waiting):
            status, seconds = timed_segment(server.url)
            assert status == 200
            assert seconds < max(2.0, 5 * usual), f"segment took {seconds:.1f} s"
            assert server.client.get("/readyz").status_code == 200
        return [w.result() for w in waiting]


def assert_unavailable_in_time(answers: list[tuple[int, str, float]]) -> None:
    for status, code, seconds in answers:
        assert (status, code) == (503, "database_unavailable")
        assert seconds < TIMEOUT_S + 3, f"answered after {seconds:.1f} s"


@pytest.fixture
def proxied(checkpoint, tmp_path):
    with throwaway_database("faults") as url:
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])
        proxy = FaultyProxy((host, port))
        database_url = url.replace(f":{port}/", f":{proxy.port}/")
        settings = {
            "database_url": database_url,
            "database_timeout_s": TIMEOUT_S,
            "model_poll_s": 0.5,
            "run_worker": False,
            "admin_token": ADMIN_TOKEN,
        }
        try:
            with running_server(checkpoint, tmp_path, **settings) as server:
                server.wait_ready()
                yield server, proxy
        finally:
            proxy.close()


def test_a_stalled_or_refusing_postgresql_never_stops_inference(proxied):
    server, proxy = proxied
    calls = [("GET", "/v1/models")] * 8 + [("GET", "/v1/datasets"), ("GET", "/v1/training-jobs")]
    assert all(status == 200 for status, _, _ in inference_holds_while(server, calls[:2]))

    proxy.mode = "stall"
    assert_unavailable_in_time(inference_holds_while(server, calls))
    wait_for(lambda: server.metric("maskrcnn_database_up") == 0, 10, "the database gauge")

    proxy.mode = "refuse"
    proxy.drop_connections()  # what the stall left open fails now
    assert_unavailable_in_time(inference_holds_while(server, calls))

    proxy.heal()
    wait_for(lambda: database_call(server.url, "/v1/models")[0] == 200, 30, "the database is back")
    assert all(status == 200 for status, _, _ in inference_holds_while(server, calls))
    wait_for(lambda: server.metric("maskrcnn_database_up") == 1, 10, "the database gauge")


def test_a_sqlite_file_locked_by_another_process_never_stops_inference(checkpoint, tmp_path):
    data_dir = tmp_path / "data"
    db = job_store(data_dir)
    dataset_id = add_dataset(db, num_images=2)
    db.dispose()
    settings = {"database_timeout_s": TIMEOUT_S, "run_worker": False, "admin_token": ADMIN_TOKEN}
    with running_server(checkpoint, tmp_path, data_dir=data_dir, **settings) as server:
        server.wait_ready()
        holder = sqlite3.connect(data_dir / "maskrcnn.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # as another process writing would
        try:
            calls = [("DELETE", f"/v1/datasets/{dataset_id}")] * 2
            assert_unavailable_in_time(inference_holds_while(server, calls))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert database_call(server.url, f"/v1/datasets/{dataset_id}", "DELETE")[0] == 204


@pytest.fixture
def on_postgresql(checkpoint, tmp_path):
    with throwaway_database("inputs") as url:
        settings = {"database_url": url, "run_worker": False, "admin_token": ADMIN_TOKEN}
        with running_server(checkpoint, tmp_path, **settings) as server:
            server.wait_ready()
            yield server


def test_control_characters_in_ids_and_stored_strings_are_4xx_on_postgresql(on_postgresql):
    client = on_postgresql.client
    for path in ("/v1/datasets/ds-%00x", "/v1/training-jobs/job-%0A", "/v1/models/m%00"):
        response = client.get(path, headers=AS_ADMIN)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "bad_request"
    job = client.post("/v1/training-jobs", json={"dataset_id": "ds-\x00"}, headers=AS_ADMIN)
    assert job.status_code == 422 and "control characters" in job.json()["error"]["message"]
    upload = client.post(
        "/v1/datasets",
        files={"file": ("d.zip", b"PK\x05\x06" + b"\x00" * 18, "application/zip")},
        data={"name": "bad\x00name"},
        headers=AS_ADMIN,
    )
    assert upload.status_code == 422 and "name: control characters" in upload.text
    assert client.get("/v1/datasets", headers=AS_ADMIN).status_code == 200  # still serving
    assert timed_segment(on_postgresql.url)[0] == 200


@pytest.mark.parametrize(
    "url",
    ["mysql://bob:s3cret@db/x", "postgresql+psycopg2://bob:s3cret@db/x", "postgresql://db:port/x"],
)
def test_a_database_url_that_cannot_be_used_stops_start_up_naming_the_variable(tmp_path, url):
    result = run_serve(tmp_path, "--model", "demo", MASKRCNN_DATABASE_URL=url)
    assert result.returncode == 2
    assert "MASKRCNN_DATABASE_URL" in result.stderr and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_at_start_up_is_reported_as_one(tmp_path):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    url = f"postgresql://bob:s3cret@127.0.0.1:{port}/x"
    result = run_serve(tmp_path, "--model", "demo", MASKRCNN_DATABASE_URL=url)
    assert result.returncode == 1
    assert "the database at postgresql://bob:***@127.0.0.1" in result.stderr
    assert "cannot serve model" not in result.stderr and "s3cret" not in result.stderr
