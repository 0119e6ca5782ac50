"""The upload page in a real headless Chromium against the real stack: it works, not just renders."""
import shutil

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
    assert card.locator(".predictions li .label").first.text_content() in {"Egyptian cat", "tabby", "tiger cat"}
    overlay = card.locator("img.overlay")
    overlay.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
    failed = page.locator(".job[data-status=failed]")
    assert failed.locator(".error-code").text_content() == "unsupported_image"

    page.set_input_files("#file-input", [str(cat)])
    page.wait_for_function("document.querySelectorAll('.job[data-status=done]').length == 2", timeout=60_000)
    assert page.locator(".job .badge.cached").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload-page.png"), full_page=True)
