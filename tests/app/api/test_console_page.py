"""The console in a real browser (``tests.app.browser``: headless Chromium, no
host reachable but this machine) against a real ``maskrcnn serve`` with the demo
model: segment and filter, the page's RLE decoder against pycocotools, a
fine-tuning job run, watched, compared and activated from the browser. Every
test also checks that no request left the machine and the page logged no error.

Screenshots of each page go to ``$MASKRCNN_TEST_ARTIFACTS/console`` (default
``test-artifacts/console``, ignored by git)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.training.synthetic import SyntheticConfig, generate_dataset, render_image
from tests.app.browser import (
    chromium,
    click,
    console_errors,
    not_blank,
    requests_sent,
    sent_elsewhere,
    wait_until,
)
from tests.app.conftest import ADMIN_TOKEN, AS_ADMIN, REPO, png_bytes, running_server

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("MASKRCNN_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
API_TOKEN = "console-api-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    env = {"admin_token": ADMIN_TOKEN, "max_batch_delay_ms": "5"}
    with running_server("demo", root, **env) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as driver:
        yield driver


@pytest.fixture(autouse=True)
def offline_and_clean(browser, server):
    """After each test: nothing sent to another host, nothing logged as an error."""
    console_errors(browser)  # what an earlier test left
    yield
    assert sent_elsewhere(browser, server.url) == []
    assert console_errors(browser) == []


def screenshot(browser, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = browser.get_screenshot_as_png()
    (ARTIFACTS / f"{name}.png").write_bytes(png)
    assert not_blank(png)


def open_console(browser, server, page: str, *, api: str = "", admin: str = "") -> None:
    """The console loaded afresh on ``page`` (a new hash alone would not reload it)."""
    browser.get("about:blank")
    browser.get(f"{server.url}/#{page}")
    wait_until(lambda: browser.execute_script("return document.documentElement.dataset.ready"))
    if api or admin:
        for field, value in (("#api-token", api), ("#admin-token", admin)):
            element = browser.find_element("css selector", field)
            element.clear()
            element.send_keys(value)
        browser.find_element("css selector", "#save-tokens").click()
    wait_until(lambda: browser.find_element("css selector", f"#page-{page}").is_displayed())


def demo_banner_shown(browser) -> bool:
    return browser.find_element("css selector", "#demo-banner").is_displayed()


def test_every_page_says_when_the_demo_model_serves(browser, server):
    for page in ("segment", "compare", "models", "train"):
        open_console(browser, server, page)
        wait_until(lambda: demo_banner_shown(browser), 30, f"the demo banner on {page}")
        text = browser.find_element("css selector", "#demo-banner").text
        assert "synthetic shapes" in text and "maskrcnn serve --model coco" in text


def state_of(browser, page: str) -> str | None:
    return browser.find_element("css selector", f"#page-{page}").get_attribute("data-state")


def wait_done(browser, page: str, timeout: float = 60) -> None:
    wait_until(lambda: state_of(browser, page) in ("done", "error"), timeout, f"{page} page")
    assert state_of(browser, page) == "done", browser.find_element("css selector", "body").text


def js(browser, script: str, *args):
    return browser.execute_script(script, *args)


def canvas_pixel(browser, canvas: str, x: int, y: int) -> list[int]:
    return js(
        browser,
        "const c = document.querySelector(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data)",
        canvas,
        x,
        y,
    )


def drawn(browser, canvas: str) -> int:
    return int(browser.find_element("css selector", canvas).get_attribute("data-drawn"))


def set_range(browser, selector: str, value: float) -> None:
    js(
        browser,
        "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));"
        "e.dispatchEvent(new Event('change', {bubbles: true}))",
        selector,
        str(value),
    )


def innermost(mask: np.ndarray) -> tuple[int, int]:
    """A pixel of ``mask`` farthest (in 4-neighbour steps) from its edge."""
    while True:
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        if not inner.any():
            y, x = np.argwhere(mask)[0]
            return int(y), int(x)
        mask = inner


@pytest.fixture(scope="module")
def busy_scene(server, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A shapes scene on which the demo model finds at least three things at 0.5."""
    folder = tmp_path_factory.mktemp("scenes")
    for index in range(20):
        image, _ = render_image(SyntheticConfig(image_size=256, seed=7), index)
        files = [("images", ("scene.png", png_bytes(image), "image/png"))]
        detections = server.client.post("/v1/segment", files=files).json()["results"][0]
        if len(detections["detections"]) >= 3:
            path = folder / f"scene{index}.png"
            Image.fromarray(image).save(path)
            return path, image
    raise AssertionError("no scene with three detections")


def test_segment_draws_every_mask_and_the_score_slider_filters_in_the_page(
    browser, server, busy_scene
):
    path, image = busy_scene
    open_console(browser, server, "segment")
    browser.find_element("css selector", "#segment-files").send_keys(str(path))
    wait_done(browser, "segment")
    response = js(browser, "return window.maskrcnnConsole.lastResponse")
    detections = response["results"][0]["detections"]
    scores = sorted((d["score"] for d in detections), reverse=True)
    assert min(scores) < 0.5 <= scores[2], "asked once with a low threshold"
    shown = [d for d in detections if d["score"] >= 0.5]
    assert drawn(browser, "#segment-canvas") == len(shown)
    rows = browser.find_elements("css selector", "table#detections tbody tr")
    assert len(rows) == len(shown)
    assert js(
        browser,
        "return [document.querySelector('#segment-canvas').width,"
        "document.querySelector('#segment-canvas').height]",
    ) == [256, 256]

    # under each shown mask's innermost pixel the canvas is tinted; far from every
    # detection it is the image itself
    for detection in shown:
        y, x = innermost(mask_utils.decode(detection["mask"]).astype(bool))
        red, green, blue, _ = canvas_pixel(browser, "#segment-canvas", int(x), int(y))
        assert np.abs(np.array([red, green, blue]) - image[y, x].astype(int)).max() > 20
    covered = np.zeros(image.shape[:2], dtype=bool)
    for detection in detections:
        x1, y1, x2, y2 = (int(v) for v in detection["box"])
        covered[max(0, y1 - 30) : y2 + 30, max(0, x1 - 30) : x2 + 30] = True
    free = np.argwhere(~covered)
    for y, x in free[:: max(1, len(free) // 5)][:5]:
        pixel = canvas_pixel(browser, "#segment-canvas", int(x), int(y))[:3]
        assert np.abs(np.array(pixel) - image[y, x].astype(int)).max() <= 2

    # moving the slider above the lowest score drawn hides exactly those below it
    lowest = min(d["score"] for d in shown)
    above = min(d["score"] for d in shown if d["score"] > lowest)
    threshold = (lowest + above) / 2
    set_range(browser, "#score-threshold", threshold)
    expected = [d for d in detections if d["score"] >= threshold]
    assert drawn(browser, "#segment-canvas") == len(expected) == len(shown) - scores.count(lowest)
    assert len(browser.find_elements("css selector", "table#detections tbody tr")) == len(expected)
    visible = js(browser, "return window.maskrcnnConsole.visibleDetections()")
    assert sorted(d["score"] for d in visible) == sorted(d["score"] for d in expected)
    set_range(browser, "#score-threshold", 0.05)
    assert drawn(browser, "#segment-canvas") == len(detections)
    assert response["model"]["id"] == "demo"
    assert browser.find_element("css selector", "#segment-model-id").text == "demo"
    assert "inference" in browser.find_element("css selector", "#timing").text
    set_range(browser, "#score-threshold", 0.5)
    screenshot(browser, "segment")

    browser.set_window_size(390, 844)  # a phone: nothing wider than the screen
    try:
        open_console(browser, server, "segment")
        wide = js(browser, "return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0
        screenshot(browser, "segment-phone")
    finally:
        browser.set_window_size(1280, 1600)


def test_the_pages_rle_decoder_agrees_with_pycocotools(browser, server, busy_scene):
    path, _ = busy_scene
    files = [("images", ("scene.png", path.read_bytes(), "image/png"))]
    body = server.client.post("/v1/segment", files=files, data={"score_threshold": 0.05})
    masks = [d["mask"] for d in body.json()["results"][0]["detections"]]
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (7, 13), (300, 1), (1, 300), (33, 17), (512, 512)]
    arrays = [np.zeros(s, dtype=np.uint8) for s in shapes] + [np.ones(s, np.uint8) for s in shapes]
    arrays += [(rng.random(s) < p).astype(np.uint8) for s in shapes for p in (0.02, 0.5, 0.98)]
    for array in arrays:
        rle = mask_utils.encode(np.asfortranarray(array))
        masks.append({"size": rle["size"], "counts": rle["counts"].decode()})
    open_console(browser, server, "segment")
    for rle in masks:
        decoded = js(
            browser,
            "const m = window.maskrcnnConsole.decodeRle(arguments[0]);"
            "return [m.height, m.width, Array.from(m.data).join('')]",
            rle,
        )
        expected = mask_utils.decode(rle)
        assert decoded[:2] == list(expected.shape)
        assert decoded[2] == "".join(map(str, expected.ravel())), rle


def test_train_watch_compare_and_activate_from_the_browser(browser, server, tmp_path):
    zip_path = tmp_path / "shapes.zip"
    generate_dataset(zip_path, num_images=12, image_size=96, seed=5, max_objects=3)
    open_console(browser, server, "train", admin=ADMIN_TOKEN)
    browser.find_element("css selector", "#dataset-file").send_keys(str(zip_path))
    browser.find_element("css selector", "#dataset-name").send_keys("browser-shapes")
    browser.find_element("css selector", "#dataset-upload").click()
    wait_until(
        lambda: "browser-shapes" in browser.find_element("css selector", "#datasets-table").text,
        30,
        "the uploaded dataset listed",
    )
    progress = browser.find_element("css selector", "#dataset-progress")
    assert float(progress.get_attribute("value")) == float(progress.get_attribute("max"))

    wait_until(
        lambda: "browser-shapes" in browser.find_element("css selector", "#job-dataset").text
    )
    epochs = browser.find_element("css selector", "#job-epochs")
    epochs.clear()
    epochs.send_keys("1")
    browser.find_element("css selector", "#job-start").click()

    def job_state() -> str:
        return browser.find_element("css selector", "#job-state").text

    wait_until(lambda: job_state() in ("succeeded", "failed", "cancelled"), 240, "the job")
    assert job_state() == "succeeded", browser.find_element("css selector", "#job-error").text
    loss_points = browser.find_element("css selector", "#loss-chart").get_attribute("data-points")
    assert int(loss_points) >= 1
    assert int(browser.find_element("css selector", "#map-chart").get_attribute("data-points")) == 1
    job_id = browser.find_element("css selector", "#job-id").text
    job = server.client.get(f"/v1/training-jobs/{job_id}", headers=AS_ADMIN).json()
    model_id = job["model_id"]
    assert model_id and job["state"] == "succeeded"
    screenshot(browser, "train")

    # one click: the new model against the active one on a held-out image
    browser.find_element("css selector", "#job-compare").click()
    wait_done(browser, "compare", 120)
    assert browser.find_element("css selector", "#compare-left-model").text == "demo"
    assert browser.find_element("css selector", "#compare-right-model").text == model_id
    for side in ("left", "right"):
        assert drawn(browser, f"#compare-canvas-{side}") >= 0
    screenshot(browser, "compare")

    open_console(browser, server, "train")
    click(browser, f'tr[data-job-id="{job_id}"]')  # found again if the list refreshed
    wait_until(lambda: job_state() == "succeeded")
    click(browser, "#job-activate")
    wait_until(lambda: server.client.get("/readyz").json()["model"]["id"] == model_id, 60)

    open_console(browser, server, "models")
    wait_until(lambda: not demo_banner_shown(browser), 30, "the banner gone: a trained model")
    row = wait_until(
        lambda: browser.find_elements("css selector", f'tr[data-model-id="{model_id}"].active')
    )
    assert row
    screenshot(browser, "models")
    open_console(browser, server, "segment")
    path = tmp_path / "scene.png"
    Image.fromarray(render_image(SyntheticConfig(image_size=128, seed=3), 0)[0]).save(path)
    browser.find_element("css selector", "#segment-files").send_keys(str(path))
    wait_done(browser, "segment")
    assert browser.find_element("css selector", "#segment-model-id").text == model_id


def test_with_tokens_the_console_asks_for_them_and_keeps_them_for_the_tab(tmp_path):
    env = {"admin_token": ADMIN_TOKEN, "api_tokens": API_TOKEN}
    with running_server("demo", tmp_path, **env) as server, chromium() as browser:
        server.wait_ready()
        open_console(browser, server, "train")
        note = browser.find_element("css selector", "#train-admin-note")
        assert note.is_displayed() and "admin token" in note.text.lower()
        open_console(browser, server, "models", api=API_TOKEN)
        wait_until(lambda: browser.find_elements("css selector", 'tr[data-model-id="demo"]'))
        assert browser.find_element("css selector", "#models-admin-note").is_displayed()
        buttons = browser.find_elements("css selector", "button.activate")
        assert not any(button.is_enabled() for button in buttons)
        browser.refresh()  # typed once: the tab keeps them
        wait_until(lambda: js(browser, "return document.documentElement.dataset.ready"))
        assert js(browser, "return sessionStorage.getItem('maskrcnn.apiToken')") == API_TOKEN
        assert (
            browser.find_element("css selector", "#api-token").get_attribute("value") == API_TOKEN
        )
        path = tmp_path / "scene.png"
        Image.fromarray(render_image(SyntheticConfig(image_size=128, seed=3), 1)[0]).save(path)
        open_console(browser, server, "segment")
        browser.find_element("css selector", "#segment-files").send_keys(str(path))
        wait_done(browser, "segment")
        screenshot(browser, "tokens-segment")
        sent = requests_sent(browser)
        assert [url for url in sent if not url.startswith(server.url)] == []
        assert not [url for url in sent if "/v1/datasets" in url or "/v1/training-jobs" in url]
        assert console_errors(browser) == []


def header_fields(browser) -> list[dict]:
    return js(
        browser,
        "return ['#api-token', '#admin-token', '#save-tokens'].map("
        "s => { const r = document.querySelector(s).getBoundingClientRect();"
        " return {x: r.x, y: r.y, width: r.width}; })",
    )


def test_the_header_stays_put_across_pages_and_saved_tokens(browser, server):
    browser.set_window_size(1280, 700)  # some pages scroll, some do not
    try:
        open_console(browser, server, "segment")
        where = header_fields(browser)
        for page in ("compare", "models", "train", "segment"):
            click(browser, f'button[data-page="{page}"]')
            shown = browser.find_element("css selector", f"#page-{page}")
            wait_until(shown.is_displayed)
            assert header_fields(browser) == where, page
        click(browser, "#save-tokens")
        wait_until(lambda: browser.find_element("css selector", "#tokens-status").text)
        assert header_fields(browser) == where, "after 'saved for this tab'"
    finally:
        browser.set_window_size(1280, 1600)


def test_the_empty_canvas_says_what_to_do_until_an_image_comes(browser, server, busy_scene):
    open_console(browser, server, "segment")
    hint = browser.find_element("css selector", "#segment-empty")
    assert hint.is_displayed() and "Drop images" in hint.text
    browser.find_element("css selector", "#segment-files").send_keys(str(busy_scene[0]))
    wait_done(browser, "segment")
    assert not hint.is_displayed()


def test_an_answer_is_cleared_by_the_next_action(browser, server, tmp_path):
    open_console(browser, server, "segment")
    click(browser, "#segment-url-go")  # no URL typed
    line = browser.find_element("css selector", "#segment-status")
    assert "URL" in line.text and "error" in line.get_attribute("class")
    click(browser, 'button[data-page="compare"]')
    click(browser, "#compare-run")  # no image chosen: this page's own answer
    compare_line = browser.find_element("css selector", "#compare-status")
    assert "image" in compare_line.text and "error" in compare_line.get_attribute("class")
    click(browser, 'button[data-page="segment"]')
    assert line.text == "" and "error" not in line.get_attribute("class")
    assert compare_line.get_attribute("textContent") == ""


def test_a_refused_zip_empties_the_upload_bar(browser, server, tmp_path):
    refused = tmp_path / "not-a-dataset.zip"
    refused.write_bytes(b"PK\x03\x04 this is no zip archive" * 100)
    open_console(browser, server, "train", admin=ADMIN_TOKEN)
    browser.find_element("css selector", "#dataset-file").send_keys(str(refused))
    click(browser, "#dataset-upload")
    status = browser.find_element("css selector", "#dataset-status")
    wait_until(lambda: "error" in status.get_attribute("class"), 30, "the refusal")
    assert "zip" in status.text.lower(), status.text
    progress = browser.find_element("css selector", "#dataset-progress")
    assert float(progress.get_attribute("value")) == 0
    [refusal] = console_errors(browser)  # the browser logs the 400 itself
    assert "/v1/datasets" in refusal and "400" in refusal


def stage_lines(browser, selector: str) -> tuple[list[int], int]:
    """How many lines each stage of a timing line spans, and the whole line's count."""
    return js(
        browser,
        "const text = document.querySelector(arguments[0]).firstChild;"
        "const lines = (start, end) => { const r = document.createRange();"
        " r.setStart(text, start); r.setEnd(text, end);"
        " return new Set([...r.getClientRects()].map(c => Math.round(c.top))).size; };"
        "const spans = []; let start = 0;"
        "for (const part of text.data.split(' · ')) {"
        " spans.push(lines(start, start + part.length)); start += part.length + 3; }"
        "return [spans, lines(0, text.data.length)];",
        selector,
    )


def test_compares_timing_wraps_between_stages_not_inside_one(browser, server, busy_scene):
    browser.set_window_size(390, 844)
    try:
        open_console(browser, server, "compare")
        wait_until(lambda: browser.find_elements("css selector", "#compare-left option"))
        browser.find_element("css selector", "#compare-file").send_keys(str(busy_scene[0]))
        click(browser, "#compare-run")
        wait_done(browser, "compare", 120)
        spans, whole = stage_lines(browser, "#compare-left-timing")
        assert len(spans) == 4 and whole > 1, "the phone's column wraps the line"
        timing = browser.find_element("css selector", "#compare-left-timing").text
        assert spans == [1, 1, 1, 1], timing
    finally:
        browser.set_window_size(1280, 1600)
