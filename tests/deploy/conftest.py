"""The compose topology on loopback: nginx running ``deploy/nginx.conf``
in front of two ``maskrcnn serve`` replicas that share one throwaway PostgreSQL
database and one ``DATA_DIR``, plus one ``maskrcnn worker`` when that command
exists; replicas run with ``RUN_WORKER=false``, as in ``docker-compose.yml``.

nginx and PostgreSQL are outside the repo. CI (``.ci/run``) installs nginx,
PostgreSQL runs on its machines, and it sets ``MASKRCNN_TEST_REQUIRE_TOPOLOGY=1``
so that a missing one fails the run; elsewhere the tests skip, saying what is
missing.
"""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.server import DRAIN_ACCEPT_S
from deploy.topology import find_nginx, nginx_command, write_config
from tests.app.conftest import (
    REPO,
    ServerProcess,
    free_port,
    kept_variable,
    throwaway_database,
)

API_TOKEN = "topology-api-token"
ADMIN_TOKEN = "topology-admin-token"


def missing(what: str) -> None:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("MASKRCNN_TEST_REQUIRE_TOPOLOGY") == "1":
        pytest.fail(f"{what} (MASKRCNN_TEST_REQUIRE_TOPOLOGY=1: CI must provide it)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    found = find_nginx()
    if found is None:
        missing("nginx is not installed: apt-get install nginx-light (.ci/run does)")
    return found


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this session on the local PostgreSQL, dropped afterwards."""
    with throwaway_database("maskrcnn_topo") as url:
        yield url


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Topology:
    """nginx on ``url`` in front of ``replicas``; ``restart(i)`` replaces replica ``i``
    with a new process on the same port, as a rolling update does."""

    url: str
    model: str
    env: dict[str, str]
    tmp: Path
    nginx_log: Path
    replicas: list[ServerProcess] = field(default_factory=list)
    worker: subprocess.Popen | None = None

    def start_replica(self, port: int | None = None) -> ServerProcess:
        log = self.tmp / f"replica-{port or 'new'}-{time.monotonic_ns()}.log"
        return ServerProcess(self.model, self.env, log, port=port)

    def restart(self, index: int) -> ServerProcess:
        """SIGTERM replica ``index`` (it drains, then exits), start a new one on the
        same port once the old one is gone, and wait until it is ready."""
        old = self.replicas[index]
        old.terminate()
        started = time.monotonic()
        code = old.process.wait(60)
        assert code in (0, -signal.SIGTERM), f"replica exited with {code}:\n{old.log()}"
        # under load "nothing in flight" may never come: the listener closes anyway
        waited = time.monotonic() - started
        assert waited < DRAIN_ACCEPT_S + 15, f"drain took {waited:.0f} s:\n{old.log()}"
        old.stop()
        new = self.replicas[index] = self.start_replica(old.port)
        new.wait_ready()
        return new

    def logs(self) -> str:
        paths = [self.nginx_log, *(r.log_path for r in self.replicas)]
        paths += [self.tmp / "worker.log"] if self.worker else []
        return "\n".join(log_tail(p) for p in paths)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200")
        time.sleep(0.1)


def has_worker_command() -> bool:
    return importlib.util.find_spec("app.commands.worker") is not None


@pytest.fixture(scope="module")
def topology(nginx_binary, database_url, tmp_path_factory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("topology")
    env = {
        "MASKRCNN_DATABASE_URL": database_url,
        "MASKRCNN_DATA_DIR": str(tmp / "data"),
        "MASKRCNN_RUN_WORKER": "false",
        "MASKRCNN_API_TOKENS": API_TOKEN,
        "MASKRCNN_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    ports = [free_port(), free_port()]
    listen = free_port()
    prefix = tmp / "nginx"
    conf = write_config(prefix, replica_ports=ports, listen_port=listen)
    # the bundled demo model: a real one, and ~6x cheaper per image than the tiny
    # ResNet-50 checkpoint of tests/app on a shared CPU
    topo = Topology(f"http://127.0.0.1:{listen}", "demo", env, tmp, tmp / "nginx.log")
    with contextlib.ExitStack() as stack:
        nginx_log = stack.enter_context(open(topo.nginx_log, "wb"))
        nginx = subprocess.Popen(
            nginx_command(nginx_binary, prefix, conf), stdout=nginx_log, stderr=subprocess.STDOUT
        )
        stack.callback(stop_process, nginx, signal.SIGQUIT)  # SIGQUIT: graceful for nginx
        for port in ports:
            replica = topo.start_replica(port)
            topo.replicas.append(replica)
            stack.callback(lambda i=len(topo.replicas) - 1: topo.replicas[i].stop())
        if has_worker_command():
            worker_log = stack.enter_context(open(tmp / "worker.log", "wb"))
            topo.worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                cwd=REPO,
                env={**clean_environment(), "OMP_NUM_THREADS": "1", **env},
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(stop_process, topo.worker, signal.SIGTERM)
        try:
            for replica in topo.replicas:
                replica.wait_ready()
            wait_http(topo.url + "/readyz")
        except Exception:
            print(topo.logs())
            raise
        yield topo
        if topo.worker is not None:
            assert topo.worker.poll() is None, f"the worker died:\n{topo.logs()}"


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if kept_variable(k)}


def stop_process(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
