"""A real browser against ``python app.py``: headless Chromium (the system one,
no browser download) loads the page, starts a run at default settings, sees a
frame appear (time to first frame is measured and reported), switches the
policy mid-run, sees the switch, and saves a screenshot. Then: the first view
explains itself, the memory test shows three policies side by side (its
screenshot goes to FFVIZ_SCREENSHOT_DIR when set: docs/memory_test.png), the first
example prompt holds its scene for 256 frames (its screenshot: docs/app.png), a
second Generate restarts with the new prompt, the prompt's notes
appear next to it, and RoPE 101 follows a run started while it is open."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
FIRST_FRAME_BAR_S = float(os.environ.get("FFVIZ_FIRST_FRAME_BAR_S", "3.0"))

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (CI installs it: apt-get install chromium)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "FFVIZ_TRACE": "1"}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        ready = False
        while time.time() < deadline:  # served, warmed up (queue and UMAP)
            assert proc.poll() is None, log.read_text(encoding="utf-8")
            try:
                urllib.request.urlopen(url, timeout=2)
                ready = ready or True
            except OSError:
                ready = False
            text = log.read_text(encoding="utf-8")
            if ready and "UMAP warmed up" in text and "ffviz: ready" in text:
                break
            time.sleep(0.5)
        else:
            pytest.fail("app did not start in time:\n" + log.read_text(encoding="utf-8"))
        yield url
    finally:
        print("".join(l for l in log.read_text(encoding="utf-8").splitlines(True) if "trace" in l))
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_browser_run_switch_screenshot(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    profile = tempfile.mkdtemp(prefix="ffviz-chromium-")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                viewport={"width": 1400, "height": 1000})
            page = browser.new_page()
            page.goto(app_url, wait_until="load", timeout=60_000)
            page.wait_for_selector("#generate", timeout=60_000)
            expect(page.locator("#frame img")).to_have_count(0)
            page.wait_for_timeout(2000)  # a person reads the page before clicking

            t0 = time.perf_counter()
            print(f"\nclick at {time.time():.3f}")
            page.click("#generate")  # default settings
            page.wait_for_selector("#frame img", state="visible", timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('#frame img');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
            first_frame_s = time.perf_counter() - t0
            print(f"frame visible at {time.time():.3f}")
            print(f"\ntime to first frame in the browser: {first_frame_s:.2f} s")
            (tmp_path / "first_frame_s.txt").write_text(f"{first_frame_s:.3f}\n", encoding="utf-8")

            # switch the policy while the run goes on
            expect(page.locator("#status")).to_contain_text("running", timeout=60_000)
            page.click("#policy input")
            page.get_by_role("option", name="sink", exact=True).click()
            expect(page.locator("#status")).to_contain_text("sink", timeout=60_000)
            expect(page.locator("#status")).to_contain_text("1 switch", timeout=60_000)
            page.wait_for_timeout(1500)  # let the plots catch up for the screenshot
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("FFVIZ_SCREENSHOT"):
                shutil.copy(shot, os.environ["FFVIZ_SCREENSHOT"])
            page.click("#stop")
            expect(page.locator("#status")).to_contain_text(re.compile("stopped|done"),
                                                            timeout=120_000)
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert first_frame_s < FIRST_FRAME_BAR_S, f"first frame took {first_frame_s:.2f} s"


# -- the story, the memory test and the defects only a browser shows -------------------------

@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="ffviz-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, url):
    page = browser.new_page()
    page.goto(url, wait_until="load", timeout=60_000)
    page.wait_for_selector("#generate", timeout=60_000)
    return page


def save_shot(path, name):
    """Screenshots land in FFVIZ_SCREENSHOT_DIR when set (docs/ for the README)."""
    folder = os.environ.get("FFVIZ_SCREENSHOT_DIR")
    if folder:
        shutil.copy(path, Path(folder) / name)


def test_first_view_explains_itself(browser, app_url):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    story = page.locator("#story-text")
    expect(story).to_contain_text("given")
    expect(story).to_contain_text("generated")
    box = page.locator("#story-picture img").bounding_box()
    assert box and box["y"] + box["height"] < 1000  # the picture is above the fold
    assert page.locator("#memory-test").bounding_box()["y"] < 1000
    page.close()


def test_memory_test_shows_three_policies_side_by_side(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.click("#memory-test")
    status = page.locator("#memory-status")
    expect(status).to_contain_text("running", timeout=60_000)
    for policy in ("full", "window", "future_forcing"):
        expect(status).to_contain_text(policy)
    expect(status).to_contain_text("done", timeout=180_000)
    expect(page.locator("#memory-verdict")).to_contain_text("hidden", timeout=60_000)
    expect(page.locator("#memory-quality")).to_contain_text("hidden", timeout=60_000)
    img = page.locator("#memory-frames img")
    expect(img).to_be_visible()
    assert img.evaluate("i => i.naturalWidth") > 3 * 200  # three frames side by side
    page.wait_for_timeout(1000)
    tab = tmp_path / "memory_test.png"
    page.locator("#memory-panel").screenshot(path=str(tab))
    full = tmp_path / "app.png"
    page.screenshot(path=str(full), full_page=True)
    assert tab.stat().st_size > 10_000 and full.stat().st_size > 10_000
    save_shot(tab, "memory_test.png")
    page.close()


def test_first_example_prompt_holds_its_scene_for_the_whole_run(browser, app_url, tmp_path):
    """The page's first example, as long as the app runs (256 frames) at default
    settings: its objects move and keep their shape to the end (the run's summary), and
    the screenshot of that run is README's picture."""
    from playwright.sync_api import expect

    from ffviz.scenes import EXAMPLE_PROMPTS
    page = open_page(browser, app_url)
    expect(page.locator("#prompt textarea")).to_have_value(EXAMPLE_PROMPTS[0])
    page.fill("#frames input", "256")
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_contain_text("done", timeout=300_000)
    expect(status).to_contain_text("frame 256/256")
    page.get_by_role("tab", name="Metrics").click()
    summary = page.locator("#run-summary")
    expect(summary).to_contain_text("tracking", timeout=30_000)
    text = summary.inner_text()
    print(text)
    for metric in ("tracking", "shape", "background", "color_presence"):
        value = float(re.search(rf'{metric}\W+([0-9.]+)', text).group(1))
        assert value >= 0.9, f"{metric} {value} over the first example's 256 frames"
    expect(page.locator("#video video")).to_be_visible(timeout=60_000)
    page.wait_for_timeout(1500)  # let the plots catch up for the screenshot
    full = tmp_path / "app.png"
    page.screenshot(path=str(full), full_page=True)
    assert full.stat().st_size > 10_000
    save_shot(full, "app.png")
    page.close()


def test_second_generate_stops_the_run_and_starts_the_new_one(browser, app_url):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.fill("#frames input", "256")
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_contain_text("running", timeout=60_000)
    new_prompt = "a big yellow triangle on a purple background with a gray pillar"
    page.fill("#prompt textarea", new_prompt)
    page.click("#generate")
    # the first run stops, the new one starts with the prompt now in the box
    expect(status).to_contain_text(new_prompt, timeout=60_000)
    expect(status).to_contain_text("running", timeout=60_000)
    page.click("#stop")
    expect(status).to_contain_text(re.compile("stopped|done"), timeout=60_000)
    page.close()


def test_prompt_notes_next_to_the_prompt(browser, app_url):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.fill("#prompt textarea", "a red circle dancing under a purple moon at night")
    notes = page.locator("#prompt-notes")
    expect(notes).to_contain_text("purple", timeout=30_000)
    expect(notes).to_contain_text("dancing")
    page.close()


def test_rope_tab_follows_a_run_started_while_open(browser, app_url):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.fill("#frames input", "12")
    page.get_by_role("tab", name="RoPE 101").click()
    expect(page.locator("#rope-step2")).to_contain_text("synthetic", timeout=60_000)
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_contain_text("done", timeout=120_000)
    run = re.search(r"run (r\d+)", status.inner_text()).group(1)
    expect(page.locator("#rope-step2")).to_contain_text(run, timeout=30_000)
    expect(page.locator("#rope-step2")).to_contain_text("this run's queries")
    expect(page.locator("#rope-step1")).to_contain_text("Step 1 of 3")
    expect(page.locator("#rope-step3")).to_contain_text("Step 3 of 3")
    page.click("#to-drift")  # the sequence ends on the Drift tab, with this run's drift
    expect(page.locator("#drift")).to_be_visible(timeout=30_000)
    expect(page.locator("#drift")).to_contain_text(run)
    page.close()
