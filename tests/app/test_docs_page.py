"""``/docs`` and ``/redoc`` render in a real browser (Debian's headless Chromium)
that can reach no host but this machine: their scripts and styles come from the
server, not from a CDN. A missing browser fails under CI
(``MASKRCNN_TEST_REQUIRE_BROWSER=1``, set by ``.ci/run``) and skips elsewhere."""

import io
import json
import os
import shutil
import time

import pytest
from PIL import Image, ImageStat

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        what = "chromium is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("MASKRCNN_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{what} (MASKRCNN_TEST_REQUIRE_BROWSER=1: CI must provide it)")
        pytest.skip(what)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1600",
        # every name but the loopback address fails to resolve: the network is off
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # network events
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.2)
    raise TimeoutError("the page did not render")


def sent_elsewhere(browser, origin: str) -> list[str]:
    """http(s) requests the page sent to another host, from the browser's network
    events: one blocked before sending (the page's Content-Security-Policy) is not
    one sent."""
    requests, blocked = {}, set()
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        params = event.get("params", {})
        if event["method"] == "Network.requestWillBeSent":
            requests[params["requestId"]] = params["request"]["url"]
        elif event["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])
    return [
        url
        for request_id, url in requests.items()
        if url.startswith("http") and not url.startswith(origin) and request_id not in blocked
    ]


def loaded(browser) -> list[str]:
    return browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )


def not_blank(png: bytes) -> bool:
    image = Image.open(io.BytesIO(png)).convert("L")
    return ImageStat.Stat(image).stddev[0] > 10  # text and colour, not one flat fill


def test_swagger_ui_lists_every_operation_offline(browser, server):
    browser.get(f"{server.url}/docs")
    paths = server.client.get("/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    blocks = wait_until(
        lambda: (
            (found := browser.find_elements("css selector", ".opblock"))
            and len(found) >= operations
            and found
        )
    )
    shown = {block.find_element("css selector", ".opblock-summary-path").text for block in blocks}
    assert "/v1/segment" in {p.replace("\u200b", "") for p in shown}
    assert not_blank(browser.get_screenshot_as_png())
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in loaded(browser))
    assert sent_elsewhere(browser, server.url) == []


def test_redoc_renders_offline(browser, server):
    browser.get(f"{server.url}/redoc")
    wait_until(lambda: "/v1/segment" in browser.find_element("tag name", "body").text)
    assert not_blank(browser.get_screenshot_as_png())
    assert any(url.endswith("/docs/assets/redoc.standalone.js") for url in loaded(browser))
    assert sent_elsewhere(browser, server.url) == []
