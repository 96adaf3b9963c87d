"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright against a launched app. Chromium is
installed with apt-get when missing (as root); the test skips only if no browser can be installed. The screenshot is
saved to tests/artifacts/demo.png (docs/demo.png in the README is one of them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from vlm_efficient.demos import app as demo_app

ARTIFACTS = Path(__file__).parent / "artifacts"
# headless as root on a machine with no network: no sandbox, no GPU, no background connections
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PRESET = "VisionZip 64 + FastV"
TIMEOUT_MS = 120_000
# records both answers as the page shows them, each time either changes
WATCH = """() => { window.shown = []; window.watch = setInterval(() => {
    const now = ['base', 'wrapped'].map(side => document.querySelector(`#${side}-answer textarea`).value);
    const last = window.shown[window.shown.length - 1];
    if (!last || now[0] !== last[0] || now[1] !== last[1]) window.shown.push(now);
}, 5); }"""


def _chromium() -> str:
    """A Chromium on PATH, installed from Debian's packages first if there is none and we are root."""
    if not any(map(shutil.which, BROWSERS)) and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
                subprocess.run(command, env=env, timeout=600, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            pass
    path = next(filter(None, map(shutil.which, BROWSERS)), None)
    if path is None:
        pytest.skip("no Chromium on this machine and none could be installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    app = demo_app.launch("testbed", concurrency=1)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        outside = []  # requests that left the app: there must be none (fonts, scripts from the internet)
        page.on("request", lambda r: r.url.startswith((app.local_url, "data:", "blob:")) or outside.append(r.url))
        page.goto(app.local_url)
        yield page, outside
        browser.close()
    app.close()


def _choose(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def _settle(page) -> None:
    """Wait until no component has waited for the server (gradio greys those out) for half a second."""
    calm = "() => (window.calm = document.querySelector('.pending') ? 0 : (window.calm || 0) + 1) > 5"
    page.wait_for_function(calm, polling=100, timeout=TIMEOUT_MS)


def _loaded(image) -> bool:
    """Whether the image loaded and decoded to pixels; one still loading (its src just changed) is waited for, and
    one that fails to load is not loaded."""
    return image.evaluate("""img => img.complete ? img.naturalWidth > 0 : new Promise(resolve => {
        img.addEventListener("load", () => resolve(img.naturalWidth > 0), {once: true});
        img.addEventListener("error", () => resolve(false), {once: true});
    })""")


def test_a_sample_answers_side_by_side_with_the_overlay(browser):
    page, outside = browser
    expect(page.get_by_label("Sample", exact=True)).to_have_value(re.compile("^held-out testbed scene 0: "))
    scene = "held-out testbed scene 2: Please describe this image in detail."
    _choose(page, "Sample", scene)
    expect(page.get_by_text("Expected answer: The image shows one object")).to_be_visible()
    _choose(page, "Preset", PRESET)
    spec = page.get_by_label("Spec: methods and their parameters ('+' joins methods)")
    expect(spec).to_have_value(demo_app.PRESETS[PRESET])
    page.evaluate(WATCH)
    page.get_by_role("button", name="Run").click()

    expect(page.locator("#status")).to_have_text("Done.", timeout=TIMEOUT_MS)
    base = page.locator("#base-answer textarea").input_value()
    wrapped = page.locator("#wrapped-answer textarea").input_value()
    assert base.startswith("The image shows") and wrapped.startswith("The image shows")
    # both answers streamed, side by side: the page showed them growing together, never anything but a prefix
    shown = page.evaluate("() => { clearInterval(window.watch); return window.shown; }")
    assert all(base.startswith(b) and wrapped.startswith(w) for b, w in shown)
    assert sum(0 < len(b) < len(base) and 0 < len(w) < len(wrapped) for b, w in shown) >= 3
    kept = page.locator("#kept img")
    expect(kept).to_be_visible()
    assert _loaded(kept) and page.locator("img[alt]").count() >= 4  # the preview, the overlay and two heatmaps
    expect(page.get_by_text("The wrapped model keeps 32 of 576 image tokens here")).to_be_visible()
    expect(page.locator("#numbers table")).to_contain_text("speed-up")
    expect(page.locator("#numbers table")).to_contain_text("576 576 576 576 576 576")  # base: image tokens per layer
    expect(page.locator("#numbers table")).to_contain_text("64 64 32 32 32 32")  # VisionZip 64, then FastV halves them

    # the layer slider redraws the overlay: VisionZip has already dropped tokens before layer 0
    source = kept.get_attribute("src")
    page.get_by_label("number input for Layer").fill("0")
    page.get_by_label("number input for Layer").press("Enter")
    expect(page.get_by_text("The wrapped model keeps 64 of 576 image tokens here")).to_be_visible()
    expect(kept).not_to_have_attribute("src", source, timeout=TIMEOUT_MS)
    assert _loaded(kept)
    # the 32 tokens FastV drops at layer 2 are the cells that differ between the two pictures
    layer_5, layer_0 = (np.asarray(Image.open(urlopen(u)), dtype=float) for u in (source, kept.get_attribute("src")))
    change = np.abs(layer_5 - layer_0).reshape(24, 14, 24, 14, -1).mean(axis=(1, 3, 4))
    assert (change > 20).sum() == 32 and (change < 1).sum() == 576 - 32
    page.get_by_label("number input for Layer").fill("3")
    page.get_by_label("number input for Layer").press("Enter")
    expect(page.get_by_text("Layer 3, mean of heads.")).to_be_visible()
    _settle(page)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "demo.png", full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 50_000
    assert outside == []


def _shown(page, text: str) -> None:
    """`text` appears and is shown in full (not fading in or out: the product of the opacities of it and of
    everything around it)."""
    message = page.get_by_text(text)
    expect(message).to_be_visible(timeout=TIMEOUT_MS)
    opacity = "e => { let o = 1; for (; e; e = e.parentElement) o *= +getComputedStyle(e).opacity; return o > 0.95; }"
    page.wait_for_function(opacity, arg=message.element_handle(), timeout=TIMEOUT_MS)


def test_bad_input_gets_a_message_in_the_page(browser, tmp_path):
    page, _ = browser
    page.get_by_label("Question", exact=True).fill("  ")
    page.get_by_role("button", name="Run").click()
    _shown(page, "Type a question about the image.")
    _settle(page)
    page.screenshot(path=ARTIFACTS / "demo_empty_question.png")

    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    page.locator("#image-file button[aria-label=Clear]").click()
    page.locator("#image-file input[type=file]").set_input_files(fake)
    _shown(page, "notes.png is not an image the demo can read")
    _settle(page)
    page.screenshot(path=ARTIFACTS / "demo_not_an_image.png")

    # a real image uploaded in its place is shown
    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (0, 90, 255)).save(photo)
    page.locator("#image-file button[aria-label=Clear]").click()
    page.locator("#image-file input[type=file]").set_input_files(photo)
    preview = page.locator("#preview img")
    expect(preview).to_be_visible(timeout=TIMEOUT_MS)
    page.wait_for_function("img => img.complete && img.naturalWidth === 300", arg=preview.element_handle())
