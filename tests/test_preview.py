"""mofa.pipelines.preview: drag → warped frames, hole filling, input preparation and all-or-nothing outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mofa.errors import MofaInputError
from mofa.flow.ops import backward_warp
from mofa.flow.reverse import reverse_flow
from mofa.hints import DragHint, HintSet, MotionBrush
from mofa.pipelines.preview import (
    prepare_inputs,
    preview,
    preview_output_paths,
    warp_frames,
    write_preview_outputs,
)

H, W = 96, 128
SQUARE = (slice(32, 64), slice(30, 62))  # 32x32, centroid (45.5, 47.5)


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy blue background with a textured red square: float32 [H, W, 3] in [0, 1] and the square mask."""
    rng = np.random.default_rng(seed)
    img = np.empty((H, W, 3), np.float32)
    img[..., 0] = 0.15 + 0.1 * rng.random((H, W))
    img[..., 1] = 0.35 + 0.15 * rng.random((H, W))
    img[..., 2] = 0.55 + 0.2 * rng.random((H, W))
    square = np.zeros((H, W), bool)
    square[SQUARE] = True
    tex = rng.random((H, W))
    img[square, 0] = 0.75 + 0.2 * tex[square]
    img[square, 1] = 0.1 + 0.15 * tex[square]
    img[square, 2] = 0.1 + 0.1 * tex[square]
    return img, square


def _drag_hints(num_frames: int = 5, brush: np.ndarray | None = None) -> HintSet:
    drags = [DragHint([[x, y], [x + 20, y]]) for x, y in [(36, 38), (56, 38), (36, 58), (56, 58), (46, 48)]]
    drags += [DragHint([[x, y]]) for x, y in [(10, 10), (110, 10), (10, 85), (110, 85), (100, 48)]]
    brushes = [MotionBrush(brush, kind="move")] if brush is not None else []
    return HintSet((H, W), drags, brushes, num_frames=num_frames)


def _red_centroid(frame: np.ndarray) -> tuple[float, float, int]:
    """Centroid (x, y) and area of the red square, segmented by colour on an [H, W, 3] frame."""
    mask = frame[..., 0] - np.maximum(frame[..., 1], frame[..., 2]) > 0.3
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


@pytest.mark.parametrize(
    "with_brush, method", [(False, "reverse"), (True, "reverse"), (False, "splat")], ids=["drags", "brush", "splat"]
)
def test_dragged_square_moves_20px(with_brush: bool, method: str) -> None:
    img, square = _scene()
    hints = _drag_hints(brush=square if with_brush else None)
    image = torch.from_numpy(img).permute(2, 0, 1)
    out = preview(image, hints, progress=False, method=method)
    assert out.frames.shape == (5, 3, H, W) and out.flow.shape == (4, 2, H, W)
    assert torch.equal(out.frames[0], image)  # frame 0 is the input exactly
    frames = out.frames.permute(0, 2, 3, 1).numpy()
    x0, y0, area0 = _red_centroid(frames[0])
    x1, y1, area1 = _red_centroid(frames[-1])
    assert abs((x1 - x0) - 20.0) <= 1.0 and abs(y1 - y0) <= 1.0
    assert abs(area1 - area0) <= 0.05 * area0  # moved, not smeared or duplicated
    xm, _, _ = _red_centroid(frames[2])
    assert abs((xm - x0) - 10.0) <= 1.0  # halfway at the middle frame (2-point track = constant speed)
    # The strip the square uncovered shows background (blue), not black and not a red ghost.
    strip = frames[-1][32:64, 32:48]
    assert strip[..., 2].mean() > 0.5 and strip[..., 0].mean() < 0.3
    assert frames.min() >= 0.0 and frames.max() <= 1.0


def test_preview_num_frames_override_and_uint8_input() -> None:
    img, _ = _scene()
    u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    out = preview(u8, _drag_hints(num_frames=5), num_frames=3, progress=False)
    assert out.frames.shape[0] == 3 and out.flow.shape[0] == 2
    np.testing.assert_array_equal(np.rint(out.frames[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), u8)


def test_preview_rejects_mismatched_image() -> None:
    with pytest.raises(MofaInputError, match="hints are for"):
        preview(np.zeros((64, 64, 3), np.uint8), _drag_hints(), progress=False)


# ------------------------------------------------------------------------------------------------ warp_frames
METHODS = [("reverse", 1), ("reverse", 2), ("splat", 1)]
METHOD_IDS = ["reverse", "reverse-stride2", "splat"]


@pytest.mark.parametrize("method, stride", METHODS, ids=METHOD_IDS)
def test_warp_zero_flow_is_identity(method: str, stride: int) -> None:
    image = torch.rand(3, 20, 24)
    frames, holes = warp_frames(image, torch.zeros(2, 2, 20, 24), method=method, stride=stride)
    torch.testing.assert_close(frames, image.expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    assert (holes == 0).all()


@pytest.mark.parametrize("method, stride", METHODS, ids=METHOD_IDS)
def test_warp_integer_shift_and_mirrored_border(method: str, stride: int) -> None:
    image = torch.rand(3, 16, 40)
    flow = torch.zeros(1, 2, 16, 40)
    flow[:, 0] = 6.0
    frames, holes = warp_frames(image, flow, method=method, stride=stride)
    torch.testing.assert_close(frames[0, :, :, 6:], image[:, :, :-6], atol=1e-5, rtol=0)
    assert (holes[0, 0, :, :5] > 0.5).all() and (holes[0, 0, :, 8:] == 0).all()
    # The uncovered left strip mirrors the image (reflection at the border), it does not repeat the edge column.
    for x in range(6):
        torch.testing.assert_close(frames[0, :, :, x], image[:, :, 6 - x], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, stride", METHODS, ids=METHOD_IDS)
def test_warp_moving_content_lands_on_top(method: str, stride: int) -> None:
    image = torch.zeros(3, 8, 32)
    image[0, :, 4:8] = 1.0  # red bar, moves right by 10 onto ...
    image[2, :, 14:18] = 1.0  # ... a static blue bar
    flow = torch.zeros(1, 2, 8, 32)
    flow[0, 0, :, 4:8] = 10.0
    frames, _ = warp_frames(image, flow, method=method, stride=stride)
    inner = slice(15, 17) if stride > 1 else slice(14, 18)  # a coarse reversal softens the bar's edges by ~1 px
    assert (frames[0, 0, :, inner] > 0.99).all() and (frames[0, 2, :, inner] < 0.01).all()
    plain, _ = warp_frames(image, flow, sharpness=0.0, method=method, stride=1)
    assert not (plain[0, 0, :, 14:18] > 0.99).all()  # plain averaging does not keep the moving bar on top


@pytest.mark.parametrize("method", ["reverse", "splat"])
def test_warp_batched_equals_per_frame(method: str) -> None:
    image = torch.rand(3, 24, 30)
    flow = torch.randn(3, 2, 24, 30) * 3
    batched, holes = warp_frames(image, flow, method=method)
    for i in range(3):
        single, single_holes = warp_frames(image, flow[i : i + 1], method=method)
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)
        torch.testing.assert_close(holes[i : i + 1], single_holes, atol=1e-6, rtol=0)


def test_reverse_and_splat_agree_on_smooth_flow() -> None:
    image = torch.rand(3, 48, 64)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    bump = 6.0 * torch.exp(-((xs - 32) ** 2 + (ys - 24) ** 2) / (2 * 10.0**2))
    flow = torch.stack([bump, 0.5 * bump])[None]
    a, _ = warp_frames(image, flow, method="reverse", stride=1)
    b, _ = warp_frames(image, flow, method="splat")
    assert (a - b).abs().mean() < 0.03  # both resample the same motion; they differ only in interpolation blur
    c, _ = warp_frames(image, flow, method="reverse", stride=2)
    assert (c - a).abs().mean() < 0.03


# ------------------------------------------------------------------------------------------------ flow reversal
@pytest.mark.parametrize("stride", [1, 2])
def test_reverse_flow_inverts_a_stretch_exactly(stride: int) -> None:
    # F(x) = a·(x − x0) stretches every row about x0: each source spreads over 1 + a pixels, so bilinear splat
    # coverage is a jagged fraction although nothing is uncovered. The exact inverse is D(p) = a·(p − x0) / (1 + a).
    a, x0 = 0.5, 47.5
    xs = torch.arange(96.0).expand(40, -1)
    flow = torch.stack([a * (xs - x0), torch.zeros_like(xs)])[None]
    backward, holes = reverse_flow(flow, stride=stride)
    inner = (slice(4, -4), slice(4, -4))  # a coarse reversal is clamped within half a grid cell of the border
    torch.testing.assert_close(backward[0, 0][inner], (a * (xs - x0) / (1 + a))[inner], atol=0.02, rtol=0)
    assert backward[0, 1].abs().max() < 1e-4
    assert holes[0, 0][inner].max() < 1e-3  # a stretch is not a hole


def _total_variation(image: torch.Tensor) -> torch.Tensor:
    return (image[..., :, 1:] - image[..., :, :-1]).abs().mean() + (
        image[..., 1:, :] - image[..., :-1, :]
    ).abs().mean()


def test_large_smooth_drag_has_no_streaks() -> None:
    # A 60 px drag falling off smoothly to 0 at 128 px: the image stretches up to 1.7x behind the drag and is
    # squeezed ahead of it. Each row maps monotonically, so the exact frame is I0 sampled at the inverse of
    # x -> x + F(x), found per row by interpolating a dense sampling of that map.
    height, width, amplitude, radius = 64, 320, 60.0, 128.0

    def drag(x: torch.Tensor, y: float | torch.Tensor) -> torch.Tensor:
        return amplitude * (1 - ((x - width / 2) ** 2 + (y - height / 2) ** 2) / radius**2).clamp(min=0) ** 2

    ys, xs = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    flow = torch.stack([drag(xs, ys), torch.zeros_like(xs)])[None]
    gen = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 3, height // 4, width // 4, generator=gen)
    image = F.interpolate(texture, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    frames, holes = warp_frames(image, flow)

    dense = torch.linspace(-10.0, width + 10.0, 40 * (width + 20), dtype=torch.float64)
    source = np.stack(
        [np.interp(np.arange(width), (dense + drag(dense, y)).numpy(), dense.numpy()) for y in range(height)]
    )
    exact = torch.stack([xs - torch.from_numpy(source).float(), torch.zeros_like(xs)])[None]
    expected = backward_warp(image[None], -exact, padding_mode="reflection")
    error = (frames - expected).abs()[..., 2:-2, :]  # the coarse (stride 2) reversal is clamped at the border rows
    assert error.mean() < 0.005 and error.max() < 0.05
    assert holes.max() < 1e-3
    assert _total_variation(frames[0]) < 1.1 * _total_variation(image)  # streaks and tears would add edges


# ------------------------------------------------------------------------------------------------ inputs and files
def _write_raw(tmp_path: Path, h: int = 150, w: int = 230) -> Path:
    img = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path = tmp_path / "raw.png"
    Image.fromarray(img).save(path)
    return path


def test_prepare_inputs_prepared_grid(tmp_path: Path) -> None:
    image = _write_raw(tmp_path)
    inputs = prepare_inputs(image, {"tracks": [[[10, 10], [20, 15]]]}, size=128)
    assert inputs.image.shape == (128, 192, 3) and inputs.hints.image_size == (128, 192)
    assert inputs.hints_grid == "prepared"
    np.testing.assert_array_equal(inputs.hints.drags[0].points, [[10, 10], [20, 15]])
    assert len(inputs.sources["image_sha256"]) == 64


def test_prepare_inputs_maps_raw_grid_tracks_and_brushes(tmp_path: Path) -> None:
    image = _write_raw(tmp_path)  # 230x150 → resized 196x128 → crop 192x128 at left 2
    data = {
        "image_size": [150, 230],
        "num_frames": 4,
        "tracks": [[[115, 75], [140, 75]]],
        "brushes": [{"kind": "static", "circles": [[40, 40, 10]]}],
    }
    inputs = prepare_inputs(image, data, size=128)
    assert inputs.hints_grid == "raw" and inputs.hints.num_frames == 4
    s = 196 / 230
    expected = [
        [(115.5) * s - 0.5 - 2, (75.5) * (128 / 150) - 0.5],
        [(140.5) * s - 0.5 - 2, (75.5) * (128 / 150) - 0.5],
    ]
    np.testing.assert_allclose(inputs.hints.drags[0].points, expected)
    mask = inputs.hints.brushes[0].mask
    assert mask.shape == (128, 192)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - (40.5 * s - 2.5)) < 1.0 and abs(ys.mean() - (40.5 * 128 / 150 - 0.5)) < 1.0


def test_prepare_inputs_errors(tmp_path: Path) -> None:
    image = _write_raw(tmp_path)
    with pytest.raises(MofaInputError, match="hints were made for a 100x100 image"):
        prepare_inputs(image, {"image_size": [100, 100], "tracks": [[[1, 1]]]}, size=128)
    with pytest.raises(MofaInputError, match="outside the centre crop"):
        prepare_inputs(image, {"image_size": [150, 230], "tracks": [[[229, 10]]]}, size=128)
    with pytest.raises(MofaInputError, match="outside the 192x128 image"):
        prepare_inputs(image, {"tracks": [[[10, 10], [200, 10]]]}, size=128)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(small)
    with pytest.raises(MofaInputError, match="move mask .* is 5x5"):
        prepare_inputs(image, {"tracks": [[[1, 1]]]}, brush=small, size=128)
    with pytest.raises(MofaInputError, match="frames must be an integer >= 2"):
        prepare_inputs(image, {"tracks": [[[1, 1]]]}, num_frames=1, size=128)


def test_write_preview_outputs_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    u8 = np.random.default_rng(1).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    inputs = prepare_inputs(u8, {"num_frames": 3, "tracks": [[[40, 40], [60, 40]]]}, size=128)
    result = preview(inputs.image, inputs.hints, progress=False)
    out_dir = tmp_path / "out"
    paths = write_preview_outputs(out_dir / "clip.mp4", result, inputs, fps=10, metadata={"timing": {"warp": 1.0}})
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["clip.mp4", "clip.gif", "clip_flow.mp4", "clip_hints.png", "clip.json"]
    )
    meta = json.loads(paths["metadata"].read_text())
    assert meta["timing"]["warp"] == 1.0 and "encode" in meta["timing"]

    # A failure while encoding the third file leaves nothing new behind.
    import mofa.io.video as video

    calls = {"n": 0}
    real = video.export_video

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "export_video", flaky)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(RuntimeError):
        write_preview_outputs(fresh / "clip.mp4", result, inputs, fps=10, metadata={})
    assert list(fresh.iterdir()) == []


def test_preview_output_paths() -> None:
    paths = preview_output_paths("a/b.mp4")
    assert {k: str(v) for k, v in paths.items()} == {
        "video": "a/b.mp4",
        "gif": "a/b.gif",
        "flow": "a/b_flow.mp4",
        "hints": "a/b_hints.png",
        "metadata": "a/b.json",
    }
    with pytest.raises(MofaInputError, match="must end in .mp4"):
        preview_output_paths("a/b.gif")
