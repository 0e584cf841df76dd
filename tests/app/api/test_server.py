"""Acceptance tests against real ``maskrcnn serve`` processes over real HTTP,
with a tiny random-weight model."""

import concurrent.futures
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.app.conftest import SCENE_PNGS, SCENES, box_iou, running_server, wait_for

pytestmark = pytest.mark.slow


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """Batch invariance: same classes, boxes IoU ≥ 0.99, scores ± 0.01."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g["class_id"] == e["class_id"]
        assert abs(g["score"] - e["score"]) <= 0.01
        assert box_iou(g["box"], e["box"]) >= 0.99


def segment(client: httpx.Client, indices, **options) -> httpx.Response:
    files = [("images", (f"{i}.png", SCENE_PNGS[i], "image/png")) for i in indices]
    return client.post("/v1/segment", files=files, data=options)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Each image alone through an in-process predictor on the same checkpoint."""
    import torch

    from model.inference.options import PredictOptions
    from model.inference.predictor import Predictor
    from model.loading import load_model

    loaded = load_model(str(checkpoint), device="cpu")
    predictor = Predictor(loaded.network, loaded.info)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for image in SCENES:
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
            [result] = predictor.predict([tensor], [PredictOptions()])
            results.append([{**d.__dict__, "box": list(d.box)} for d in result.detections])
    finally:
        torch.set_num_threads(threads)
    assert sum(map(len, results)) > 0, "the test model should detect something"
    return results


def test_concurrent_clients_share_batches_and_get_correct_results(server, reference):
    forwards, images = (
        server.metric("maskrcnn_forwards_total"),
        server.metric("maskrcnn_images_forwarded_total"),
    )

    def client_work(n: int) -> list[tuple[int, dict]]:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            answers = []
            for k in range(2):  # 2 requests of 2 images: 4 images per client
                indices = [(n + 2 * k) % 8, (n + 2 * k + 1) % 8]
                response = segment(client, indices)
                assert response.status_code == 200, response.text
                answers += zip(indices, response.json()["results"], strict=True)
            return answers

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = [a for batch in pool.map(client_work, range(16)) for a in batch]
    assert len(answers) == 64
    for index, result in answers:
        assert (result["height"], result["width"]) == SCENES[index].shape[:2]
        assert_same_detections(result["detections"], reference[index])
        for detection in result["detections"]:
            assert mask_utils.decode(detection["mask"]).shape == SCENES[index].shape[:2]
    new_forwards = server.metric("maskrcnn_forwards_total") - forwards
    new_images = server.metric("maskrcnn_images_forwarded_total") - images
    assert new_images == 64
    assert new_forwards < 64  # some batches held more than one image
    text = server.client.get("/metrics").text
    assert 'maskrcnn_batch_size_bucket{le="1.0"}' in text


def test_batch_invariance_with_mixed_batches_and_options(server, reference):
    alone = segment(server.client, [0]).json()["results"][0]["detections"]
    assert_same_detections(alone, reference[0])
    variants = [
        ([0, 1, 2], {}),
        ([3, 0], {"score_threshold": "0.05", "mask_format": "none"}),
        ([6, 0, 7], {"max_detections": "3", "classes": "b"}),
        ([4, 5], {"iou_threshold": "0.2", "mask_threshold": "0.9", "mask_format": "polygon"}),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        futures = [pool.submit(segment, server.client, ix, **opts) for ix, opts in variants]
        # the first request carries image 0 with default options; the others share batches
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert_same_detections(responses[0].json()["results"][0]["detections"], alone)
    mixed = responses[1].json()["results"][1]["detections"]
    strict = [d for d in mixed if d["score"] >= 0.5]
    assert_same_detections(strict, [{**d, "mask": None} for d in alone])
    filtered = responses[2].json()["results"][1]["detections"]
    assert_same_detections(filtered, [d for d in alone if d["class_name"] == "b"][:3])


def test_healthz_answers_fast_while_the_model_is_busy(server):
    busy = threading.Thread(target=segment, args=(server.client, list(range(8)) * 3))
    busy.start()
    in_flight = "maskrcnn_http_requests_in_flight"
    wait_for(lambda: server.metric(in_flight) >= 2, 30, "the busy request to arrive")
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        while busy.is_alive() and len(latencies) < 10:
            start = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    busy.join()
    assert latencies, "the busy request ended too soon to probe"
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies
    assert max(latencies) < 0.25, latencies


def test_visualize_returns_a_png_of_the_input_size_drawn_where_masks_are(server):
    files = {"image": ("scene.png", SCENE_PNGS[0], "image/png")}
    response = server.client.post("/v1/segment/visualize", files=files)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    assert drawn.shape == SCENES[0].shape
    detections = segment(server.client, [0]).json()["results"][0]["detections"]
    masks = [mask_utils.decode(d["mask"]).astype(bool) for d in detections]
    covered = np.logical_or.reduce(masks)
    assert covered.any()
    changed = np.abs(drawn - SCENES[0]).sum(axis=2) > 0
    assert changed[covered].mean() > 0.9


def test_queue_full_503_deadline_504_and_disconnects_never_reach_the_model(checkpoint, tmp_path):
    # batches wait 2 s for company, so queued images stay queued: deterministic timing
    settings = {"max_batch_size": 8, "max_batch_delay_ms": 2000, "max_queue_size": 2}
    settings |= {"max_images_per_request": 2, "request_timeout_s": 1}
    with running_server(checkpoint, tmp_path, **settings) as server:
        server.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(segment, server.client, [0, 1])  # fills the queue
            wait_for(lambda: server.metric("maskrcnn_queue_depth") == 2, 30, "a full queue")
            with httpx.Client(base_url=server.url, timeout=10) as other:
                refused = segment(other, [2])
            late = waiting.result()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "deadline_exceeded"

        impatient = httpx.Client(base_url=server.url, timeout=0.3)
        with impatient, pytest.raises(httpx.ReadTimeout):
            segment(impatient, [3])  # queued, then the client goes away
        dropped = 'maskrcnn_dropped_images_total{reason="disconnected"} 1.0'
        wait_for(lambda: dropped in server.client.get("/metrics").text, 30, "the drop")
        # out of the queue: it can never be forwarded
        assert server.metric("maskrcnn_queue_depth") == 0
        metrics = server.client.get("/metrics").text
        assert server.metric("maskrcnn_forwards_total") == 0
        assert 'maskrcnn_dropped_images_total{reason="disconnected"} 1.0' in metrics
        assert 'maskrcnn_dropped_images_total{reason="deadline"} 2.0' in metrics
        assert 'maskrcnn_rejected_requests_total{reason="queue_full"} 1.0' in metrics


def test_readyz_follows_warm_up_and_sigterm_drains_in_flight_work(checkpoint, tmp_path):
    with running_server(checkpoint, tmp_path, max_batch_size=2) as server:
        server.wait_listening()
        assert server.client.get("/readyz").status_code == 503  # loading or warming up
        assert server.client.get("/healthz").status_code == 200
        server.wait_ready()
        ready = server.client.get("/readyz").json()
        how = (ready["device"], ready["runtime"], ready["precision"])
        assert how == ("cpu", "openvino", "fp32")  # on the CPU, by default

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return segment(client, [i % 8, (i + 3) % 8])

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(6)]
            wait_for(lambda: server.accepted() >= 6, 30, "all 6 requests to arrive")
            assert not all(f.done() for f in futures)
            server.terminate()
            with httpx.Client(base_url=server.url, timeout=5) as late:
                response = wait_for(
                    lambda: (r := late.get("/readyz")).status_code == 503 and r, 10, "draining"
                )
            assert response.json()["error"]["code"] == "not_ready"
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6
        assert server.process.wait(30) in (0, -15)
        assert "draining" in server.log()
