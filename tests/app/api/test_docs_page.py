"""``/docs`` and ``/redoc`` render in a real browser (``tests.app.browser``)
that can reach no host but this machine: their scripts and styles come from the
server, not from a CDN."""

import pytest

from tests.app.browser import chromium, loaded, not_blank, sent_elsewhere, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


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


def test_redoc_renders_offline_and_finds_nothing_to_warn_about(browser, server):
    browser.get_log("browser")  # what an earlier page logged
    browser.get(f"{server.url}/redoc")
    wait_until(lambda: "/v1/segment" in browser.find_element("tag name", "body").text)
    # e.g. "Incompatible types in allOf" where a schema and its oneOf disagree; its
    # "API docs by Redocly" logo from a CDN is refused by the page's policy, as meant
    logged = [e["message"] for e in browser.get_log("browser") if e["level"] != "INFO"]
    assert [m for m in logged if "violates the following Content Security Policy" not in m] == []
    assert not_blank(browser.get_screenshot_as_png())
    assert any(url.endswith("/docs/assets/redoc.standalone.js") for url in loaded(browser))
    assert sent_elsewhere(browser, server.url) == []
