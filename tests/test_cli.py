"""The ``mofa`` command line: preview / demo outputs, help, and bad input → exit 2, one line, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mofa.cli import main
from mofa.io.video import read_video

OUTPUT_NAMES = ["clip.gif", "clip.json", "clip.mp4", "clip_flow.mp4", "clip_hints.png"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    code = info.value.code if isinstance(info.value.code, int) else (0 if info.value.code is None else 1)
    return code, captured.out, captured.err


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A 128x128 textured image and a valid hints file; outputs go to ``tmp_path / "out"``."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    img[40:80, 40:80] = (230, 40, 40)
    Image.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "hints.json").write_text(json.dumps({"num_frames": 4, "tracks": [[[60, 60], [75, 60]], [[10, 10]]]}))
    return tmp_path


def _args(workdir: Path, *extra: str, tracks: str = "hints.json", image: str = "img.png") -> list[str]:
    return [
        "preview",
        str(workdir / image),
        "--tracks",
        str(workdir / tracks),
        "--size",
        "128",
        "--out",
        str(workdir / "out" / "clip.mp4"),
        *extra,
    ]


def test_preview_writes_all_outputs(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(_args(workdir, "--fps", "10"), capsys)
    assert code == 0, err
    out_dir = workdir / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == OUTPUT_NAMES
    video = read_video(out_dir / "clip.mp4")
    assert video.shape == (4, 128, 128, 3)
    assert read_video(out_dir / "clip_flow.mp4").shape == (4, 128, 128, 3)
    assert read_video(out_dir / "clip.gif").shape[1:] == (128, 128, 3)
    meta = json.loads((out_dir / "clip.json").read_text())
    assert meta["params"]["num_frames"] == 4 and meta["params"]["fps"] == 10.0 and meta["params"]["s2d"] == "classic"
    assert meta["inputs"]["image"].endswith("img.png") and len(meta["inputs"]["image_sha256"]) == 64
    assert {"densify", "warp", "encode"} <= set(meta["timing"])
    assert "clip.mp4" in out


def _assert_clean_failure(code: int, err: str, workdir: Path, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    out_dir = workdir / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"tracks": [[[1, 2], [3, 4]],,]}', "invalid JSON at line 1"),
        ('{"tracks": [[[10, 10], [300, 10]]]}', "outside the 128x128 image"),
        ('{"tracks": [[[10, 10], [NaN, 10]]]}', "not finite"),
        ('{"tracks": []}', '"tracks" is empty'),
    ],
    ids=["malformed_json", "point_outside_image", "nan_point", "empty_track_list"],
)
def test_bad_hints_file(workdir: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str) -> None:
    (workdir / "bad.json").write_text(text)
    code, _, err = _run(_args(workdir, tracks="bad.json"), capsys)
    _assert_clean_failure(code, err, workdir, fragment)


def test_mask_of_wrong_size(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(workdir / "small.png")
    code, _, err = _run(_args(workdir, "--brush", str(workdir / "small.png")), capsys)
    _assert_clean_failure(code, err, workdir, "is 48x32 (WxH)")


def test_unreadable_image(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "cut.png").write_bytes((workdir / "img.png").read_bytes()[:80])
    code, _, err = _run(_args(workdir, image="cut.png"), capsys)
    _assert_clean_failure(code, err, workdir, "cannot read image")


def test_non_image_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "notes.png").write_text("these are notes, not pixels\n")
    code, _, err = _run(_args(workdir, image="notes.png"), capsys)
    _assert_clean_failure(code, err, workdir, "is not an image")


def test_missing_image(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_args(workdir, image="nope.png"), capsys)
    _assert_clean_failure(code, err, workdir, "does not exist")


def test_cmp_without_checkpoint(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_args(workdir, "--s2d", "cmp"), capsys)
    _assert_clean_failure(code, err, workdir, "--cmp PATH")


def test_out_below_a_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "out").write_text("a file where the output folder should be")
    args = _args(workdir)
    args[args.index("--out") + 1] = str(workdir / "out" / "clip.mp4")
    code, _, err = _run(args, capsys)
    assert code == 2 and err.startswith("error: ") and "is a file, not a folder" in err
    assert (workdir / "out").read_text().startswith("a file")


def test_usage_error_exits_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["preview", str(workdir / "img.png")], capsys)  # --tracks and --out missing
    assert code == 2 and "Traceback" not in err
    assert not (workdir / "out").exists()


def test_help_is_fast_and_shows_examples() -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mofa.cli", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "preview" in proc.stdout and "demo" in proc.stdout
    assert elapsed < 20  # generous: heavy imports (torch, cv2) would show up as several seconds more
    sub = subprocess.run(
        [sys.executable, "-m", "mofa.cli", "preview", "--help"], capture_output=True, text=True, timeout=60
    )
    assert sub.returncode == 0 and "mofa preview photo.jpg" in sub.stdout


def test_help_does_not_import_torch() -> None:
    code = "import sys; from mofa.cli import app; print('torch' in sys.modules, 'cv2' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False False", proc.stdout + proc.stderr


def test_subprocess_bad_input_has_no_traceback(workdir: Path) -> None:
    (workdir / "bad.json").write_text("{nope")
    proc = subprocess.run(
        [sys.executable, "-m", "mofa.cli", *_args(workdir, tracks="bad.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (workdir / "out").exists()


def test_demo_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["demo", "--out-dir", str(tmp_path / "demo"), "--frames", "3"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["astronaut.gif", "astronaut.json", "astronaut.mp4", "astronaut_flow.mp4", "astronaut_hints.png"]
    assert read_video(tmp_path / "demo" / "astronaut.mp4").shape == (3, 512, 512, 3)
    assert "astronaut.mp4" in out


def test_preview_with_cmp_checkpoint(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import build_tiny_cmp

    ckpt = workdir / "cmp"  # a diffusers folder (config.json + safetensors): the tiny config travels with it
    build_tiny_cmp().save_pretrained(ckpt)
    code, _, err = _run(_args(workdir, "--s2d", "cmp", "--cmp", str(ckpt), "--frames", "3"), capsys)
    assert code == 0, err
    meta = json.loads((workdir / "out" / "clip.json").read_text())
    assert meta["params"]["s2d"].startswith("cmp:") and meta["params"]["num_frames"] == 3
    assert read_video(workdir / "out" / "clip.mp4").shape == (3, 128, 128, 3)


def test_main_enables_huge_page_allocations_before_torch_loads() -> None:
    """The console script sets THP_MEM_ALLOC_ENABLE (read by torch's CPU allocator at load) unless the user did."""
    code = (
        "import os, sys; from mofa.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.stdout.strip().splitlines()[-1] == "1 False", proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
    )
    assert proc.stdout.strip().splitlines()[-1] == "0 False", proc.stdout + proc.stderr
