"""Hints layer: DragHint resampling, MotionBrush IO/resize, HintSet JSON format and its validation messages."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.interpolate import PchipInterpolator

from mofa.errors import MofaInputError
from mofa.hints import DragHint, HintSet, MotionBrush, brush_from_circles, load_hints, resample_polyline, save_hints

ASSETS = Path(__file__).resolve().parents[1] / "src" / "mofa" / "assets"


# --------------------------------------------------------------------------- DragHint / PCHIP
def _hermite_pchip_equal_spacing(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Independent Fritsch–Carlson PCHIP for knots linspace(0, 1, K) (scipy's derivative rules, written out)."""
    k = len(y)
    h = 1.0 / (k - 1)
    m = np.diff(y) / h
    d = np.zeros(k)
    for i in range(1, k - 1):
        if m[i - 1] * m[i] > 0:
            d[i] = 2.0 / (1.0 / m[i - 1] + 1.0 / m[i])  # equal spacing: harmonic mean
    for end, (m0, m1) in ((0, (m[0], m[1] if k > 2 else m[0])), (k - 1, (m[-1], m[-2] if k > 2 else m[-1]))):
        if k == 2:
            d[end] = m0
            continue
        de = (3.0 * m0 - m1) / 2.0
        if np.sign(de) != np.sign(m0):
            de = 0.0
        elif np.sign(m0) != np.sign(m1) and abs(de) > 3 * abs(m0):
            de = 3.0 * m0
        d[end] = de
    out = np.empty_like(t)
    for j, tj in enumerate(t):
        i = min(int(tj / h), k - 2)
        s = (tj - i * h) / h
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        out[j] = h00 * y[i] + h10 * h * d[i] + h01 * y[i + 1] + h11 * h * d[i + 1]
    return out


def test_resample_matches_independent_pchip() -> None:
    pts = np.array([[10.0, 200.0], [60.0, 180.0], [70.0, 100.0], [20.0, 90.0]])
    got = DragHint(pts).resample(25)
    t = np.linspace(0, 1, 25)
    for axis in range(2):
        np.testing.assert_allclose(got[:, axis], _hermite_pchip_equal_spacing(pts[:, axis], t), atol=1e-9)


def test_two_points_is_linear_and_endpoints_exact() -> None:
    got = DragHint([[0.0, 10.0], [24.0, -14.0]]).resample(25)
    np.testing.assert_allclose(got[:, 0], np.arange(25.0), atol=1e-12)
    np.testing.assert_allclose(got[:, 1], 10.0 - np.arange(25.0), atol=1e-12)


def test_endpoints_exact_where_scipy_is_off_by_an_ulp() -> None:
    # scipy lands one ulp off the last click for this track (found by search); the default pins it.
    y = np.array([49.0, 42.0, 114.0, 254.0])
    pts = np.stack([y, y], axis=-1)
    hits = [
        t
        for t in range(2, 40)
        if PchipInterpolator(np.linspace(0, 1, 4), y)(np.linspace(0, 1, t))[-1] != 254.0  # scipy raw
    ]
    assert hits, "expected scipy to miss the last knot for some T"
    t = hits[0]
    assert (DragHint(pts).resample(t)[[0, -1]] == pts[[0, -1]]).all()
    raw = resample_polyline(pts, t, exact_endpoints=False)
    assert raw[-1, 0] != 254.0 and raw[0, 0] == 49.0


def test_single_point_is_static_anchor() -> None:
    got = DragHint([[3.5, 7.25]]).resample(25)
    assert got.shape == (25, 2)
    assert (got == np.array([3.5, 7.25])).all()
    assert DragHint([[1, 2]]).is_anchor and not DragHint([[1, 2], [3, 4]]).is_anchor


@pytest.mark.parametrize(
    ("points", "fragment"),
    [
        ([], "at least one point"),
        ([[1.0, float("nan")]], "not finite"),
        ([[1.0, float("inf")], [2, 3]], "not finite"),
        ([[1, 2, 3]], "[x, y] pairs"),
        ([["a", "b"]], "numbers"),
    ],
)
def test_drag_rejects_bad_points(points: list, fragment: str) -> None:
    with pytest.raises(MofaInputError, match=None) as info:
        DragHint(np.array(points, dtype=object) if points and isinstance(points[0][0], str) else points)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- MotionBrush
def test_brush_png_rgba_uses_alpha_and_l_uses_nonzero(tmp_path: Path) -> None:
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # colour everywhere, alpha only in a block
    rgba[1:3, 2:5, 3] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    b = MotionBrush.from_file(tmp_path / "a.png", (6, 8))
    assert b.mask.sum() == 6 and b.mask[1:3, 2:5].all() and b.kind == "move"

    gray = np.zeros((6, 8), dtype=np.uint8)
    gray[0, 0] = 1
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert MotionBrush.from_file(tmp_path / "g.png", (6, 8), kind="static").mask.sum() == 1

    np.save(tmp_path / "m.npy", gray.astype(bool))
    assert MotionBrush.from_file(tmp_path / "m.npy", (6, 8)).mask[0, 0]


def test_brush_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(MofaInputError) as info:
        MotionBrush.from_file(tmp_path / "b.png", (12, 16))
    msg = str(info.value)
    assert "8x6" in msg and "16x12" in msg and "\n" not in msg


def test_brush_missing_file_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(MofaInputError, match="does not exist"):
        MotionBrush.from_file(tmp_path / "nope.png", (4, 4))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MofaInputError, match="cannot read"):
        MotionBrush.from_file(tmp_path / "junk.png", (4, 4))
    with pytest.raises(MofaInputError, match=r"\[0, 1\]"):
        MotionBrush(np.full((4, 4), 3.0))
    with pytest.raises(MofaInputError, match="'move' or 'static'"):
        MotionBrush(np.zeros((4, 4), bool), kind="wiggle")  # type: ignore[arg-type]


def test_brush_resize_default_is_nearest_binary() -> None:
    mask = np.zeros((20, 30), bool)
    mask[3:11, 7:19] = True
    got = MotionBrush(mask).resized((13, 17))
    want = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(13, 17), mode="nearest")[0, 0]
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) <= {0.0, 1.0}


def test_brush_resize_reference_is_cv2_bilinear_of_uint8_canvas() -> None:
    mask = np.zeros((20, 30), bool)
    mask[3:11, 7:19] = True
    got = MotionBrush(mask).resized((13, 17), reference_mode=True)
    canvas = np.zeros((20, 30), np.uint8)
    canvas[3:11, 7:19] = 255
    want = cv2.resize(canvas, (17, 13))  # the reference's call: the flag landed in `dst`, default INTER_LINEAR
    assert torch.equal(got, torch.from_numpy(want.astype(np.float32) / 255))
    frac = got[(got > 0) & (got < 1)]
    assert frac.numel() > 0  # soft edges exist
    assert torch.equal(got == 1.0, torch.from_numpy(want == 255))


def test_brush_from_circles_matches_cv2_circle() -> None:
    b = brush_from_circles((40, 50), [(10, 12, 5), (30, 30, 3)], kind="static")
    canvas = np.zeros((40, 50), np.uint8)
    cv2.circle(canvas, (10, 12), 5, 255, -1)
    cv2.circle(canvas, (30, 30), 3, 255, -1)
    assert (b.mask == (canvas > 0)).all() and b.kind == "static"


# --------------------------------------------------------------------------- HintSet JSON
def _hints_with_brushes() -> HintSet:
    move = np.zeros((32, 48), bool)
    move[4:20, 5:30] = True
    static = np.zeros((32, 48), bool)
    static[25:, :] = True
    static[0, 0] = True
    return HintSet(
        image_size=(32, 48),
        drags=[DragHint([[1.5, 2.25], [10, 11], [40.125, 30]]), DragHint([[7, 8]])],
        brushes=[MotionBrush(move), MotionBrush(static, kind="static")],
        num_frames=9,
    )


def test_json_round_trip_text_dict_and_file(tmp_path: Path) -> None:
    hints = _hints_with_brushes()
    text = hints.to_json()
    assert json.loads(text)["version"] == 1
    assert HintSet.from_json(text, (32, 48)) == hints
    assert HintSet.from_json(json.loads(text), (32, 48)) == hints
    path = save_hints(hints, tmp_path / "h.json")
    again = load_hints(path, (32, 48))
    assert again == hints
    assert again.num_frames == 9
    np.testing.assert_array_equal(again.drags[0].points, [[1.5, 2.25], [10, 11], [40.125, 30]])
    assert again.to_json() == text


def test_minimal_reference_format_and_bare_list() -> None:
    h = HintSet.from_json({"tracks": [[[1, 2], [3, 4]]]}, (10, 10))
    assert h.num_frames == 25 and len(h.drags) == 1 and h.brushes == []
    assert HintSet.from_json([[[1, 2], [3, 4]]], (10, 10)) == h
    per_track_objects = HintSet.from_json({"tracks": [{"points": [[1, 2], [3, 4]]}]}, (10, 10))
    assert per_track_objects == h


def test_load_hints_adds_brush_files_and_path_brushes(tmp_path: Path) -> None:
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:6] = 255
    Image.fromarray(m).save(tmp_path / "move.png")
    np.save(tmp_path / "still.npy", m > 0)
    (tmp_path / "h.json").write_text(
        json.dumps({"tracks": [[[1, 1], [2, 2]]], "brushes": [{"kind": "static", "path": "still.npy"}]})
    )
    h = load_hints(tmp_path / "h.json", (10, 12), brush=tmp_path / "move.png")
    assert [b.kind for b in h.brushes] == ["static", "move"]
    assert h.union_mask("move").sum() == 9 and h.union_mask("static").sum() == 9


def test_circles_brush_in_json() -> None:
    h = HintSet.from_json({"tracks": [[[5, 5]]], "brushes": [{"kind": "move", "circles": [[5, 5, 2]]}]}, (12, 12))
    assert h.union_mask("move")[5, 5] and h.union_mask("move").sum() == 13


def test_image_size_from_file_when_not_given() -> None:
    h = HintSet.from_json({"image_size": [20, 30], "tracks": [[[29, 19]]]})
    assert h.image_size == (20, 30)


BAD_CASES = [
    ({"tracks": [[[1, 2]]], "num_frames": 1}, "num_frames must be >= 2"),
    ({"tracks": [[[1, 2]]], "num_frames": 2.5}, "num_frames must be an integer"),
    ({"nothing": 1}, "unknown key 'nothing'"),
    ({"num_frames": 25}, 'missing "tracks"'),
    ({"tracks": []}, '"tracks" is empty'),
    ({"tracks": {"a": 1}}, '"tracks" must be a list'),
    ({"tracks": [[[1, 2]], []]}, "track 1 has no points"),
    ({"tracks": [[[1, "x"]]]}, "track 0 point 0 must be [x, y] numbers"),
    ({"tracks": [[[1, 2, 3]]]}, "track 0 point 0 must be [x, y] numbers"),
    ({"tracks": [[[1, True]]]}, "track 0 point 0 must be [x, y] numbers"),
    ({"tracks": [[[1, 2], [float("nan"), 3]]]}, "track 0 point 1 (nan, 3) is not finite"),
    ({"tracks": [[[1, 2], [float("inf"), 3]]]}, "is not finite"),
    ({"tracks": [[[1, 2]], [[3, 4]], [[5, 6]], [[812, 40]]]}, "track 3 point (812, 40) is outside the 512x320 image"),
    ({"tracks": [[[-0.5, 2]]]}, "track 0 point (-0.5, 2) is outside the 512x320 image"),
    ({"tracks": [[[1, 320]]]}, "outside the 512x320 image"),
    ({"tracks": [[[1, 2]]], "image_size": [400, 512]}, "made for a 512x400 image but the image is 512x320"),
    ({"tracks": [[[1, 2]]], "version": 7}, "unsupported version 7"),
    ({"tracks": [[[1, 2]]], "brushes": [{"kind": "wave", "rle": [1]}]}, "kind must be 'move' or 'static'"),
    ({"tracks": [[[1, 2]]], "brushes": [{"kind": "move"}]}, 'exactly one of "path", "circles", "rle"'),
    ({"tracks": [[[1, 2]]], "brushes": [{"rle": [5, 5]}]}, "rle covers 10 pixels"),
    ({"tracks": [[[1, 2]]], "brushes": [{"path": "/nonexistent/b.png"}]}, "does not exist"),
    ({"tracks": [{"pts": [[1, 2]]}]}, "track 0 has unknown key 'pts'"),
    ("[1, 2", "invalid JSON at line 1 column"),
]


@pytest.mark.parametrize(("data", "fragment"), BAD_CASES)
def test_bad_hints_raise_one_line_errors(data: object, fragment: str) -> None:
    with pytest.raises(MofaInputError) as info:
        HintSet.from_json(data, (320, 512))  # type: ignore[arg-type]
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_malformed_json_file_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('{\n  "tracks": [[[1, 2]],\n  oops\n}\n')
    with pytest.raises(MofaInputError) as info:
        load_hints(p, (10, 10))
    msg = str(info.value)
    assert str(p) in msg and "line 3 column 3" in msg and "\n" not in msg
    with pytest.raises(MofaInputError, match="does not exist"):
        load_hints(tmp_path / "missing.json", (10, 10))


def test_hintset_validates_programmatic_input() -> None:
    with pytest.raises(MofaInputError, match="track 0 point"):
        HintSet((10, 10), [DragHint([[10, 0]])])
    with pytest.raises(MofaInputError, match="brush 0 is 5x4"):
        HintSet((10, 10), [], [MotionBrush(np.zeros((4, 5), bool))])
    with pytest.raises(MofaInputError, match="num_frames"):
        HintSet((10, 10), [], num_frames=1)
    with pytest.raises(MofaInputError, match="image_size"):
        HintSet((0, 10))
    h = HintSet((10, 10), [[[1, 2], [3, 4]]])  # raw point lists are accepted
    assert isinstance(h.drags[0], DragHint)
    assert h.tracks().shape == (1, 25, 2) and HintSet((4, 4)).tracks(5).shape == (0, 5, 2)


def test_demo_tracks_asset_is_valid_for_astronaut() -> None:
    h = load_hints(ASSETS / "demo_tracks.json", (512, 512))
    assert h.num_frames == 25
    moving = [d for d in h.drags if not d.is_anchor]
    anchors = [d for d in h.drags if d.is_anchor]
    assert 2 <= len(moving) <= 4 and len(anchors) >= 2
    for d in moving:
        step = np.linalg.norm(d.points[-1] - d.points[0])
        assert 5 <= step <= 60  # gentle motion
