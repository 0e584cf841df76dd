"""What a user who gets a request or a setting wrong is told, against a real
``maskrcnn serve``: the field that was wrong in one path style (``images[0]``),
what was expected, and a hint for the usual mistakes."""

import base64
import struct
import zlib

import numpy as np
import pytest

from tests.app.conftest import AS_ADMIN, png_bytes, run_serve, running_server, scene

pytestmark = pytest.mark.slow

PNG = png_bytes(scene(48, 64, seed=0))


@pytest.fixture(scope="module")
def admin_server(checkpoint, tmp_path_factory):
    from tests.app.conftest import ADMIN_TOKEN

    with running_server(
        checkpoint, tmp_path_factory.mktemp("errors"), admin_token=ADMIN_TOKEN
    ) as server:
        server.wait_ready()
        yield server


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_the_singular_and_the_plural_file_field_say_which_route_takes_which(admin_server):
    client = admin_server.client
    one = [("image", ("a.png", PNG, "image/png"))]
    many = [("images", ("a.png", PNG, "image/png"))]
    message = error_of(client.post("/v1/segment", files=one), 422)
    assert message.startswith("images: Field required")
    assert "/v1/segment/visualize takes one `image`" in message
    message = error_of(client.post("/v1/segment/visualize", files=many), 422)
    assert message.startswith("image: Field required") and "`images`" in message


def test_multipart_and_broken_json_on_the_json_route(admin_server):
    client = admin_server.client
    files = [("images", ("a.png", PNG, "image/png"))]
    message = error_of(client.post("/v1/segment/json", files=files), 422)
    assert "expected a JSON object (Content-Type: application/json), got multipart/form-data" in (
        message
    )
    assert "send them as multipart to /v1/segment" in message
    broken = b'{"images": [{"data": }'
    headers = {"Content-Type": "application/json"}
    message = error_of(client.post("/v1/segment/json", content=broken, headers=headers), 422)
    assert message == "body: not valid JSON (Expecting value at character 21)"


def test_field_paths_have_one_style(admin_server):
    client = admin_server.client
    body = {"images": [{"url": "http://a.example/x"}, {"data": "abc", "url": "http://x"}]}
    message = error_of(client.post("/v1/segment/json", json=body), 422)
    assert message == "images[1]: give exactly one of `url` or `data`"
    message = error_of(client.get("/v1/training-jobs?limit=0", headers=AS_ADMIN), 422)
    assert message.startswith("query parameter limit: ")


def test_405_lists_every_method_the_path_serves(admin_server):
    response = admin_server.client.put("/v1/datasets", headers=AS_ADMIN)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["error"]["message"].endswith("allowed: GET, POST")


def test_the_openapi_document_and_docs_pages_have_their_own_metrics_route(admin_server):
    client = admin_server.client
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics").text
    assert 'route="/openapi.json",status="200"' in metrics
    assert 'route="/docs",status="200"' in metrics


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + (chunk(b"IEND", b""))
    )


def test_an_image_past_pillows_own_limit_names_max_image_pixels(admin_server):
    files = [("images", ("huge.png", huge_png(30000, 30000), "image/png"))]
    response = admin_server.client.post("/v1/segment", files=files)
    message = error_of(response, 413)
    assert response.json()["error"]["code"] == "image_too_large"
    assert "(MAX_IMAGE_PIXELS)" in message and "DecompressionBomb" not in message
    assert "could be decompression bomb" not in message


def test_a_short_admin_token_stops_start_up_naming_the_variable(tmp_path):
    result = run_serve(tmp_path, "--model", "demo", MASKRCNN_ADMIN_TOKEN="abc")
    assert result.returncode == 2
    assert "MASKRCNN_ADMIN_TOKEN" in result.stderr and "at least 8 characters" in result.stderr


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_half_precision_on_the_cpu_is_reported_and_fp32_is_served(tmp_path, runtime):
    with running_server(
        "demo", tmp_path, precision="fp16", device="cpu", runtime=runtime
    ) as server:
        server.wait_ready()
        (served,) = [m for m in server.client.get("/v1/models").json()["data"] if m["active"]]
        assert (served["precision"], served["runtime"]) == ("fp32", runtime)
        ready = server.client.get("/readyz").json()
        assert (ready["precision"], ready["runtime"]) == ("fp32", runtime)
        assert "MASKRCNN_PRECISION=fp16 has no effect on cpu" in server.log()
        assert "serving fp32" in server.log()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with running_server("demo", tmp_path_factory.mktemp("thin")) as server:
        server.wait_ready()
        yield server


@pytest.mark.parametrize(
    ("width", "height"), [(385, 1), (10000, 1), (1, 10000), (4000, 8), (3, 2000)]
)
def test_an_image_too_thin_for_the_network_is_a_400_naming_the_limit(demo_server, width, height):
    png = png_bytes(np.full((height, width, 3), 128, dtype=np.uint8))
    b64 = base64.b64encode(png).decode()
    client = demo_server.client
    for response in (
        client.post("/v1/segment", files=[("images", ("thin.png", png, "image/png"))]),
        client.post("/v1/segment/json", json={"images": [{"data": b64}]}),
        client.post("/v1/segment/visualize", files=[("image", ("thin.png", png, "image/png"))]),
    ):
        message = error_of(response, 400)
        assert response.json()["error"]["code"] == "invalid_image"
        assert f"a {width}x{height} image is too thin for this model" in message
        assert "the longer side may be at most 384 times the shorter" in message
    fine = png_bytes(np.full((2, 384, 3), 128, dtype=np.uint8))  # just inside the limit
    assert client.post("/v1/segment", files=[("images", ("ok.png", fine, "image/png"))]).is_success
