"""A real browser for the page tests: Debian's headless Chromium, driven by
Selenium, that can reach no host but this machine. A missing browser fails under
CI (``MASKRCNN_TEST_REQUIRE_BROWSER=1``, set by ``.ci/run``) and skips elsewhere."""

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator

import pytest
from PIL import Image, ImageStat

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1600) -> Iterator:
    """A headless Chromium whose network events and console messages are logged."""
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
        f"--window-size={width},{height}",
        # every name but the loopback address fails to resolve: the network is off
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition, timeout: float = 60.0, what: str = "the page did not render"):
    """``condition()``'s first true value. An element the page re-rendered between
    finding and reading it (a list refreshed meanwhile) is not yet an answer."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(StaleElementReferenceException):
            if found := condition():
                return found
        time.sleep(0.2)
    raise TimeoutError(what)


def click(browser, selector: str, timeout: float = 60.0) -> None:
    """Click the element ``selector`` finds once it is there and enabled, found
    again if the page re-rendered it before the click landed."""
    from selenium.common.exceptions import ElementClickInterceptedException

    def clicked() -> bool:
        found = browser.find_elements("css selector", selector)
        if not found or not found[0].is_enabled():
            return False
        with contextlib.suppress(ElementClickInterceptedException):
            found[0].click()
            return True
        return False

    wait_until(clicked, timeout, f"{selector} to be clicked")


def requests_sent(browser) -> list[str]:
    """The http(s) URLs the page requested since the last call, from the browser's
    network events: one blocked before sending (the page's Content-Security-Policy)
    is not one sent."""
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
        if url.startswith("http") and request_id not in blocked
    ]


def sent_elsewhere(browser, origin: str) -> list[str]:
    """``requests_sent`` to another host than ``origin``."""
    return [url for url in requests_sent(browser) if not url.startswith(origin)]


def console_errors(browser) -> list[str]:
    """The page's console messages at level SEVERE (errors, failed loads, refused
    by the Content-Security-Policy) since the last call."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def loaded(browser) -> list[str]:
    return browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )


def not_blank(png: bytes) -> bool:
    image = Image.open(io.BytesIO(png)).convert("L")
    return ImageStat.Stat(image).stddev[0] > 10  # text and colour, not one flat fill
