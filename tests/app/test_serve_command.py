"""``maskrcnn serve`` refuses bad start-up conditions clearly."""

import os
import subprocess
import sys

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
