"""The compose topology without Docker: clients talk only to
nginx (``deploy/nginx.conf``), which balances two ``maskrcnn serve`` replicas
sharing one PostgreSQL database and one ``DATA_DIR``."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.app.conftest import ServerProcess, Traffic, png_bytes, scene, wait_for
from tests.deploy.conftest import ADMIN_TOKEN, API_TOKEN, Topology, has_worker_command

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PNG = png_bytes(scene(64, 64, 0))
FINAL_STATES = {"succeeded", "failed", "cancelled"}


def segment(client: httpx.Client, **headers: str) -> httpx.Response:
    files = {"images": ("scene.png", PNG, "image/png")}
    return client.post("/v1/segment", files=files, headers={**AUTH, **headers})


def segments_served(replica: ServerProcess) -> int:
    """Successful ``POST /v1/segment`` answers this replica counted in ``/metrics``."""
    pattern = re.compile(
        r'^maskrcnn_http_requests_total\{(?=[^}]*route="/v1/segment")'
        r'(?=[^}]*method="POST")(?=[^}]*status="200")[^}]*\} (\S+)$',
        re.M,
    )
    return sum(int(float(v)) for v in pattern.findall(replica.client.get("/metrics").text))


def test_segment_requests_are_spread_over_both_replicas_and_all_succeed(topology: Topology):
    before = [segments_served(r) for r in topology.replicas]
    with httpx.Client(base_url=topology.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: segment(client), range(200)))
    failed = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not failed, f"{len(failed)} of 200 failed: {failed[:3]}\n{topology.logs()}"
    assert all(len(r.json()["results"]) == 1 for r in responses)
    served = [segments_served(r) - b for r, b in zip(topology.replicas, before, strict=True)]
    assert sum(served) == 200  # each request answered by exactly one replica
    assert min(served) >= 50, f"unbalanced: {served}"


def test_request_ids_pass_through_nginx_in_both_directions(topology: Topology):
    with httpx.Client(base_url=topology.url, timeout=60) as client:
        given = segment(client, **{"X-Request-ID": "topology-check-1"})
        generated = segment(client)
    assert given.status_code == generated.status_code == 200
    assert given.headers["x-request-id"] == "topology-check-1"
    # without one, nginx makes the id and the replica uses it: nginx's access log
    # holds the id the client got back
    request_id = generated.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    # the access log line is written after the response
    logged = f"id={request_id}"
    wait_for(lambda: logged in topology.nginx_log.read_text(), 10, "nginx's line with the id")


def test_an_upload_over_the_cap_gets_the_services_json_413_through_nginx(topology: Topology):
    """nginx lets bodies up to its own larger limit through, so the replica, not
    nginx, refuses the upload, in the service's error shape."""
    body = b"0" * (50 * 2**20 + 1)  # one byte over MAX_UPLOAD_MB's default
    with httpx.Client(base_url=topology.url, timeout=60) as client:
        response = client.post(
            "/v1/segment", content=body, headers={**AUTH, "Content-Type": "image/png"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_the_console_and_its_files_come_through_nginx(topology: Topology):
    with httpx.Client(base_url=topology.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and "console/main.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = client.get("/console/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]


def training_routes(topology: Topology) -> set[str]:
    paths = httpx.get(topology.url + "/openapi.json", timeout=30).json()["paths"]
    return {p for p in paths if p.startswith(("/v1/datasets", "/v1/training-jobs"))}


def read_events(response: httpx.Response, timeout: float) -> list[dict]:
    """``data:`` payloads of a server-sent event stream, until a final state is
    seen, the server closes the stream, or ``timeout`` passes."""
    events, deadline = [], time.monotonic() + timeout
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line.removeprefix("data:").strip()
            with_state = json.loads(data) if data.startswith("{") else {"raw": data}
            events.append(with_state)
            if with_state.get("state") in FINAL_STATES or time.monotonic() > deadline:
                break
    return events


def test_a_training_job_is_created_and_followed_to_the_end_through_nginx(
    topology: Topology, tmp_path
):
    """Datasets and jobs go to either replica; the job runs in the separate worker
    (the replicas have RUN_WORKER=false) and its events stream through nginx."""
    routes = training_routes(topology)
    needed = {"/v1/datasets", "/v1/training-jobs", "/v1/training-jobs/{job_id}/events"}
    if not {r.replace("{id}", "{job_id}") for r in routes} >= needed or not has_worker_command():
        pytest.skip(f"training jobs are not built yet (routes: {sorted(routes)})")
    from model.training.synthetic import generate_dataset

    archive = tmp_path / "shapes.zip"
    generate_dataset(archive, num_images=6, image_size=64, seed=3)
    with httpx.Client(base_url=topology.url, timeout=120, headers=ADMIN) as client:
        with archive.open("rb") as f:
            created = client.post("/v1/datasets", files={"file": ("shapes.zip", f)})
        assert created.status_code == 201, created.text
        job = client.post(
            "/v1/training-jobs",
            json={
                "dataset_id": created.json()["id"],
                "base_model": "demo",
                "epochs": 1,
                "batch_size": 2,
                "image_size": 64,
            },
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        with client.stream("GET", f"/v1/training-jobs/{job_id}/events", timeout=300) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = read_events(stream, timeout=240)
        states = [e["state"] for e in events if "state" in e]
        assert states and states[-1] == "succeeded", f"{events}\n{topology.logs()}"
        final = client.get(f"/v1/training-jobs/{job_id}").json()
    assert final["state"] == "succeeded" and final["model_id"]
    # the replicas run no training (RUN_WORKER=false): the worker process ran it
    assert job_id in (topology.tmp / "worker.log").read_text()


def wait_taking_traffic(replica: ServerProcess, count: int = 3, timeout: float = 30.0) -> None:
    """Until nginx sends requests to ``replica`` again (a refused connect while it
    was down parks it for ``fail_timeout``)."""
    deadline = time.monotonic() + timeout
    start = segments_served(replica)
    while segments_served(replica) < start + count:
        assert time.monotonic() < deadline, "nginx never sent traffic to the new replica"
        time.sleep(0.1)


def test_a_rolling_restart_under_continuous_load_loses_no_request(topology: Topology):
    """SIGTERM one replica (it drains and exits), start it again, wait until it
    takes traffic, then the other: every request sent meanwhile succeeds."""
    with Traffic(topology.url, PNG, clients=2, headers=AUTH) as load:
        load.wait_more(10)
        for index in range(len(topology.replicas)):
            replaced = topology.restart(index)
            wait_taking_traffic(replaced)
            load.wait_more(10)
    failures = load.failures()
    assert not failures, (
        f"{len(failures)} of {load.count()} failed: {failures[:5]}\n{topology.logs()}"
    )
    assert load.count() >= 40
