"""``GET /v1/models/{id}/export``: an admin downloads the model as ONNX that ONNX
Runtime runs, or a Triton model folder whose config parses with Triton's protobuf;
made once and kept; refused without the admin token, for an unknown model, and for
a name or format it cannot take."""

import io
import zipfile

import numpy as np
import onnxruntime
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.app.conftest import ADMIN_TOKEN, AS_ADMIN, bearer, running_server, scene

pytestmark = pytest.mark.slow

API_TOKEN = "export-api-token"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def server(root):
    with running_server("demo", root, admin_token=ADMIN_TOKEN, api_tokens=API_TOKEN) as s:
        s.wait_ready()
        yield s


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_an_admin_downloads_onnx_that_onnx_runtime_runs(server, root):
    answer = server.client.get("/v1/models/demo/export", headers=AS_ADMIN, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    assert 'filename="demo.onnx"' in answer.headers["content-disposition"]
    runner = onnxruntime.InferenceSession(answer.content, providers=["CPUExecutionProvider"])
    image = scene(80, 120, 3).transpose(2, 0, 1).astype(np.float32) / 255
    boxes, labels, scores, masks = runner.run(None, {"images": image})
    assert masks.shape[1:] == (1, 80, 120) and len(boxes) == len(labels) == len(scores)
    again = server.client.get("/v1/models/demo/export?format=onnx", headers=AS_ADMIN)
    assert again.content == answer.content, "made once, then kept"
    kept = list((root / "data" / "exports").iterdir())  # running_server's DATA_DIR
    assert len(kept) == 1 and not [p for p in kept if p.name.startswith(".")]


def test_with_a_triton_name_it_answers_a_model_folder(server):
    answer = server.client.get(
        "/v1/models/demo/export", params={"triton": "shapes"}, headers=AS_ADMIN, timeout=300
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert sorted(archive.namelist()) == [
            "shapes/1/model.onnx",
            "shapes/classes.json",
            "shapes/config.pbtxt",
        ]
        config = text_format.Parse(
            archive.read("shapes/config.pbtxt").decode(), model_config_pb2.ModelConfig()
        )
        runner = onnxruntime.InferenceSession(archive.read("shapes/1/model.onnx"))
    assert config.name == "shapes"
    assert [i.name for i in config.input] == [i.name for i in runner.get_inputs()]
    assert [o.name for o in config.output] == [o.name for o in runner.get_outputs()]


def test_what_export_refuses(server):
    client = server.client
    assert_error(client.get("/v1/models/demo/export"), 401, "unauthorized")
    assert_error(client.get("/v1/models/demo/export", headers=bearer(API_TOKEN)), 403, "forbidden")
    assert_error(client.get("/v1/models/model-nope/export", headers=AS_ADMIN), 404, "not_found")
    for params in ({"triton": "../outside"}, {"triton": ""}, {"format": "tflite"}):
        answer = client.get("/v1/models/demo/export", params=params, headers=AS_ADMIN)
        assert_error(answer, 422, "validation_error")
