"""The upload page in a real headless Chromium against the real stack: it works, not just renders."""
import dataclasses
import re
import shutil
from urllib.parse import urljoin

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests import images
from tests.conftest import ARTIFACTS
from tools.stack import free_port, start_web, stop

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _upload_page(browser, base_url):
    """A tab in a fresh browser context (its own localStorage), on the upload page."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.goto(base_url + "/")
    yield tab
    context.close()


@pytest.fixture(scope="module")
def page(browser, base_url):
    yield from _upload_page(browser, base_url)


@pytest.fixture
def tab(browser, base_url):
    yield from _upload_page(browser, base_url)


@pytest.fixture(scope="module")
def limited_url(settings, worker):
    """A second web process on the same Redis whose rate limit the test can reach: 2 requests a minute."""
    proc, url = start_web(dataclasses.replace(settings, rate_limit="2/minute"), threads=2)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def redisless_url(settings):
    """A web process whose Redis is gone (nothing listens on its port): it answers 503 with Retry-After."""
    proc, url = start_web(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"), threads=2)
    yield url
    stop(proc)


def card_ids(tab) -> list[str]:
    return tab.eval_on_selector_all(".job", "cards => cards.map(c => c.dataset.jobId)")


def upload(tab, path, settled: int, timeout_ms: int = 120_000) -> None:
    """Choose ``path`` in the file input and wait until ``settled`` cards are done or failed."""
    tab.set_input_files("#file-input", [str(path)])
    tab.wait_for_function(
        "n => document.querySelectorAll('.job[data-status=done], .job[data-status=failed]').length >= n",
        arg=settled, timeout=timeout_ms)


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
    caption = card.locator(".gradcam figcaption").text_content()
    assert top in caption and "class " not in caption  # named by its label, as the worker's map explains it
    assert heatmap.evaluate("c => c.width / c.height") == pytest.approx(451 / 300, abs=0.01)
    drawn = heatmap.evaluate("c => c.toDataURL()")
    card.locator("input.opacity").fill("1")
    page.wait_for_function("([c, before]) => c.toDataURL() != before", arg=[heatmap.element_handle(), drawn])
    # The server's PNG behind the link renders too (on its first request).
    png = page.request.get(urljoin(page.url, card.locator(".gradcam .links a").first.get_attribute("href")))
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    job = page.request.get(urljoin(page.url, card.locator(".gradcam .links a").nth(1).get_attribute("href")))
    assert job.json()["id"] == card.get_attribute("data-job-id")
    failed = page.locator(".job[data-status=failed]")
    assert failed.locator(".error-code").text_content() == "unsupported_image"

    page.set_input_files("#file-input", [str(cat)])
    page.wait_for_function("document.querySelectorAll('.job[data-status=done]').length == 2", timeout=60_000)
    assert page.locator(".job .badge.cached").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload-page.png"), full_page=True)


def test_history_survives_a_reload_newest_first_and_can_be_cleared(tab, tmp_path):
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(images.noise_png(131))
    second.write_bytes(images.noise_png(132))
    upload(tab, first, 1)
    upload(tab, second, 2)
    before = card_ids(tab)
    assert len(before) == 2 and all(before)
    assert tab.locator(".job .file-name").all_text_contents() == ["second.png", "first.png"]

    tab.reload()
    tab.wait_for_function("document.querySelectorAll('.job[data-status=done]').length == 2", timeout=30_000)
    assert card_ids(tab) == before
    assert tab.locator(".job .file-name").all_text_contents() == ["second.png", "first.png"]
    # The chosen file is gone after a reload, so the card shows the server's heatmap PNG instead.
    overlay = tab.locator(".job img.overlay").first
    overlay.wait_for()
    tab.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
    assert tab.locator(".job .predictions li").count() > 0
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "upload-page-after-reload.png"), full_page=True)

    slow = tmp_path / "slow.png"  # still uploading when the history is cleared: it must not come back
    slow.write_bytes(images.noise_png(133, size=(500, 400)))
    cdp = tab.context.new_cdp_session(tab)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 256 * 1024})
    with tab.expect_response(lambda r: r.request.method == "POST", timeout=30_000) as answer:
        tab.set_input_files("#file-input", [str(slow)])
        tab.wait_for_selector(".job[data-status=uploading]")
        tab.get_by_role("button", name="Clear history").click()
        assert tab.locator(".job").count() == 0
    assert answer.value.status == 202
    tab.wait_for_timeout(200)  # let the page handle the answer
    assert tab.evaluate("localStorage.getItem('imgsvc.history.v1')") == "[]"
    tab.reload()
    tab.wait_for_load_state("load")
    assert tab.locator(".job").count() == 0
    assert tab.locator("#clear-history").is_hidden()


def test_a_20_mb_upload_shows_its_progress(tab, tmp_path):
    big = tmp_path / "big.bmp"  # 2580 x 2580 RGB, uncompressed: 19.97 MB, under the 20 MiB cap
    big.write_bytes(images.encode(images.chelsea().resize((2580, 2580)), "BMP"))
    assert 19_000_000 < big.stat().st_size < 20 * 1024 * 1024
    cdp = tab.context.new_cdp_session(tab)  # loopback is too fast to see progress: throttle to 8 MB/s
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 8 * 1024 * 1024})
    tab.set_input_files("#file-input", [str(big)])
    tab.wait_for_function("""() => {
        const bar = document.querySelector('.job .upload-progress progress');
        return bar && !bar.parentElement.hidden && bar.value > 0 && bar.value < 100;
    }""", timeout=30_000)
    text = tab.locator(".job .progress-text").text_content()
    assert re.fullmatch(r"Uploading \d+% \([\d.]+ [KM]?B of 19\.0 MB\)", text), text
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "upload-progress.png"))
    tab.wait_for_selector(".job[data-status=done]", timeout=120_000)
    assert tab.locator(".job .upload-progress").is_hidden()


def test_refused_files_show_the_servers_message(tab, base_url, limited_url, redisless_url, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(images.png_declaring(30000, 30000))
    said = requests.post(base_url + "/api/v1/jobs", files={"image": bomb.read_bytes()}, timeout=30).json()["error"]
    upload(tab, bomb, 1)
    card = tab.locator(".job[data-status=failed]").first
    assert card.locator(".error-code").text_content() == "too_many_pixels" == said["code"]
    assert card.locator(".error-message").text_content() == said["message"]
    assert "too large" in card.locator(".error-hint").text_content()

    huge = tmp_path / "huge.jpg"  # over the cap: refused before any byte is sent
    huge.write_bytes(b"\xff" * (20 * 1024 * 1024 + 1))
    upload(tab, huge, 2)
    assert "the limit is 20 MB" in tab.locator(".job .error-message").first.text_content()

    tab.goto(limited_url + "/")  # 2 requests a minute: the third upload is refused with Retry-After
    page_html = tmp_path / "page.jpg"
    page_html.write_bytes(b"<!DOCTYPE html><html></html>")
    for settled in (1, 2, 3):
        upload(tab, page_html, settled)
    newest = tab.locator(".job").first
    assert newest.locator(".error-code").text_content() == "rate_limited"
    assert "Rate limit of 2 per 1 minute exceeded" in newest.locator(".error-message").text_content()
    assert re.search(r"retry in \d+ seconds?\.", newest.locator(".error-hint").text_content())
    assert tab.locator(".job .error-code").all_text_contents()[1:] == ["unsupported_image"] * 2

    tab.goto(redisless_url + "/")  # a good image: the bomb is refused for what it is before Redis is asked
    good = tmp_path / "good.png"
    good.write_bytes(images.noise_png(seed=7301))
    upload(tab, good, 1)
    card = tab.locator(".job").first
    assert card.locator(".error-code").text_content() == "unavailable"
    assert re.search(r"busy or unavailable.*retry in \d+ seconds?\.", card.locator(".error-hint").text_content())
    tab.screenshot(path=str(ARTIFACTS / "upload-refused.png"), full_page=True)


def test_the_drop_zone_is_a_keyboard_button_and_status_changes_are_announced(tab, tmp_path):
    cat = tmp_path / "keyboard-cat.jpg"
    cat.write_bytes(images.encode(images.chelsea(), "JPEG", quality=87))
    choosers = []  # listen first: Playwright turns file chooser interception on asynchronously
    tab.on("filechooser", lambda chooser: choosers.append(chooser))
    for _ in range(20):  # Tab through the controls until the drop zone has the focus
        tab.keyboard.press("Tab")
        if tab.evaluate("document.activeElement.id") == "drop-zone":
            break
    assert tab.evaluate("document.activeElement.id") == "drop-zone"
    assert tab.get_by_role("button", name=re.compile("Drop images here")).count() == 1
    tab.keyboard.press("Enter")
    for _ in range(100):
        if choosers:
            break
        tab.wait_for_timeout(100)
    assert choosers, "Enter on the drop zone opened no file chooser"
    choosers[0].set_files(str(cat))
    tab.wait_for_function(
        "document.getElementById('announcer').textContent.includes('keyboard-cat.jpg: done')", timeout=120_000)
    assert tab.locator("#announcer").get_attribute("role") == "status"
    # Status is spelled out, not only coloured.
    assert tab.locator(".job .badge.status").text_content() == "done"


def test_the_page_fits_a_phone(browser, base_url, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    try:
        phone = context.new_page()
        phone.goto(base_url + "/")
        cat = tmp_path / "phone-cat.jpg"
        cat.write_bytes(images.encode(images.chelsea(), "JPEG", quality=86))
        upload(phone, cat, 1)
        phone.locator(".job canvas.heatmap, .job img.overlay").first.wait_for()
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        box = phone.locator("#drop-zone").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        ARTIFACTS.mkdir(exist_ok=True)
        phone.screenshot(path=str(ARTIFACTS / "upload-page-phone.png"), full_page=True)
    finally:
        context.close()


def test_an_image_by_its_address_is_classified_from_the_url_field(tab, webhook_worker):
    from tests.test_image_url import ImageServer

    server = ImageServer()
    try:
        tab.fill("#image-url", server.url + "/good.png")
        tab.click("#url-form button[type=submit]")
        tab.wait_for_function("document.querySelectorAll('.job[data-status=done]').length == 1", timeout=60_000)
        card = tab.locator(".job[data-status=done]")
        assert "/good.png" in card.locator(".file-name").text_content()
        assert card.locator(".predictions li").count() == 5
        assert tab.input_value("#image-url") == ""
    finally:
        server.close()
