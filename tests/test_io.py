"""mofa.io.image (loading, the §2.1 preprocessing rule) and mofa.io.video (mp4 / gif / PNG folder, metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mofa.errors import MofaInputError
from mofa.io.image import as_uint8_image, load_image, plan_prepare, prepare_image
from mofa.io.video import export_video, frames_to_uint8, metadata_path, read_video, write_metadata


def _noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ image loading
def test_load_image_roundtrip_and_rgba(tmp_path: Path) -> None:
    img = _noise_image(20, 30)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), img)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent → composited over white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out == 255).all()


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("hello, not an image"), "is not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "cannot read image"),
        (lambda p: p.mkdir(), "is not a file"),
    ],
    ids=["missing", "text", "truncated", "folder"],
)
def test_load_image_bad_files(tmp_path: Path, make, fragment: str) -> None:
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(MofaInputError, match=fragment) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_noise_image(64, 64)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize(
    "raw, expected",
    [
        ((512, 512), ((512, 512), (512, 512), 0, 0)),
        ((480, 640), ((512, 683), (512, 640), 0, 22)),  # round(640·512/480) = 683 → crop 640, left round(43/2) = 22
        ((1080, 1920), ((512, 910), (512, 896), 0, 7)),
        ((150, 230), ((512, 785), (512, 768), 0, 8)),  # round(8.5) = 8 (Python rounds half to even, like torchvision)
        ((700, 300), ((1195, 512), (1152, 512), 22, 0)),  # 700·512/300 = 1194.67 → 1195
    ],
)
def test_plan_prepare_reference_rule(raw, expected) -> None:
    plan = plan_prepare(raw, short_side=512, multiple=64)
    assert (plan.resized_size, plan.out_size, plan.crop_top, plan.crop_left) == expected
    assert plan.out_size[0] % 64 == 0 and plan.out_size[1] % 64 == 0


def test_prepare_image_reference_mode_is_pil_bilinear_plus_center_crop() -> None:
    raw = _noise_image(150, 230, seed=1)
    out = prepare_image(raw, short_side=128, reference_mode=True)
    # Independent formulation of spec §2.1: PIL BILINEAR to (round(w·r), round(h·r)), torchvision CenterCrop offsets.
    ratio = 128 / 150
    w, h = round(230 * ratio), round(150 * ratio)
    resized = np.asarray(Image.fromarray(raw).resize((w, h), Image.Resampling.BILINEAR))
    ch, cw = h - h % 64, w - w % 64
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    np.testing.assert_array_equal(out, resized[top : top + ch, left : left + cw])
    assert out.shape == (128, 192, 3)


def test_prepare_image_default_mode_sizes_and_identity() -> None:
    raw = _noise_image(150, 230, seed=2)
    out = prepare_image(raw, short_side=128)
    assert out.shape == (128, 192, 3) and out.dtype == np.uint8
    ready = _noise_image(128, 192, seed=3)
    np.testing.assert_array_equal(prepare_image(ready, short_side=128), ready)
    np.testing.assert_array_equal(prepare_image(ready, short_side=128, reference_mode=True), ready)


def test_prepare_transform_maps_points_like_the_pixels() -> None:
    # A single bright pixel in the raw image must land where map_points says (up to resampling blur).
    raw = np.zeros((300, 460, 3), np.uint8)
    raw[100:104, 300:304] = 255  # 4x4 block centred at (301.5, 101.5)
    plan = plan_prepare(raw.shape[:2], short_side=256)
    out = prepare_image(raw, short_side=256).astype(np.float64)[..., 0]
    ys, xs = np.mgrid[: out.shape[0], : out.shape[1]]
    cx, cy = (out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()
    mx, my = plan.map_points(np.array([301.5, 101.5]))
    assert abs(cx - mx) < 0.05 and abs(cy - my) < 0.05
    mask = np.zeros(raw.shape[:2], bool)
    mask[100:104, 300:304] = True
    mapped = plan.map_mask(mask)
    assert mapped.shape == plan.out_size
    yy, xx = np.nonzero(mapped)
    assert abs(xx.mean() - mx) < 1.0 and abs(yy.mean() - my) < 1.0


def test_prepare_rejects_bad_sizes() -> None:
    with pytest.raises(MofaInputError, match="smaller than the crop multiple"):
        plan_prepare((100, 100), short_side=32)
    with pytest.raises(MofaInputError, match="largest side allowed"):
        plan_prepare((10, 1000), short_side=512)


def test_as_uint8_image_accepts_tensors_and_floats() -> None:
    img = _noise_image(6, 7)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(as_uint8_image(t), img)
    np.testing.assert_array_equal(as_uint8_image(img.astype(np.float32) / 255), img)
    with pytest.raises(MofaInputError):
        as_uint8_image(np.full((4, 4, 3), np.nan, np.float32))


# ------------------------------------------------------------------------------------------------ video
def _moving_frames(t: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 2] = 60
    frames = []
    for i in range(t):
        f = base.copy()
        f[10:30, 5 + 4 * i : 15 + 4 * i] = (250, 40, 40)
        frames.append(f)
    return np.stack(frames)


def test_mp4_roundtrip_frames_and_content(tmp_path: Path) -> None:
    frames = _moving_frames()
    path = export_video(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, tmp_path / "v.mp4", fps=20)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3.0  # crf 16: near lossless
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_mp4_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    frames = _moving_frames(3, 33, 47)
    back = read_video(export_video(frames, tmp_path / "odd.mp4", fps=10))
    assert back.shape == (3, 34, 48, 3)


def test_gif_and_png_folder(tmp_path: Path) -> None:
    frames = _moving_frames()
    gif = read_video(export_video(frames, tmp_path / "v.gif", fps=20))
    assert gif.shape == frames.shape
    assert np.abs(gif.astype(int) - frames.astype(int)).mean() < 4.0
    with Image.open(tmp_path / "v.gif") as im:
        assert im.info["duration"] == 50 and im.info.get("loop") == 0
    folder = export_video(frames, tmp_path / "frames", fps=20)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["frame_0000.png", "frame_0001.png"]
    np.testing.assert_array_equal(read_video(folder), frames)


def test_export_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mofa.io.video as video

    def boom(*args, **kwargs):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "_write_mp4", boom)
    with pytest.raises(RuntimeError):
        export_video(_moving_frames(), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MofaInputError, match="fps"):
        export_video(_moving_frames(), tmp_path / "v.mp4", fps=0)
    with pytest.raises(MofaInputError, match=".mp4 or .gif"):
        export_video(_moving_frames(), tmp_path / "v.avi")
    with pytest.raises(MofaInputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(MofaInputError, match="cannot read video"):
        read_video(tmp_path / "junk.mp4")
    assert frames_to_uint8([np.zeros((2, 3, 3), np.uint8)] * 2).shape == (2, 2, 3, 3)


def test_write_metadata_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    side = write_metadata(out, {"seed": np.int64(3), "size": (512, 320), "path": out, "t": np.float32(0.5)})
    assert side == metadata_path(out) == tmp_path / "clip.json"
    data = json.loads(side.read_text())
    assert data["seed"] == 3 and data["size"] == [512, 320] and data["path"] == str(out) and data["t"] == 0.5
    assert "mofa_version" in data
