"""A client generated from the live ``/openapi.json`` with openapi-python-client,
no configuration: no generator warning, classes named as the document names
them, and, with a plain ``Client`` (the server is open) and an
``AuthenticatedClient``, segment (multipart and JSON), visualize (the PNG bytes)
and list models against a real ``maskrcnn serve``."""

import base64
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import SCENE_PNGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generated(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("client")
    spec = folder / "openapi.json"
    spec.write_bytes(server.client.get("/openapi.json").content)
    package = folder / "maskrcnn_client"
    generate = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec)]
    # the generator formats its code with ruff, found on PATH: the dev install's,
    # also when the tests run without the virtual environment activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run(
        [*generate, "--meta", "none", "--output-path", str(package)],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "PATH": path},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(folder))
    try:
        yield lambda name: importlib.import_module(f"maskrcnn_client{name}")
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.startswith("maskrcnn_client")]:
            del sys.modules[name]


def test_the_generated_classes_have_the_documents_names(generated):
    models = generated(".models")
    for name in ("SegmentForm", "VisualizeForm", "ImageUrl", "ImageData", "MaskFormat", "JobState"):
        assert hasattr(models, name), name
    assert not [name for name in dir(models) if "Type0" in name or name.startswith("Body")]


@pytest.mark.parametrize("authenticated", [False, True])
def test_the_generated_client_segments_visualizes_and_lists_models(
    generated, server, authenticated
):
    root, models, types = generated(""), generated(".models"), generated(".types")
    timeout = httpx.Timeout(60)
    if authenticated:
        client = root.AuthenticatedClient(base_url=server.url, token="any-token-1", timeout=timeout)
    else:
        client = root.Client(base_url=server.url, timeout=timeout)

    def upload():
        return types.File(
            payload=io.BytesIO(SCENE_PNGS[0]), file_name="a.png", mime_type="image/png"
        )

    segment = generated(".api.segmentation.segment")
    result = segment.sync(client=client, body=models.SegmentForm(images=[upload()]))
    assert isinstance(result, models.SegmentationPublic), result
    [image] = result.results
    assert isinstance(image, models.ImageResultPublic) and image.width == 96
    assert all(isinstance(d, models.DetectionPublic) for d in image.detections)
    assert all(isinstance(d.mask, models.RleMaskPublic) for d in image.detections)

    as_json = generated(".api.segmentation.segment_json")
    inline = models.ImageData(data=base64.b64encode(SCENE_PNGS[0]).decode())
    by_json = as_json.sync(client=client, body=models.SegmentRequest(images=[inline]))
    assert isinstance(by_json, models.SegmentationPublic), by_json
    assert [d.box for d in by_json.results[0].detections] == [d.box for d in image.detections]

    visualize = generated(".api.segmentation.segment_visualize")
    png = visualize.sync(client=client, body=models.VisualizeForm(image=upload()))
    assert png.payload.read().startswith(b"\x89PNG\r\n\x1a\n")

    listed = generated(".api.models.list_models").sync(client=client)
    assert isinstance(listed, models.ModelsPublic) and listed.data[0].active


def test_visualize_labels_its_png_as_the_accept_header_asks(server):
    files = {"image": ("a.png", SCENE_PNGS[0], "image/png")}
    for accept, expected in [
        ("application/octet-stream", "application/octet-stream"),
        ("image/png", "image/png"),
        ("*/*", "image/png"),
    ]:
        response = server.client.post(
            "/v1/segment/visualize", files=files, headers={"Accept": accept}
        )
        assert response.headers["content-type"] == expected
        assert response.content.startswith(b"\x89PNG")
