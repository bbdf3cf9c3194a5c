"""The app in a real headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Skips with a reason when Chromium or Playwright is missing. Never runs ``playwright install``: the system browser is
used through ``executable_path``.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from mofa.app import build_demo, launch

    demo = build_demo(out_dir=tmp_path_factory.mktemp("browser-out"))
    port = _free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip(
            "chromium not installed: apt-get install -y --no-install-recommends chromium chromium-driver "
            "fonts-dejavu-core"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # fresh user-data-dir per test
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 1100},  # narrow: the image is shown scaled down
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _canvas_pixels(page: Any) -> np.ndarray:
    shot = page.locator("#mofa-canvas img").screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)


def test_upload_draw_track_and_preview_in_chromium(page: Any, app_url: str, tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx * 255 // 399, yy * 255 // 299, ((xx // 25 + yy // 25) % 2) * 200], -1).astype(np.uint8)
    photo = tmp_path / "photo.png"
    Image.fromarray(img).save(photo)

    page.goto(app_url)
    page.wait_for_selector("#mofa-upload", timeout=30_000)
    page.locator("#mofa-preview").click()  # nothing uploaded yet: a warning, not a crash
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('Upload an image first')")
    page.screenshot(path=str(tmp_path / "warning.png"))
    page.locator("#mofa-upload ~ input[type=file], input[type=file][accept*=image]").first.set_input_files(str(photo))
    page.wait_for_selector("#mofa-canvas img", timeout=30_000)
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('640x512')", timeout=30_000)
    before = _canvas_pixels(page)

    canvas = page.locator("#mofa-canvas img")
    box = canvas.bounding_box()
    assert box is not None
    assert box["width"] < 630  # displayed smaller than its 640 natural pixels: clicks must be mapped back
    canvas.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.5})
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('1 pt')", timeout=30_000)
    match = re.search(r"last point \((\d+), (\d+)\)", page.inner_text("#mofa-status"))
    assert match is not None
    assert abs(int(match[1]) - 0.3 * 640) <= 3 and abs(int(match[2]) - 0.5 * 512) <= 3  # prepared-image pixels
    canvas.click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.45})
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('2 pt')", timeout=30_000)
    page.wait_for_timeout(500)  # the redrawn canvas image loads after the status text
    after = _canvas_pixels(page)
    assert after.shape == before.shape
    changed = np.abs(after - before).sum(-1) > 30
    assert 0.0005 < changed.mean() < 0.2, changed.mean()  # the track is drawn, the image is not replaced

    page.get_by_label("Static brush").check()  # stamp a static-brush circle, then undo it
    canvas.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.2})
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('static brush: 1')")
    page.locator("#mofa-undo").click()
    page.wait_for_function("!document.querySelector('#mofa-status').innerText.includes('static brush')")
    assert "#1: 2 pt" in page.inner_text("#mofa-status")

    page.get_by_role("slider", name="Frames").first.fill("6")
    page.locator("#mofa-preview").click()
    page.wait_for_selector("#mofa-video video[src]", timeout=60_000)
    page.wait_for_selector("#mofa-flow video[src]", timeout=10_000)
    page.wait_for_function("document.querySelector('#mofa-status').innerText.includes('Preview: 6 frames')")
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
