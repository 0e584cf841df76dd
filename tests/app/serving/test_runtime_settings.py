"""``RUNTIME`` and ``PRECISION`` on the CPU, through the service: what serves, what
start-up refuses, and where int8 finds the images it calibrates on."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.serving.loading import CALIBRATION_IMAGES, calibration_images, model_spec
from app.settings import load_settings
from app.store.db import DatasetRecord
from model import InvalidOptionError, ModelInfo
from model.inference.runtimes import openvino_cpu
from model.training.synthetic import generate_dataset
from tests.app.conftest import job_store, png_bytes, register_model, scene, wait_for

needs_int8 = pytest.mark.skipif(
    not openvino_cpu.cpu_flags() & set(openvino_cpu.INT8_FLAGS),
    reason="this CPU has no int8 dot-product units (amx_int8 or avx512_vnni)",
)


@contextlib.contextmanager
def started(tmp_path: Path, **settings) -> Iterator[tuple[TestClient, list]]:
    """The app on the real model loading, in this process; ``fatal`` collects a
    failed start-up's error."""
    app = create_app(load_settings(device="cpu", data_dir=tmp_path / "data", **settings))
    fatal: list = []
    app.state.service.on_fatal = fatal.append
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, fatal


def test_bf16_on_a_cpu_without_bfloat16_units_stops_start_up_naming_them(tmp_path, monkeypatch):
    """No silent float32 under a bfloat16 name: the service fails to start, and says
    which CPU flags it looked for."""
    monkeypatch.setattr(openvino_cpu, "cpu_flags", lambda: {"avx2", "avx512f", "fma"})
    with started(tmp_path, model="demo", precision="bf16") as (client, fatal):
        wait_for(lambda: fatal, 60, "the start-up to fail")
        response = client.get("/readyz")
        message = client.app.state.service.error  # what the log and `maskrcnn serve` say
    assert response.status_code == 503 and "failed to start" in response.text
    assert "bf16 on the CPU needs bfloat16 units (amx_bf16 or avx512_bf16" in message
    assert "this CPU has neither" in message


@needs_int8
def test_int8_serves_the_demo_model_calibrated_on_its_own_kind_of_scenes(tmp_path):
    with started(tmp_path, model="demo", precision="int8") as (client, fatal):
        wait_for(lambda: fatal or client.get("/readyz").status_code == 200, 120, "start-up")
        assert not fatal, fatal
        ready = client.get("/readyz").json()
        assert (ready["runtime"], ready["precision"]) == ("openvino", "int8")
        png = png_bytes(scene(128, 160, seed=3))
        response = client.post("/v1/segment", files=[("images", ("a.png", png, "image/png"))])
        assert response.status_code == 200, response.text


def test_int8_for_a_model_with_no_images_to_calibrate_on_names_the_setting(tmp_path, checkpoint):
    spec = model_spec(load_settings(model=str(checkpoint), precision="int8", data_dir=tmp_path))
    info = ModelInfo("tiny", "maskrcnn_resnet50_fpn", (0, 1, 2), ("bg", "a", "b"))
    with pytest.raises(InvalidOptionError, match="set MASKRCNN_CALIBRATION_IMAGES to a folder"):
        calibration_images(spec, info)
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = load_settings(model=str(checkpoint), precision="int8", calibration_images=empty)
    with pytest.raises(InvalidOptionError, match="holds none"):
        calibration_images(model_spec(settings), info)


def test_int8_calibrates_a_trained_model_on_its_dataset(tmp_path, checkpoint):
    """A registry model's spec names its training dataset's folder, resolved in the
    server's process; CALIBRATION_IMAGES wins over it; images spread over it."""
    data_dir = tmp_path / "data"
    folder = data_dir / "datasets" / "ds-1"
    generate_dataset(folder, num_images=40, image_size=64, seed=0)
    db = job_store(data_dir)
    with db.session() as session:
        session.add(
            DatasetRecord(
                id="ds-1",
                name="d",
                path="datasets/ds-1",
                num_images=40,
                num_annotations=1,
                categories=[],
                size_bytes=1,
            )
        )
    model_id = register_model(db, checkpoint, dataset_id="ds-1")
    settings = load_settings(model=model_id, precision="int8", data_dir=data_dir)
    spec = model_spec(settings, db=db)
    assert spec.calibration == str(folder)
    info = ModelInfo(model_id, "maskrcnn_resnet50_fpn", (0, 1, 2), ("bg", "a", "b"))
    images = calibration_images(spec, info)
    assert len(images) == CALIBRATION_IMAGES and all(i.shape == (3, 64, 64) for i in images)
    other = tmp_path / "other"
    generate_dataset(other, num_images=2, image_size=32, seed=1)
    chosen = load_settings(
        model=model_id, precision="int8", data_dir=data_dir, calibration_images=other
    )
    assert model_spec(chosen, db=db).calibration == str(other)
    assert model_spec(load_settings(model=model_id, data_dir=data_dir), db=db).calibration is None
    db.dispose()
