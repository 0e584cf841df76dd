"""``maskrcnn serve`` refuses bad start-up conditions clearly."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.app.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def serve(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    clean["MASKRCNN_DATA_DIR"] = str(tmp_path / "data")  # never ./data in the repo
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(free_port()), *args]
    return subprocess.run(
        command, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_invalid_setting_stops_start_up_naming_the_variable(tmp_path):
    result = serve(tmp_path, "--model", "demo", MASKRCNN_MAX_BATCH_SIZE="zero")
    assert result.returncode == 2
    assert "MASKRCNN_MAX_BATCH_SIZE" in result.stderr


@pytest.mark.parametrize("model_processes", ["0", "1"])
def test_a_model_that_cannot_load_stops_the_server_with_its_reason(tmp_path, model_processes):
    missing = tmp_path / "missing.safetensors"
    result = serve(tmp_path, "--model", str(missing), MASKRCNN_MODEL_PROCESSES=model_processes)
    assert result.returncode == 1
    assert "missing.safetensors" in result.stderr and "Traceback" not in result.stderr


def this_machines_address() -> str | None:
    """An address of this machine other than loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def listening(tmp_path, *args: str) -> Iterator[tuple[int, list[str]]]:
    """``maskrcnn serve --model demo ARGS`` until it answers on loopback; yields
    its port and, once it has stopped, its output lines."""
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--model", "demo"]
    command += ["--port", str(port), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    env["MASKRCNN_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "serve.log"
    output: list[str] = []
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not answers("127.0.0.1", port):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the server did not listen: {log.read_text()}"
            time.sleep(0.1)
        yield port, output
    finally:
        server.terminate()
        server.wait(60)
        output.extend(log.read_text().splitlines())


def test_by_default_it_listens_on_this_machine_only(tmp_path):
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no address but loopback to try")
    with listening(tmp_path) as (port, output):
        assert not answers(address, port)  # not on the machine's network address
    assert not [line for line in output if "anyone who can reach" in line]


def test_every_interface_without_tokens_is_warned_about(tmp_path):
    with listening(tmp_path, "--host", "0.0.0.0") as (port, output):
        address = this_machines_address()
        assert address is None or answers(address, port)
    assert [line for line in output if "listening on 0.0.0.0 with no MASKRCNN_API_TOKENS" in line]
