"""``maskrcnn serve`` refuses bad start-up conditions clearly."""

import contextlib
import socket
from collections.abc import Iterator

import pytest

from tests.app.conftest import ServerProcess, run_serve

pytestmark = pytest.mark.slow


def test_invalid_setting_stops_start_up_naming_the_variable(tmp_path):
    result = run_serve(tmp_path, "--model", "demo", MASKRCNN_MAX_BATCH_SIZE="zero")
    assert result.returncode == 2
    assert "MASKRCNN_MAX_BATCH_SIZE" in result.stderr


@pytest.mark.parametrize("model_processes", ["0", "1"])
def test_a_model_that_cannot_load_stops_the_server_with_its_reason(tmp_path, model_processes):
    missing = tmp_path / "missing.safetensors"
    result = run_serve(tmp_path, "--model", str(missing), MASKRCNN_MODEL_PROCESSES=model_processes)
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
def listening(tmp_path, host: str | None = None) -> Iterator[ServerProcess]:
    """``maskrcnn serve --model demo``, with ``--host`` only when ``host`` is given,
    until it answers on loopback."""
    env = {"MASKRCNN_DATA_DIR": str(tmp_path / "data")}
    server = ServerProcess("demo", env, tmp_path / "serve.log", host=host)
    try:
        server.wait_listening(120)
        yield server
    finally:
        server.stop()


def test_by_default_it_listens_on_this_machine_only(tmp_path):
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no address but loopback to try")
    with listening(tmp_path) as server:
        assert not answers(address, server.port)  # not on the machine's network address
    assert "anyone who can reach" not in server.log()


def test_every_interface_without_tokens_is_warned_about(tmp_path):
    with listening(tmp_path, "0.0.0.0") as server:
        address = this_machines_address()
        assert address is None or answers(address, server.port)
    assert "listening on 0.0.0.0 with no MASKRCNN_API_TOKENS" in server.log()
