"""``maskrcnn --help`` and every command's ``--help`` answer without importing
torch (commands are imported lazily), and list what they should."""

import json
import os
import subprocess
import sys

import pytest

from app.cli import COMMANDS, command_in
from model.training.synthetic import generate_dataset
from tests.app.conftest import REPO, job_store, png_bytes, register_model, scene

HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from app.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(out.getvalue())
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_answers_without_importing_torch(command):
    argv = ["--help"] if command is None else [command, "--help"]
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in COMMANDS)
    else:
        assert f"usage: maskrcnn {command}" in result.stdout


def test_the_command_is_the_first_positional_argument():
    assert command_in(["--log-level", "DEBUG", "train", "--dataset", "serve"]) == "train"
    assert command_in(["--help"]) is None
    assert command_in(["nope"]) is None


def test_an_unknown_command_is_refused_by_name():
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "nope"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr


def maskrcnn(
    *args: str, env: dict[str, str] | None = None, on_cpu: bool = True
) -> subprocess.CompletedProcess:
    """The real command, on the CPU (``on_cpu``: for a command that takes ``--device``)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, *(["--device", "cpu"] if on_cpu else [])],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def previous(tmp_path):
    out = tmp_path / "results.json"
    out.write_text('[{"kept": true}]')
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["missing", "corrupt", "text"])
def test_predict_never_overwrites_results_when_no_image_can_be_read(tmp_path, previous, bad):
    image = tmp_path / f"{bad}.jpg"
    if bad == "corrupt":
        image.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    elif bad == "text":
        image.write_text("not an image")
    result = maskrcnn("predict", str(image), "--model", "demo", "--out", str(previous))
    assert result.returncode == 1
    assert "skipped" in result.stderr and "not written" in result.stderr
    assert previous.read_text() == '[{"kept": true}]'
    assert not previous.with_name("results.json.tmp").exists()


@pytest.mark.slow
def test_predict_writes_the_readable_images_and_still_fails(tmp_path, previous):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(scene(64, 64, seed=0)))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = maskrcnn(
        "predict",
        str(good),
        str(bad),
        "--model",
        "demo",
        "--score-threshold",
        "0",
        "--out",
        str(previous),
    )
    assert result.returncode == 1
    rows = json.loads(previous.read_text())
    assert rows and {row["image_id"] for row in rows} == {1}


@pytest.fixture
def registered(tmp_path, checkpoint):
    """A registry model in a ``DATA_DIR`` of its own, and the environment naming it."""
    data_dir = tmp_path / "data"
    db = job_store(data_dir)
    try:
        model_id = register_model(db, checkpoint)
    finally:
        db.dispose()
    return model_id, {**os.environ, "MASKRCNN_DATA_DIR": str(data_dir)}


@pytest.mark.slow
def test_predict_and_evaluate_take_a_registry_model_id(tmp_path, registered):
    model_id, env = registered
    dataset = tmp_path / "shapes"
    generate_dataset(dataset, num_images=2, image_size=64, seed=0)
    out = tmp_path / "results.json"
    images = sorted((dataset / "images").iterdir())
    predicted = maskrcnn(
        "predict", *map(str, images), "--model", model_id, "--out", str(out), env=env
    )
    assert predicted.returncode == 0, predicted.stderr
    assert f"predict ({model_id})" in predicted.stderr
    # OpenVINO by default on the CPU; the torch runtime on request finds the same
    eager = tmp_path / "eager.json"
    command = ["predict", *map(str, images), "--model", model_id, "--runtime", "torch"]
    predicted = maskrcnn(*command, "--out", str(eager), env=env)
    assert predicted.returncode == 0, predicted.stderr
    rows, eager_rows = (json.loads(path.read_text()) for path in (out, eager))
    assert rows and [r["category_id"] for r in rows] == [r["category_id"] for r in eager_rows]
    for row, eager_row in zip(rows, eager_rows, strict=True):
        assert row["score"] == pytest.approx(eager_row["score"], abs=1e-3)
        assert row["bbox"] == pytest.approx(eager_row["bbox"], abs=0.05)
    evaluated = maskrcnn("evaluate", "--dataset", str(dataset), "--model", model_id, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"evaluate ({model_id})" in evaluated.stderr


@pytest.mark.slow
def test_an_unknown_model_names_every_kind_of_spec(tmp_path, registered):
    _, env = registered
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(scene(32, 32, seed=0)))
    predicted = maskrcnn("predict", str(image), "--model", "model-nope", env=env)
    assert predicted.returncode == 1
    assert "not auto, demo, coco, coco-v2, an existing file, nor a model id" in predicted.stderr
    trained = maskrcnn(
        "train",
        "--dataset",
        str(tmp_path),
        "--out",
        str(tmp_path / "o.safetensors"),
        "--base-model",
        "model-nope",
        env=env,
    )
    assert trained.returncode == 1
    assert "not scratch, demo, coco, coco-v2, an existing file, nor a model id" in trained.stderr


def test_train_refuses_zero_epochs_and_shows_its_defaults(tmp_path):
    refused = maskrcnn("train", "--dataset", str(tmp_path), "--out", "x", "--epochs", "0")
    assert refused.returncode == 2
    assert "--epochs: must be at least 1, got 0" in refused.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    for default in ("(default: 10)", "(default: scratch)", "a tenth of all steps, at most 200"):
        assert default in " ".join(shown.split()), default


@pytest.mark.slow
def test_predict_takes_segments_options_checked_as_the_api_checks_them(tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(scene(128, 128, 4)))
    out = tmp_path / "results.json"
    refused = maskrcnn("predict", str(image), "--model", "demo", "--score-threshold", "2")
    assert refused.returncode == 2
    assert "--score-threshold: Input should be less than or equal to 1" in refused.stderr

    assert maskrcnn(
        "predict", str(image), "--model", "demo", "--score-threshold", "0.05", "--out", str(out)
    ).returncode == 0
    every = json.loads(out.read_text())
    found = sorted({row["category_id"] for row in every})
    assert len(found) >= 3, "a scene with three kinds of shapes"
    for wanted, flags in [
        (found[:1], ["--classes", str(found[0])]),
        (found[:2], ["--classes", f"{found[0]},{found[1]}"]),  # as a form field takes them
        (found[1:3], ["--classes", str(found[1]), "--classes", str(found[2])]),  # or repeated
    ]:
        assert maskrcnn(
            "predict", str(image), "--model", "demo", "--score-threshold", "0.05",
            *flags, "--out", str(out),
        ).returncode == 0
        only = json.loads(out.read_text())
        assert only == [row for row in every if row["category_id"] in wanted], flags

    unknown = maskrcnn("predict", str(image), "--model", "demo", "--classes", "zebra")
    assert unknown.returncode == 2 and "--classes" in unknown.stderr and "zebra" in unknown.stderr


@pytest.mark.slow
def test_export_writes_an_onnx_file_onnx_runtime_runs(tmp_path):
    import numpy as np
    import onnxruntime

    exported = maskrcnn("export", "--model", "demo", "--out", str(tmp_path / "onnx"), on_cpu=False)
    assert exported.returncode == 0, exported.stderr
    runner = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    image = scene(96, 128, 5).transpose(2, 0, 1).astype(np.float32) / 255
    boxes, labels, scores, masks = runner.run(None, {"images": image})
    assert masks.shape[1:] == (1, 96, 128) and len(boxes) == len(labels) == len(scores)
    classes = json.loads((tmp_path / "onnx" / "classes.json").read_text())
    assert classes[0]["name"] == "background" and len(classes) > 1

    for name in ("../x", "shapes\n"):
        refused = maskrcnn("export", "--out", str(tmp_path / "t"), "--triton", name, on_cpu=False)
        assert refused.returncode == 2 and "--triton" in refused.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()
