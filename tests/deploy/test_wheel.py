"""The wheel is what users get (the Dockerfile installs the project with ``pip
install .``): built from the checkout, installed into a folder of its own, and
run from outside the checkout, it holds every module and serves ``/v1/segment``
and the console."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from app.cli import COMMANDS
from tests.app.conftest import REPO, ServerProcess, png_bytes, scene

pytestmark = pytest.mark.slow

PIP = [sys.executable, "-m", "pip", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the Dockerfile copies into its build stage: a
    ``build/`` folder left in the checkout by an earlier build cannot fill gaps."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("app", "model"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("maskrcnn_service-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [*PIP, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    return target


def outside(installed: Path, tmp_path: Path) -> dict[str, str]:
    """An environment whose only copy of the project is the installed wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
    env["PYTHONPATH"] = str(installed)
    env["MASKRCNN_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_the_wheel_holds_every_module_and_the_demo_weights(wheel):
    tracked = subprocess.run(
        ["git", "ls-files", "app", "model"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    # the modules, the demo weights and the console's files: everything but tests' data
    wanted = {f for f in tracked if f.endswith(".py") or f.endswith(".safetensors")}
    wanted |= {f for f in tracked if f.startswith("app/console/")}
    assert "app/api/routes/segment.py" in wanted and "model/weights/demo.safetensors" in wanted
    assert "app/console/index.html" in wanted
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(wanted - names) == []


def test_the_installed_wheel_imports_every_command_outside_the_checkout(installed, tmp_path):
    modules = ["app.cli", "app.main", *(f"app.commands.{name}" for name in COMMANDS)]
    code = (
        "import importlib, app, model\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(app.__file__); print(model.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=outside(installed, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for path in result.stdout.split():
        assert Path(path).is_relative_to(installed), path


def test_the_installed_wheel_serves_segment_from_outside_the_checkout(installed, tmp_path):
    env = outside(installed, tmp_path)
    server = ServerProcess("demo", env, tmp_path / "server.log", cwd=tmp_path)
    try:
        server.wait_ready(timeout=120)
        files = [("images", ("scene.png", png_bytes(scene(96, 128, seed=0)), "image/png"))]
        response = server.client.post("/v1/segment", files=files)
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert (result["width"], result["height"]) == (128, 96)
        assert response.json()["model"]["id"] == "demo"
        page = server.client.get("/")  # the console, from the installed package
        assert page.status_code == 200 and "console/" in page.text
        for name in ("main.js", "style.css"):
            assert server.client.get(f"/console/{name}").status_code == 200
    finally:
        server.stop()
