"""Error bodies name nothing of the server: a registry model whose checkpoint is
truncated or gone answers an inference client with what failed and the request
id, the path and the reason going to the log; and every error code the app can
send is documented in docs/api.md.
(Every error body of every in-process test is checked for paths by
``tests/app/conftest.py``, and the whole suite must send every code.)"""

import logging

import pytest

from tests.app.conftest import (
    ADMIN_TOKEN,
    REPO,
    bearer,
    fake_client,
    job_store,
    png_bytes,
    register_model,
    scene,
)
from tests.app.errorbodies import codes_in_source

INFERENCE = "inference-token-123"


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_broken_registry_checkpoint_answers_without_the_servers_paths(
    tmp_path, checkpoint, caplog, damage
):
    data_dir = tmp_path / "data"
    db = job_store(data_dir)
    model_id = register_model(db, checkpoint)
    db.dispose()
    file = data_dir / "models" / f"{model_id}.safetensors"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    else:
        file.unlink()
    tokens = {"api_tokens": INFERENCE, "admin_token": ADMIN_TOKEN}
    with fake_client(data_dir=data_dir, **tokens) as client, caplog.at_level(logging.ERROR):
        files = [("images", ("a.png", png_bytes(scene(64, 64, 0)), "image/png"))]
        response = client.post(
            "/v1/segment", files=files, data={"model": model_id}, headers=bearer(INFERENCE)
        )
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "model_error"
        assert error["request_id"] in error["message"] and "server log" in error["message"]
        for private in (str(data_dir), str(tmp_path), "safetensors", "MASKRCNN_DATA_DIR"):
            assert private not in error["message"]
        logged = [r.getMessage() for r in caplog.records if error["request_id"] in r.getMessage()]
        assert any(str(file) in line for line in logged), caplog.text  # the detail, for operators


def test_every_error_code_is_documented():
    codes = codes_in_source()
    assert {"busy", "too_many_jobs", "model_error", "validation_error"} <= codes
    documented = (REPO / "docs" / "api.md").read_text()
    assert not [code for code in sorted(codes) if f"`{code}`" not in documented]
