"""Routes, error shape and schema, in process, on a fake predictor."""

import base64
import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from app.main import create_app
from app.serving.predictors import InProcessPredictor
from app.settings import load_settings
from tests.app.conftest import fake_client, png_bytes
from tests.app.fakes import FakePredictor


def solid_png(value: int, size=(24, 32)) -> bytes:
    return png_bytes(np.full((*size, 3), value, dtype=np.uint8))


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert body["error"]["message"]
    return body["error"]


def test_segment_multipart_answers_per_image_in_order(client):
    files = [("images", (f"{v}.png", solid_png(v), "image/png")) for v in (200, 10, 150)]
    response = client.post("/v1/segment", files=files, data={"score_threshold": "0.3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"id": "fake", "architecture": "fake_arch", "kind": "custom"}
    assert [len(r["detections"]) for r in body["results"]] == [1, 0, 1]
    assert body["results"][0] == {
        "width": 32,
        "height": 24,
        "detections": [
            {
                "class_id": 1,
                "class_name": "a",
                "score": pytest.approx(200 / 255),
                "box": [8.0, 6.0, 24.0, 18.0],
                "mask": body["results"][0]["detections"][0]["mask"],
            }
        ],
    }
    mask = mask_utils.decode(body["results"][0]["detections"][0]["mask"])
    assert mask.shape == (24, 32) and mask.sum() == 16 * 12
    assert set(body["timing_ms"]) == {"queue", "inference", "postprocess", "total"}


def test_segment_json_with_base64(client):
    data = base64.b64encode(solid_png(255)).decode()
    response = client.post(
        "/v1/segment/json",
        json={"images": [{"data": data}, {"data": f"data:image/png;base64,{data}"}]},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_json_url_items_get_a_clear_400_when_url_fetch_is_off():
    with fake_client(url_fetch=False) as client:
        response = client.post(
            "/v1/segment/json", json={"images": [{"url": "https://example.com/a.jpg"}]}
        )
        assert "base64" in assert_error(response, 400, "url_fetch_disabled")["message"]


def test_bad_inputs_get_the_error_shape(client):
    post = client.post
    assert_error(
        post("/v1/segment/json", json={"images": [{"data": "%%%"}]}), 400, "invalid_base64"
    )
    assert_error(post("/v1/segment/json", json={"images": []}), 422, "validation_error")
    assert_error(post("/v1/segment/json", json={"images": [{}]}), 422, "validation_error")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    files = [("images", ("a.png", gif.getvalue(), "image/png"))]
    assert_error(post("/v1/segment", files=files), 415, "unsupported_media_type")
    files = [("images", ("a.png", solid_png(1)[:40], "image/png"))]
    assert_error(post("/v1/segment", files=files), 400, "invalid_image")
    files = [("images", ("a.png", solid_png(1), "image/png"))]
    assert_error(
        post("/v1/segment", files=files, data={"score_threshold": "2"}), 422, "validation_error"
    )
    assert_error(post("/v1/segment", files=files, data={"classes": "zebra"}), 422, "invalid_option")
    assert_error(post("/v1/segment", data={"score_threshold": "0.1"}), 422, "validation_error")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/segment"), 405, "method_not_allowed")
    assert_error(client.get("/v1/models/other"), 404, "not_found")


def test_class_filter_accepts_names_ids_and_commas(client):
    files = [("images", ("a.png", solid_png(200), "image/png"))]
    for classes in (["a"], ["1"], ["b,a"], ["b", "1"]):
        response = client.post("/v1/segment", files=files, data={"classes": classes})
        assert response.status_code == 200, (classes, response.text)


def test_size_limits_are_413():
    with fake_client(max_images_per_request=2, max_upload_mb=0.01) as client:
        files = [("images", (f"{i}.png", solid_png(i), "image/png")) for i in range(3)]
        assert_error(client.post("/v1/segment", files=files), 413, "too_many_images")
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
        files = [("images", ("big.png", big, "image/png"))]
        assert_error(client.post("/v1/segment", files=files), 413, "payload_too_large")
    with fake_client(max_image_pixels=100) as client:
        files = [("images", ("a.png", solid_png(1), "image/png"))]
        assert_error(client.post("/v1/segment", files=files), 413, "image_too_large")


def test_readyz_is_503_until_warm_up_passes_and_segment_waits_for_it():
    release = threading.Event()

    def slow_loader(_settings):
        release.wait(10)
        return InProcessPredictor(FakePredictor())

    app = create_app(load_settings(), load_predictor=slow_loader)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        error = assert_error(client.get("/readyz"), 503, "not_ready")
        assert "loading" in error["message"]
        files = [("images", ("a.png", solid_png(1), "image/png"))]
        response = client.post("/v1/segment", files=files)
        assert_error(response, 503, "not_ready")
        assert int(response.headers["retry-after"]) >= 1
        release.set()
        for _ in range(500):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert client.get("/readyz").json()["model"]["id"] == "fake"


def test_failed_model_load_keeps_readyz_503_and_logs_the_reason(caplog):
    def broken(_settings):
        raise RuntimeError("no such weights")

    with TestClient(create_app(load_settings(), load_predictor=broken)) as client:
        for _ in range(200):
            response = client.get("/readyz")
            if "failed" in response.text:
                break
            threading.Event().wait(0.01)
        message = assert_error(response, 503, "not_ready")["message"]
    # the reason may name the server's files or database: the log has it, not clients
    assert "failed to start" in message and "no such weights" not in message
    assert "no such weights" in caplog.text


def test_models_lists_the_served_model(client):
    listing = client.get("/v1/models").json()
    assert listing["count"] == 1
    model = listing["data"][0]
    assert model["id"] == "fake" and model["active"] is True
    assert model["classes"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert client.get("/v1/models/fake").json() == model


def test_request_id_is_echoed(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    response = client.get("/healthz", headers={"X-Request-ID": "bad id\n"})
    assert response.headers["x-request-id"] != "bad id\n"


def test_metrics_expose_requests_batches_and_queue(client):
    files = [("images", ("a.png", solid_png(1), "image/png"))]
    client.post("/v1/segment", files=files)
    text = client.get("/metrics").text
    assert (
        'maskrcnn_http_requests_total{method="POST",route="/v1/segment",status="200"} 1.0' in text
    )
    for name in (
        "maskrcnn_queue_depth",
        "maskrcnn_batch_size_bucket",
        "maskrcnn_inference_seconds_bucket",
        "maskrcnn_postprocess_seconds_bucket",
        "maskrcnn_http_request_duration_seconds_bucket",
        "maskrcnn_ready 1.0",
        "maskrcnn_http_requests_in_flight 1.0",  # the /metrics request itself
    ):
        assert name in text


def test_openapi_has_stable_operation_ids_and_the_error_schema(client):
    schema = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert {"segment", "segment_json", "segment_visualize", "list_models", "get_model"} <= ids
    assert {"healthz", "readyz", "metrics"} <= ids
    segment = schema["paths"]["/v1/segment"]["post"]
    assert segment["tags"] == ["segmentation"]
    assert segment["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorPublic"
    }
    assert "SegmentationPublic" in schema["components"]["schemas"]


@pytest.mark.parametrize(("fmt", "kind"), [("polygon", list), ("none", type(None))])
def test_mask_formats(client, fmt, kind):
    files = [("images", ("a.png", solid_png(200), "image/png"))]
    response = client.post("/v1/segment", files=files, data={"mask_format": fmt})
    assert isinstance(response.json()["results"][0]["detections"][0]["mask"], kind)


def test_visualize_draws_masks_on_a_png_of_the_input_size(client):
    array = np.full((48, 64, 3), 200, dtype=np.uint8)
    response = client.post(
        "/v1/segment/visualize", files={"image": ("a.png", png_bytes(array), "image/png")}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert drawn.shape == array.shape
    inside = np.abs(drawn[20:28, 22:42].astype(int) - array[20:28, 22:42]).sum(axis=2)
    assert (inside > 0).all()  # the mask (rows 12..36, cols 16..48) is tinted
    assert (drawn[44:, :10] == array[44:, :10]).all()  # far from the drawing


def test_streamed_body_over_the_limit_is_413():
    with fake_client(max_upload_mb=0.001) as client:

        def chunks():
            for _ in range(10):
                yield b"x" * 500

        response = client.post(
            "/v1/segment/json", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(response, 413, "payload_too_large")


def test_an_unexpected_error_is_a_500_in_the_error_shape_without_a_traceback(client, caplog):
    @client.app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    response = client.get("/boom", headers={"X-Request-ID": "boom-1"})
    error = assert_error(response, 500, "internal_error")
    assert error["request_id"] == "boom-1"
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text  # the details go to the log
