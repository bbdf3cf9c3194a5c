"""The app served on 127.0.0.1 and driven through its HTTP API with gradio_client (no browser)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

from mofa.app import build_demo, launch  # noqa: E402
from mofa.app.handlers import Limits  # noqa: E402

MAX_FILE_BYTES = 1_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(demo: Any) -> str:
    port = _free_port()
    launch(demo, host="127.0.0.1", port=port, limits=Limits(max_file_bytes=MAX_FILE_BYTES), block=False)
    return f"http://127.0.0.1:{port}/"


def _video_path(value: Any) -> str:
    """gradio_client returns a Video output as a path or a {"video": path, ...} dict depending on version."""
    return value["video"] if isinstance(value, dict) else value


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx * 255 // 399, yy * 255 // 299, ((xx // 25 + yy // 25) % 2) * 200], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "checker.png"
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    demo = build_demo(out_dir=tmp_path_factory.mktemp("app-out"))
    url = _serve(demo)
    yield url
    demo.close()


def _client(url: str) -> Any:
    return gradio_client.Client(url, verbose=False, download_files=True)


def test_upload_click_preview_returns_moving_video(server: str, photo: Path) -> None:
    from mofa.hints import load_hints
    from mofa.io.video import read_video

    client = _client(server)
    canvas, status, hints = client.predict(gradio_client.handle_file(str(photo)), api_name="/upload")
    assert "prepared to 640x512" in status, status  # 400x300 → short side 512 → 683x512 → crop to 640x512
    assert hints["image_size"] == [512, 640] and hints["tracks"] == []
    for x, y in ((200, 250), (260, 230)):
        canvas, status, hints = client.predict("Trajectory", 10, x, y, api_name="/click")
    assert hints["tracks"] == [[[200, 250], [260, 230]]]
    _, other_status, other_hints = _client(server).predict("Trajectory", 10, 5, 5, api_name="/click")
    assert "Upload an image first" in other_status and other_hints["tracks"] == []  # sessions do not share state
    drawn = np.asarray(Image.open(canvas).convert("RGB"))
    assert drawn.shape == (512, 640, 3)

    flow_video, video, files, status = client.predict(6, 0.6, 42, 25, api_name="/preview")
    assert "Preview: 6 frames" in status, status
    frames = read_video(_video_path(video))
    assert frames.shape == (6, 512, 640, 3)
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 0.5
    around = (slice(230, 270), slice(180, 280))  # the dragged region changes much more than a far corner
    diff = np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean(-1)
    assert diff[around].mean() > diff[:60, -60:].mean() + 1.0
    assert read_video(_video_path(flow_video)).shape[0] == 6
    suffixes = sorted(Path(f).suffix for f in files)
    assert suffixes == [".gif", ".json", ".mp4", ".png"]
    hints_file = next(f for f in files if f.endswith(".json"))
    assert load_hints(hints_file, image_size=(512, 640)).drags[0].points.tolist() == [[200, 250], [260, 230]]


def test_bad_inputs_give_messages_and_server_stays_up(server: str, photo: Path, tmp_path: Path) -> None:
    client = _client(server)
    _, _, status = client.predict(8, 0.6, 42, 25, api_name="/preview")[1:]  # no image yet
    assert "Upload an image" in status

    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):  # refused by the upload button's file types
        client.predict(gradio_client.handle_file(str(text)), api_name="/upload")
    fake = tmp_path / "fake.png"
    fake.write_text("hello, I am not a PNG")
    _, status, _ = client.predict(gradio_client.handle_file(str(fake)), api_name="/upload")
    assert "fake.png is not an image" in status

    huge = tmp_path / "panorama.png"
    Image.new("RGB", (5000, 10), (30, 60, 90)).save(huge)
    _, status, _ = client.predict(gradio_client.handle_file(str(huge)), api_name="/upload")
    assert "largest side allowed is 4096" in status

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > MAX_FILE_BYTES
    with pytest.raises(Exception, match=r"(?i)size|large|exceed"):  # refused by the server before any handler runs
        client.predict(gradio_client.handle_file(str(noise)), api_name="/upload")

    _, status, hints = _client(server).predict(gradio_client.handle_file(str(photo)), api_name="/upload")
    assert hints["image_size"] == [512, 640]  # a fresh session still works
    client = _client(server)
    client.predict(gradio_client.handle_file(str(photo)), api_name="/upload")
    _, _, _, status = client.predict(8, 0.6, 42, 25, api_name="/preview")  # empty trajectory
    assert "Draw at least one trajectory" in status
    client.predict("Trajectory", 10, 20, 20, api_name="/click")  # a single click: static anchor, no crash
    flow_video, video, files, status = client.predict(2, 0.6, 42, 25, api_name="/preview")
    assert "nothing will move" in status and video is not None
    _, _, status = client.predict(8, 0.6, 42, 25, api_name="/generate")[1:]
    assert "--svd" in status and "MyNiuuu/MOFA-Video-Traj" in status  # no weights: how to get them


@pytest.mark.slow  # ~10-35 s on 2 shared cores, most of it the tiny pipeline's first step
def test_generate_with_tiny_pipeline(photo: Path, tmp_path: Path) -> None:
    """The full diffusion path through the server: tiny random weights saved in the released folder layouts."""
    tiny = pytest.importorskip("tiny_models")
    from mofa import MofaVideoPipeline
    from mofa.io.video import read_video

    parts = tiny.build_tiny_svd()
    svd = tiny.save_svd_folder(parts, tmp_path / "svd")
    adapter = tiny.save_adapter_folder(tiny.build_tiny_adapter(parts["unet"]), tmp_path / "adapter")
    pipe = MofaVideoPipeline.from_released(svd=svd, adapter=adapter)
    demo = build_demo(pipeline=pipe, out_dir=tmp_path / "out", max_frames=6, short_side=64)  # tiny: 64x64 frames
    url = _serve(demo)
    try:
        client = _client(url)
        _, status, _ = client.predict(gradio_client.handle_file(str(photo)), api_name="/upload")
        assert "prepared to 64x64" in status, status  # 400x300 → 85x64 → crop 64x64
        client.predict("Trajectory", 10, 20, 30, api_name="/click")
        client.predict("Trajectory", 10, 40, 30, api_name="/click")
        flow_video, video, files, status = client.predict(4, 0.6, 1, 2, api_name="/generate")
        assert "Generated 4 frames" in status, status
        assert read_video(_video_path(video)).shape == (4, 64, 64, 3)
        assert any(f.endswith("_settings.json") for f in files)
    finally:
        demo.close()


def test_mofa_app_command_serves_on_localhost(photo: Path, tmp_path: Path) -> None:
    """``mofa app`` (no weights) starts, binds 127.0.0.1 and answers API calls; it is stopped by its pid."""
    port = _free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mofa.cli", "app", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mofa app exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, f"mofa app did not come up: {log.read_text()}"
                time.sleep(0.5)
        assert "127.0.0.1" in log.read_text()
        client = _client(url)
        _, status, _ = client.predict(api_name="/new_track")
        assert "Upload an image first" in status
        _, status, _ = client.predict(gradio_client.handle_file(str(photo)), api_name="/upload")
        assert "640x512" in status
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mofa_app_command_rejects_bad_options() -> None:
    from mofa.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["app", "--dtype", "float8"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["app", "--cmp", "/nonexistent/cmp.pth.tar"])
    assert exc.value.code == 2
