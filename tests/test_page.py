"""The upload page in a real headless Chromium against the real stack: it works, not just renders."""
import shutil
from urllib.parse import urljoin

import pytest
from playwright.sync_api import sync_playwright

from tests import images
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(base_url):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.goto(base_url + "/")
        yield tab
        browser.close()


def test_uploading_a_cat_shows_a_cat_and_its_heatmap_then_the_cache(page, tmp_path):
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(images.encode(images.chelsea(), "JPEG", quality=88))
    broken = tmp_path / "page.jpg"
    broken.write_bytes(b"<!DOCTYPE html><html></html>")
    page.set_input_files("#file-input", [str(cat), str(broken)])
    page.wait_for_function(
        "document.querySelectorAll('.job[data-status=done], .job[data-status=failed]').length == 2",
        timeout=120_000)
    card = page.locator(".job[data-status=done]")
    top = card.locator(".predictions li .label").first.text_content()
    assert top in {"Egyptian cat", "tabby", "tiger cat"}
    # The page draws the heatmap itself, from the result's map over the chosen file, and names the class.
    heatmap = card.locator("canvas.heatmap")
    heatmap.wait_for()
    page.wait_for_function("c => c.width > 0 && c.height > 0", arg=heatmap.element_handle())
    assert top in card.locator(".gradcam figcaption").text_content()
    assert heatmap.evaluate("c => c.width / c.height") == pytest.approx(451 / 300, abs=0.01)
    drawn = heatmap.evaluate("c => c.toDataURL()")
    card.locator("input.opacity").fill("1")
    page.wait_for_function("([c, before]) => c.toDataURL() != before", arg=[heatmap.element_handle(), drawn])
    # The server's PNG behind the link renders too (on its first request).
    png = page.request.get(urljoin(page.url, card.locator(".gradcam .links a").first.get_attribute("href")))
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    failed = page.locator(".job[data-status=failed]")
    assert failed.locator(".error-code").text_content() == "unsupported_image"

    page.set_input_files("#file-input", [str(cat)])
    page.wait_for_function("document.querySelectorAll('.job[data-status=done]').length == 2", timeout=60_000)
    assert page.locator(".job .badge.cached").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload-page.png"), full_page=True)
