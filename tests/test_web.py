"""The web page in a real headless Chromium (Debian's), against a real uvicorn.

Screenshots go to test-artifacts/web/. Skips only when Chromium is not installed
(`scripts/ensure-test-services.sh`, run by `make test`, installs it where it can).
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import PARITY
from server import TINY_MULTIPLE, TINY_SINGLE, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
PHOTO = PARITY / "images" / "two_figures.png"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/ensure-test-services.sh)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("web")).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(params=[(1280, 900), (390, 844)], ids=["desktop", "phone"])
def page(request, browser, server):
    width, height = request.param
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.label = request.node.callspec.id
    yield page
    context.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{page.label}-{name}.png"), full_page=True)


def canvas_pixels(page) -> np.ndarray:
    data = page.eval_on_selector(".card .view", "c => c.toDataURL('image/png')")
    import base64
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"))


def fresh_photo(tmp_path: Path) -> Path:
    """PHOTO under bytes of its own: the same bytes again would share the finished task of
    an earlier upload, which the page then has no need to watch."""
    info = PngImagePlugin.PngInfo()
    info.add_text("nonce", uuid.uuid4().hex)
    path = tmp_path / "fresh.png"
    Image.open(PHOTO).save(path, pnginfo=info)
    return path


def task_id_of(card) -> str:
    return card.locator(".dl-labels").get_attribute("href").split("/")[3]


def upload_and_wait(page, path: Path):
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card").first
    card.locator(".status", has_text="Done").wait_for(timeout=60_000)
    card.locator(".result").wait_for(state="visible")
    return card


def test_upload_progress_overlay_slider_hover_downloads(page, server):
    # the stand-in model is announced
    page.locator("#banner", has_text="stand-in").wait_for()
    assert "random weights" in page.inner_text("#banner")
    shot(page, "1-empty")

    card = upload_and_wait(page, PHOTO)
    assert card.locator(".progress").get_attribute("aria-valuenow") == "100"
    assert "s" in card.locator(".detail").inner_text()  # elapsed time
    assert not page.locator("#key-box").is_visible()  # no key needed here
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "overflows"
    shot(page, "2-result")

    # the legend lists the classes present, with their area share
    legend = card.locator(".legend li")
    assert legend.count() >= 1
    assert "%" in legend.first.inner_text()

    # the opacity slider changes the picture
    before = canvas_pixels(page)
    card.locator(".opacity").fill("100")
    after = canvas_pixels(page)
    assert np.abs(before.astype(int) - after.astype(int)).sum() > 0
    card.locator('.modes input[value="mask"]').check()
    mask_view = canvas_pixels(page)
    card.locator('.modes input[value="original"]').check()
    original_view = canvas_pixels(page)
    assert not np.array_equal(mask_view, original_view)
    card.locator('.modes input[value="overlay"]').check()
    shot(page, "3-opacity-100")

    # hover a pixel whose class we know from the service's own labels.png
    task_id = task_id_of(card)
    labels = np.asarray(Image.open(io.BytesIO(server.client.get(f"/v1/tasks/{task_id}/labels.png").content)))
    names = {l["id"]: l["name"] for l in server.client.get("/v1/labels").json()}
    ys, xs = np.nonzero(labels != 0)
    i = len(ys) // 2
    y, x = int(ys[i]), int(xs[i])
    box = card.locator(".view").bounding_box()
    h, w = labels.shape
    page.mouse.move(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h)
    tip = card.locator(".tip")
    tip.wait_for(state="visible")
    assert tip.inner_text().startswith(names[int(labels[y, x])])
    shot(page, "4-hover")

    # every download is the real file
    for cls, check in (("mask", b"\x89PNG"), ("overlay", b"\x89PNG"), ("labels", b"\x89PNG"), ("parts", b"{")):
        with page.expect_download() as info:
            card.locator(f".dl-{cls}").click()
        content = Path(info.value.path()).read_bytes()
        assert content.startswith(check), cls
        if cls == "parts":
            assert json.loads(content)["image"] == {"width": 500, "height": 300}


def test_bad_file_shows_the_services_error(page, server, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a photo")
    said = server.client.post("/v1/parse", files={"file": ("upload", bad.read_bytes())}).json()["error"]
    page.set_input_files("#file-input", str(bad))
    card = page.locator(".card").first
    error = card.locator(".error")
    error.wait_for(state="visible", timeout=30_000)
    assert f"{said['message']} ({said['code']})" in error.inner_text()
    assert "JPEG, PNG" in said["message"]  # says what to send instead
    assert card.locator(".status").inner_text() == "Refused"
    assert not card.locator(".retry").is_visible()  # the same file would fail again
    shot(page, "5-bad-file")


@pytest.mark.parametrize("transport", ["events", "no-eventsource", "events-fail"])
def test_a_task_is_followed_by_events_else_by_polling(page, tmp_path, transport):
    """watchTask follows a task with server-sent events where it can, and by polling
    /v1/tasks/{id} when the browser has no EventSource or the stream fails."""
    if transport == "no-eventsource":
        page.add_init_script("delete window.EventSource")
        page.reload()
    elif transport == "events-fail":
        page.route("**/v1/tasks/*/events", lambda route: route.abort())
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    card = upload_and_wait(page, fresh_photo(tmp_path))
    assert card.locator(".legend li").count() >= 1
    task = f"/v1/tasks/{task_id_of(card)}"
    streamed = any(u.endswith(f"{task}/events") for u in urls)
    polled = any(u.endswith(task) for u in urls)
    assert (streamed, polled) == {"events": (True, False), "no-eventsource": (False, True),
                                  "events-fail": (True, True)}[transport], urls


def test_download_links_are_the_outputs_the_service_lists(page):
    """The page keeps no list of outputs: its links are /v1/model's, in its order."""
    def listed(route):
        response = route.fetch()
        model = response.json()
        model["outputs"] = [{**o, "title": f"{o['title']} (listed)"}
                            for o in reversed(model["outputs"]) if o["name"] != "overlay"]
        route.fulfill(response=response, json=model)

    page.route("**/v1/model", listed)
    page.reload()
    card = upload_and_wait(page, PHOTO)
    links = card.locator(".downloads a")
    got = [(a.get_attribute("class"), a.inner_text(), a.get_attribute("download"), a.get_attribute("title"))
           for a in links.all()]
    assert [g[:3] for g in got] == [("dl-persons", "persons PNG", "two_figures.persons.png"),
                                    ("dl-parts", "parts JSON", "two_figures.parts.json"),
                                    ("dl-labels", "labels PNG", "two_figures.labels.png"),
                                    ("dl-mask", "mask PNG", "two_figures.mask.png")]
    assert all(title.endswith("(listed)") for *_, title in got)


def test_keyboard_opens_the_file_picker(page):
    """Enter and Space on the focused drop zone open the (multiple) file picker. The
    picker's click is observed on the input: the native dialog's interception is racy
    in headless Chromium."""
    page.evaluate("""() => {
        window.pickerOpened = 0;
        document.getElementById('file-input').addEventListener('click', (e) => {
            window.pickerOpened += 1;
            e.preventDefault();
        });
    }""")
    page.keyboard.press("Tab")  # the drop zone is the first focusable element
    assert page.evaluate("document.activeElement.id") == "drop"
    page.keyboard.press("Enter")
    page.keyboard.press(" ")
    assert page.evaluate("window.pickerOpened") == 2
    assert page.get_attribute("#file-input", "multiple") is not None


def test_page_is_self_contained(page, server):
    """No external CDN: every resource the page loads comes from the service itself."""
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.reload()
    page.wait_for_load_state("networkidle")
    assert urls and all(u.startswith(server.url) for u in urls), urls
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


@pytest.fixture(scope="module")
def two_models_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("web-models"), models=f"{TINY_MULTIPLE},{TINY_SINGLE}").wait_ready()
    yield s
    s.stop()


def test_one_model_offers_no_choice(page):
    page.locator("#model-info", has_text="tiny-multiple").wait_for()
    assert not page.locator("#model-choice").is_visible()


def test_several_models_are_offered_and_each_photo_runs_on_the_one_chosen(browser, two_models_server, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.label = "models"
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(two_models_server.url + "/")
    select = page.locator("#model-select")
    select.wait_for()  # shown: there is a choice
    assert select.locator("option").evaluate_all("os => os.map(o => o.value)") == ["tiny-multiple", "tiny-single"]
    assert select.input_value() == "tiny-multiple"  # the service's default
    shot(page, "1-choice")

    ran_on = {}
    for model in ("tiny-single", "tiny-multiple"):
        select.select_option(model)
        page.locator("#model-info", has_text=f"Model {model}").wait_for()
        card = upload_and_wait(page, fresh_photo(tmp_path))
        task = two_models_server.client.get(f"/v1/tasks/{task_id_of(card)}").json()
        ran_on[model] = task["result"]["model"]["id"]
        assert card.locator(".detail").inner_text().endswith(f" · {model}")  # the card says which ran it
        # the legend names the classes of the model that ran it
        assert card.locator(".legend li").count() >= 1
    assert ran_on == {"tiny-single": "tiny-single", "tiny-multiple": "tiny-multiple"}
    shot(page, "2-both")
    context.close()
    assert not errors, errors
