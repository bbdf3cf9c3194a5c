"""Unit tests of the app's pure handlers (mofa.app.state / mofa.app.handlers): no server, no browser, seconds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mofa.app import handlers
from mofa.app.handlers import Limits, RunSettings
from mofa.app.state import AppState
from mofa.errors import MofaInputError


def _image(h: int = 128, w: int = 192) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx // 16 + yy // 16) % 2) * 255], -1)
    return img.astype(np.uint8)


@pytest.fixture
def loaded() -> AppState:
    return AppState().with_image(_image(), source_name="test")


def _clicks(state: AppState, *points: tuple[int, int], mode: str = "Trajectory", radius: int = 10) -> AppState:
    for p in points:
        state, notice = handlers.click(state, mode, p, radius)
        assert notice is None, notice
    return state


# ------------------------------------------------------------------------------------------------ state edits
def test_add_points_new_track_and_undo_walk_back_through_tracks(loaded: AppState) -> None:
    s = _clicks(loaded, (10, 20), (30, 40))
    assert s.drawn_tracks == [[(10, 20), (30, 40)]]
    s, _ = handlers.new_track(s)
    s = _clicks(s, (50, 60))
    assert s.drawn_tracks == [[(10, 20), (30, 40)], [(50, 60)]]
    assert loaded.drawn_tracks == []  # edits return new states; the old one is untouched
    s, _ = handlers.undo(s)
    assert s.drawn_tracks == [[(10, 20), (30, 40)]]
    s = _clicks(s, (70, 80))  # the emptied track is still the current one: the click starts track 2 again
    assert s.drawn_tracks == [[(10, 20), (30, 40)], [(70, 80)]]
    for _ in range(3):
        s, _ = handlers.undo(s)
    assert s.drawn_tracks == []
    s, notice = handlers.undo(s)
    assert notice is not None and "Nothing to undo" in notice.text
    assert s.drawn_tracks == [] and s.image is not None


def test_new_track_twice_is_one_track_and_clear_keeps_image(loaded: AppState) -> None:
    s = _clicks(loaded, (1, 2))
    s, _ = handlers.new_track(s)
    s, notice = handlers.new_track(s)
    assert notice is not None and "new track" in notice.text
    assert len(s.tracks) == 2
    s = _clicks(s, (5, 5), mode="Motion brush")
    s, _ = handlers.clear(s)
    assert s.drawn_tracks == [] and s.move_stamps == () and s.is_empty
    assert np.array_equal(s.image, loaded.image)


def test_undo_removes_the_latest_edit_whatever_its_kind(loaded: AppState) -> None:
    s = _clicks(loaded, (10, 10))
    s = _clicks(s, (40, 40), mode="Motion brush", radius=7)
    s = _clicks(s, (60, 60), mode="Static brush", radius=5)
    s = _clicks(s, (20, 20))
    assert s.move_stamps == ((40, 40, 7),) and s.static_stamps == ((60, 60, 5),)
    s, _ = handlers.undo(s)
    assert s.drawn_tracks == [[(10, 10)]]
    s, _ = handlers.undo(s)
    assert s.static_stamps == () and s.move_stamps == ((40, 40, 7),)
    s, _ = handlers.undo(s)
    assert s.move_stamps == () and s.drawn_tracks == [[(10, 10)]]


@pytest.mark.parametrize(
    ("xy", "mode", "radius", "needle"),
    [
        ((500, 5), "Trajectory", 10, "outside the 192x128"),
        ((-1, 5), "Trajectory", 10, "outside"),
        (None, "Trajectory", 10, "no position"),
        (("a", "b"), "Trajectory", 10, "not a pair"),
        ((5, 5), "Motion brush", 0, "radius"),
        ((5, 5), "Lasso", 10, "Unknown drawing mode"),
    ],
)
def test_bad_clicks_warn_and_keep_state(loaded: AppState, xy, mode, radius, needle) -> None:
    s, notice = handlers.click(loaded, mode, xy, radius)
    assert s is loaded
    assert notice is not None and notice.level == "warning" and needle in notice.text


def test_click_before_upload_warns() -> None:
    s, notice = handlers.click(AppState(), "Trajectory", (3, 3))
    assert s.image is None and notice is not None and "Upload an image" in notice.text


def test_tracks_json_and_describe(loaded: AppState) -> None:
    s = _clicks(loaded, (10, 20), (30, 40))
    s = _clicks(s, (50, 50), mode="Static brush", radius=4)
    data = handlers.tracks_json(s)
    assert data == {
        "image_size": [128, 192],
        "tracks": [[[10, 20], [30, 40]]],
        "move_brush": [],
        "static_brush": [[50, 50, 4]],
    }
    json.dumps(data)
    text = handlers.describe(s)
    assert "192x128" in text and "1 track" in text and "#1: 2 pt" in text and "static brush: 1" in text
    assert "last point" not in text  # the last edit was a brush stamp
    assert "last point (30, 40)" in handlers.describe(handlers.undo(s)[0])


# ------------------------------------------------------------------------------------------------ upload
def test_load_image_prepares_to_multiples_of_64(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_image(300, 420)).save(path)
    s0 = _clicks(AppState().with_image(_image()), (5, 5))
    s, notice = handlers.load_image(s0, path)
    assert notice.level == "info" and "photo.jpg" in notice.text
    h, w = s.image_size
    assert h % 64 == 0 and w % 64 == 0 and min(h, w) == 512
    assert s.image.dtype == np.uint8 and s.image.shape == (h, w, 3)
    assert s.drawn_tracks == [] and s.source_name == "photo"  # hints of the old image are dropped


def test_bad_uploads_give_readable_messages(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 8)).save(huge)
    big = tmp_path / "big.png"
    Image.fromarray(_image(256, 256)).save(big)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2000, 20)).save(strip)  # fits the upload limits, but 512 px short side → 51200 px long side
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(big.read_bytes()[:200])
    cases = [
        (text, Limits(), "not an image"),
        (huge, Limits(), "5000x8"),
        (big, Limits(max_file_bytes=100), "the limit is"),
        (truncated, Limits(), "cut.png"),
        (strip, Limits(), "4096"),
        (tmp_path / "missing.png", Limits(), "did not arrive"),
        (None, Limits(), "No file"),
    ]
    start = AppState()
    for path, limits, needle in cases:
        s, notice = handlers.load_image(start, path, limits)
        assert s is start, path
        assert notice.level == "warning" and needle in notice.text, (path, notice.text)
        assert "\n" not in notice.text


# ------------------------------------------------------------------------------------------------ hints, render
def test_hints_from_state_tracks_brushes_and_anchor_note(loaded: AppState) -> None:
    s = _clicks(loaded, (10, 20), (30, 40), (50, 20))
    s, _ = handlers.new_track(s)
    s = _clicks(s, (100, 100))
    s = _clicks(s, (150, 60), mode="Motion brush", radius=6)
    hints, notes = handlers.hints_from_state(s, num_frames=9)
    assert hints.image_size == (128, 192) and hints.num_frames == 9
    assert [d.num_points for d in hints.drags] == [3, 1]
    np.testing.assert_array_equal(hints.drags[0].points, [[10, 20], [30, 40], [50, 20]])
    move = hints.union_mask("move")
    assert (
        move is not None
        and move[60, 150]
        and move[60, 156]
        and not move[60, 158]
        and hints.union_mask("static") is None
    )
    assert int(move.sum()) == pytest.approx(np.pi * 36, rel=0.2)
    assert any("static anchor" in n for n in notes) and not any("nothing will move" in n for n in notes)


def test_hints_from_state_needs_a_track(loaded: AppState) -> None:
    with pytest.raises(MofaInputError, match="at least one trajectory"):
        handlers.hints_from_state(loaded, 8)
    brushed = _clicks(loaded, (20, 20), mode="Motion brush")
    with pytest.raises(MofaInputError, match="brushes only restrict"):
        handlers.hints_from_state(brushed, 8)
    with pytest.raises(MofaInputError, match="Upload"):
        handlers.hints_from_state(AppState(), 8)


def test_render_draws_tracks_and_brushes(loaded: AppState) -> None:
    assert handlers.render(AppState()) is None
    plain = handlers.render(loaded)
    np.testing.assert_array_equal(plain, loaded.image)
    with_track = handlers.render(_clicks(loaded, (20, 20), (150, 100)))
    assert with_track.shape == loaded.image.shape and with_track.dtype == np.uint8
    changed = np.any(with_track != loaded.image, axis=-1)
    assert changed[20, 20] and changed[100, 150] and changed.mean() < 0.2
    with_brush = handlers.render(_clicks(loaded, (100, 64), mode="Static brush", radius=12))
    changed = np.any(with_brush != loaded.image, axis=-1)
    assert changed[64, 100] and not changed[64, 130] and not changed[10, 10]


# ------------------------------------------------------------------------------------------------ preview
def test_preview_without_tracks_warns(loaded: AppState, tmp_path: Path) -> None:
    out, notice = handlers.run_preview(loaded, RunSettings(num_frames=5), tmp_path)
    assert out is None and notice.level == "warning" and "trajectory" in notice.text
    out, notice = handlers.run_preview(AppState(), RunSettings(num_frames=5), tmp_path)
    assert out is None and notice.level == "warning"
    out, notice = handlers.run_preview(_clicks(loaded, (5, 5), (9, 9)), RunSettings(num_frames=1), tmp_path)
    assert out is None and "Frame count" in notice.text


def test_preview_writes_moving_video_and_rerunnable_hints(loaded: AppState, tmp_path: Path) -> None:
    from mofa.hints import load_hints
    from mofa.io.video import read_video

    s = _clicks(loaded, (60, 64), (90, 64))
    s = _clicks(s, (150, 30), mode="Static brush", radius=8)
    out, notice = handlers.run_preview(s, RunSettings(num_frames=6, fps=10), tmp_path)
    assert out is not None, notice.text
    assert notice.level == "info" and "6 frames" in notice.text
    frames = read_video(out.video)
    assert frames.shape == (6, 128, 192, 3)
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 0.5  # it moves
    flow = read_video(out.flow_video)
    assert flow.shape[0] == 6
    names = sorted(p.suffix for p in out.downloads)
    assert names == [".gif", ".json", ".mp4", ".png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.downloads)
    hints_path = next(p for p in out.downloads if p.suffix == ".json")
    png = next(p for p in out.downloads if p.suffix == ".png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), loaded.image)
    reloaded = load_hints(hints_path, image_size=(128, 192))
    expected, _ = handlers.hints_from_state(s, 6)
    assert reloaded == expected


def test_downloads_rerun_from_the_cli_give_the_same_animation(loaded: AppState, tmp_path: Path) -> None:
    """The hints JSON + prepared PNG the app offers reproduce the app's preview with ``mofa preview``."""
    from mofa.cli import main
    from mofa.io.video import read_video

    s = _clicks(loaded, (60, 64), (90, 70), (100, 60))
    out, notice = handlers.run_preview(s, RunSettings(num_frames=5), tmp_path / "app")
    assert out is not None, notice.text
    hints_path = next(p for p in out.downloads if p.suffix == ".json")
    png = next(p for p in out.downloads if p.suffix == ".png")
    cli_video = tmp_path / "cli" / "again.mp4"
    with pytest.raises(SystemExit) as exc:
        main(["preview", str(png), "--tracks", str(hints_path), "--out", str(cli_video), "--size", "128"])
    assert exc.value.code == 0
    app_frames, cli_frames = read_video(out.video).astype(int), read_video(cli_video).astype(int)
    assert app_frames.shape == cli_frames.shape == (5, 128, 192, 3)
    assert np.abs(app_frames - cli_frames).mean() < 0.5


def test_preview_one_point_track_does_not_crash(loaded: AppState, tmp_path: Path) -> None:
    out, notice = handlers.run_preview(_clicks(loaded, (50, 50)), RunSettings(num_frames=4), tmp_path)
    assert out is not None, notice.text
    assert "nothing will move" in notice.text


@pytest.mark.parametrize(
    ("edits", "note"),
    [
        ([("Trajectory", (20, 20)), ("Trajectory", (40, 20)), ("Motion brush", (150, 100))], "changes nothing"),
        ([("Trajectory", (100, 60)), ("Trajectory", (120, 60)), ("Motion brush", (100, 60))], None),
        ([("Trajectory", (100, 60)), ("Trajectory", (120, 60)), ("Static brush", (100, 60))], "static brush"),
        ([("Trajectory", (100, 60)), ("Trajectory", (100, 60))], None),  # zero-length drag
        (
            [("Trajectory", (100, 60)), ("Trajectory", (120, 60)), ("new", None)]
            + [("Trajectory", (100, 60)), ("Trajectory", (80, 60))],  # two tracks from the same start pixel
            None,
        ),
    ],
)
def test_preview_brush_and_track_combinations_never_crash(loaded: AppState, tmp_path: Path, edits, note) -> None:
    s = loaded
    for mode, xy in edits:
        s = handlers.new_track(s)[0] if mode == "new" else _clicks(s, xy, mode=mode, radius=20)
    out, notice = handlers.run_preview(s, RunSettings(num_frames=3), tmp_path)
    assert out is not None and out.video.is_file(), notice.text
    if note is None:
        assert "Note" not in notice.text, notice.text
    else:
        assert note in notice.text


class _ShiftDensifier:
    """A SparseToDense stand-in (what ``mofa app --cmp`` passes): moves everything 4 px right, counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def preferred_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return (64, 64)

    def __call__(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert image.shape == (3, 64, 64) and flow.shape[1:] == (2, 64, 64)
        dense = torch.zeros_like(flow)
        dense[:, 0] = 4.0 * 64 / 192  # 4 px of the 192 px wide image, in pixels of the 64-px grid
        return dense


def test_preview_uses_the_given_densifier(loaded: AppState, tmp_path: Path) -> None:
    from mofa.io.video import read_video

    densifier = _ShiftDensifier()
    out, notice = handlers.run_preview(
        _clicks(loaded, (60, 60), (61, 60)), RunSettings(num_frames=3), tmp_path, densifier=densifier
    )
    assert out is not None, notice.text
    assert densifier.calls >= 1
    frames = read_video(out.video).astype(int)
    far = (slice(100, 120), slice(150, 180))  # far from the tiny drag: only a global shift moves it
    assert np.abs(frames[-1][far] - frames[0][far]).mean() > 5


# ------------------------------------------------------------------------------------------------ generate
def test_generate_without_weights_explains_how_to_get_them(loaded: AppState, tmp_path: Path) -> None:
    s = _clicks(loaded, (10, 10), (20, 20))
    out, notice = handlers.run_generate(s, RunSettings(), tmp_path, pipeline=None)
    assert out is None and notice.level == "warning"
    for needle in ("stabilityai/stable-video-diffusion-img2vid-xt-1-1", "MyNiuuu/MOFA-Video-Traj", "--svd", "--cmp"):
        assert needle in notice.text


class _FakePipeline:
    """Stands in for MofaVideoPipeline: records the call, reports steps, returns frames that move."""

    def __init__(self) -> None:
        self.kwargs: dict = {}

    def __call__(self, image, hints, num_frames, num_inference_steps, callback_on_step_end, generator, **kwargs):
        self.kwargs = {"image": image, "hints": hints, "num_frames": num_frames, **kwargs}
        for i in range(num_inference_steps):
            callback_on_step_end(self, i, torch.tensor(1.0), {})
        w, h = image.size
        t = torch.linspace(0, 1, num_frames)[:, None, None, None]
        frames = (torch.rand(1, 1, 3, h, w, generator=generator) * 0.5 + 0.5 * t).clamp(0, 1)
        return SimpleNamespace(frames=frames, flow=torch.ones(1, num_frames - 1, 2, h, w))


def test_generate_calls_pipeline_with_settings_and_reports_progress(loaded: AppState, tmp_path: Path) -> None:
    from mofa.io.video import read_video

    s = _clicks(loaded, (10, 10), (20, 20))
    pipe, steps = _FakePipeline(), []
    settings = RunSettings(num_frames=5, seed=7, control_scale=0.3, num_inference_steps=3)
    out, notice = handlers.run_generate(
        s, settings, tmp_path, pipeline=pipe, progress=lambda i, n: steps.append((i, n))
    )
    assert out is not None, notice.text
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert pipe.kwargs["conditioning_scale"] == pytest.approx(0.3) and pipe.kwargs["num_frames"] == 5
    assert pipe.kwargs["hints"].num_frames == 5 and len(pipe.kwargs["hints"].drags) == 1
    assert read_video(out.video).shape == (5, 128, 192, 3)
    meta = json.loads(next(p for p in out.downloads if p.name.endswith("_settings.json")).read_text())
    assert meta["seed"] == 7 and meta["steps"] == 3


def test_run_settings_from_raw_ui_values() -> None:
    assert RunSettings.from_inputs(8.0, 0.25, 7.0, 3.0) == RunSettings(
        num_frames=8, control_scale=0.25, seed=7, num_inference_steps=3
    )
    assert RunSettings.from_inputs(None, float("nan"), "", "x") == RunSettings()  # cleared boxes → defaults


def test_bad_settings_warn(loaded: AppState, tmp_path: Path) -> None:
    s = _clicks(loaded, (5, 5), (9, 9))
    for settings, needle in [
        (RunSettings(seed=-1), "Seed"),
        (RunSettings(num_inference_steps=0), "Sampling steps"),
        (RunSettings(control_scale=-0.5), "Control scale"),
    ]:
        out, notice = handlers.run_generate(s, settings, tmp_path, pipeline=_FakePipeline())
        assert out is None and notice.level == "warning" and needle in notice.text
