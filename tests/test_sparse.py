"""Sparse flow rasterisation: reference numerics (spec §2.1) by hand, default sub-pixel mode, anchors, brush split."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import PchipInterpolator

from mofa.errors import MofaInputError
from mofa.flow.sparse import grid_tracks, hints_to_sparse_flow, static_anchor_points, tracks_to_sparse_flow
from mofa.hints import DragHint, HintSet, MotionBrush

IMAGE = (320, 512)  # H, W
GRID = (384, 384)

# Track A: clicks (101, 51) -> (203, 93) on a 512x320 image.
#   Reference scaling int(x*384/512), int(y*384/320): (75.75, 61.2) -> (75, 61); (152.25, 111.6) -> (152, 111).
#   Two clicks => PCHIP is linear; T=5 samples at t = 0, .25, .5, .75, 1:
#   x: 75, 94.25, 113.5, 132.75, 152 -> int64(end - start) = 19, 38, 57, 77
#   y: 61, 73.5, 86, 98.5, 111       -> 12, 25, 37, 50
TRACK_A = [[101, 51], [203, 93]]
A_REF = {"pixel": (61, 75), "dx": [19, 38, 57, 77], "dy": [12, 25, 37, 50]}
# Track B: clicks (400, 300) -> (391, 251): (300, 360) -> (293.25 -> 293, 301.2 -> 301).
#   dx = -7t: -1.75, -3.5, -5.25, -7 -> truncation toward zero: -1, -3, -5, -7 (floor would give -2, -4, -6, -7)
#   dy = -59t: -14.75, -29.5, -44.25, -59 -> -14, -29, -44, -59
TRACK_B = [[400, 300], [391, 251]]
B_REF = {"pixel": (360, 300), "dx": [-1, -3, -5, -7], "dy": [-14, -29, -44, -59]}
# Track C shares A's start pixel: clicks (100, 51) -> (100, 31): (75.0 -> 75, 61.2 -> 61) -> (75, 37.2 -> 37).
#   dx = 0; dy = -24t: -6, -12, -18, -24 (exact)
TRACK_C = [[100, 51], [100, 31]]


def _hints(*tracks: list, brushes: list | None = None, num_frames: int = 5) -> HintSet:
    return HintSet(IMAGE, [DragHint(t) for t in tracks], brushes or [], num_frames=num_frames)


def test_reference_mode_matches_hand_computed_values() -> None:
    sf = hints_to_sparse_flow(_hints(TRACK_A, TRACK_B), GRID, reference_mode=True)
    assert sf.flow.shape == (4, 2, 384, 384) and sf.mask.shape == (4, 1, 384, 384)
    assert sf.flow.dtype == torch.float64 and sf.mask.dtype == torch.float64
    expected = torch.zeros(4, 2, 384, 384, dtype=torch.float64)
    expected_mask = torch.zeros(4, 1, 384, 384, dtype=torch.float64)
    for ref in (A_REF, B_REF):
        r, c = ref["pixel"]
        expected[:, 0, r, c] = torch.tensor(ref["dx"], dtype=torch.float64)
        expected[:, 1, r, c] = torch.tensor(ref["dy"], dtype=torch.float64)
        expected_mask[:, 0, r, c] = 1.0
    assert torch.equal(sf.flow, expected)
    assert torch.equal(sf.mask, expected_mask)
    assert sf.inside is None and sf.outside is None and sf.move_mask is None and sf.static_mask is None


def test_reference_mode_sums_overlapping_starts() -> None:
    sf = hints_to_sparse_flow(_hints(TRACK_A, TRACK_C), GRID, reference_mode=True)
    r, c = A_REF["pixel"]
    assert sf.mask[:, 0, r, c].tolist() == [2.0, 2.0, 2.0, 2.0]
    assert sf.flow[:, 0, r, c].tolist() == [19.0, 38.0, 57.0, 77.0]  # + 0
    assert sf.flow[:, 1, r, c].tolist() == [12.0 - 6, 25.0 - 12, 37.0 - 18, 50.0 - 24]
    assert sf.mask.sum() == 8 and (sf.flow != 0).sum() == 8


def test_reference_mode_scales_before_pchip() -> None:
    # Three clicks: the reference truncates each click to the grid and only then interpolates.
    clicks = np.array([[101.0, 51.0], [150.0, 120.0], [203.0, 93.0]])
    got = grid_tracks(_hints(clicks.tolist(), num_frames=7), GRID, reference_mode=True)[0]
    scaled = np.array([[int(x * 384 / 512), int(y * 384 / 320)] for x, y in clicks], dtype=np.float64)
    t = np.linspace(0, 1, 3)
    want = np.stack([PchipInterpolator(t, scaled[:, a])(np.linspace(0, 1, 7)) for a in range(2)], axis=-1)
    assert np.array_equal(got, want)  # bit for bit, scipy's raw endpoint included


def test_default_mode_subpixel_values_and_averaging() -> None:
    sf = hints_to_sparse_flow(_hints(TRACK_A, TRACK_C), GRID)
    assert sf.flow.dtype == torch.float32 and sf.mask.dtype == torch.float32
    r, c = 61, 75  # floor of the exact starts (75.75, 61.2) and (75.0, 61.2)
    t = torch.tensor([0.25, 0.5, 0.75, 1.0])
    # exact displacements: A = (76.5 t, 50.4 t), C = (0, -24 t); averaged, not summed
    torch.testing.assert_close(sf.flow[:, 0, r, c], 38.25 * t)
    torch.testing.assert_close(sf.flow[:, 1, r, c], 13.2 * t)
    assert sf.mask[:, 0, r, c].tolist() == [1.0] * 4 and sf.mask.sum() == 4
    # track B alone: sub-pixel flow is kept (the reference truncates it to -1, -3, -5, -7)
    sb = hints_to_sparse_flow(_hints(TRACK_B), GRID)
    torch.testing.assert_close(sb.flow[:, 0, 360, 300], -6.75 * t)  # (391 - 400) * 0.75
    torch.testing.assert_close(sb.flow[:, 1, 360, 300], -58.8 * t)  # (251 - 300) * 1.2


def test_one_point_tracks_are_zero_flow_anchors_in_both_modes() -> None:
    for ref in (False, True):
        sf = hints_to_sparse_flow(_hints([[256, 160]], TRACK_B), GRID, reference_mode=ref)
        assert sf.mask[:, 0, 192, 192].tolist() == [1.0] * 4
        assert (sf.flow[:, :, 192, 192] == 0).all()
        assert sf.mask.sum() == 8


def test_tracks_to_sparse_flow_empty_and_out_of_grid() -> None:
    flow, mask = tracks_to_sparse_flow(np.zeros((0, 3, 2)), (4, 5))
    assert flow.shape == (2, 2, 4, 5) and not flow.any() and not mask.any()
    with pytest.raises(MofaInputError, match="outside the 5x4 grid"):
        tracks_to_sparse_flow(np.full((1, 3, 2), 7.0), (4, 5), reference_mode=True)
    flow, mask = tracks_to_sparse_flow(np.full((1, 3, 2), 7.0), (4, 5))  # default clamps into the grid
    assert mask[0, 0, 3, 4] == 1
    with pytest.raises(ValueError, match="shape"):
        tracks_to_sparse_flow(np.zeros((1, 1, 2)), (4, 5))


def _square_brush(size: tuple[int, int], rows: slice, cols: slice, kind: str = "move") -> MotionBrush:
    m = np.zeros(size, bool)
    m[rows, cols] = True
    return MotionBrush(m, kind=kind)  # type: ignore[arg-type]


def test_brush_split_reference_uses_bilinear_255_test() -> None:
    size, grid = (64, 64), (48, 48)
    brush = _square_brush(size, slice(10, 30), slice(10, 30))
    canvas = brush.mask.astype(np.uint8) * 255
    soft = cv2.resize(canvas, (48, 48))  # reference: INTER_LINEAR by accident
    near = brush.resized(grid).numpy()
    rows, cols = np.nonzero((soft > 0) & (soft < 255) & (near == 1))
    edge = (int(cols[0]), int(rows[0]))  # painted after nearest resize, but < 255 after the bilinear one
    full = np.argwhere(soft == 255)[0]
    out = (0, 0)
    # grid -> image coordinates that truncate back to the chosen grid pixels
    to_img = lambda gx, gy: [gx * 64 / 48 + 0.01, gy * 64 / 48 + 0.01]  # noqa: E731
    hints = HintSet(
        size,
        [
            DragHint([to_img(full[1], full[0]), [40, 40]]),
            DragHint([to_img(*edge), [40, 40]]),
            DragHint([to_img(*out), [5, 5]]),
        ],
        [brush],
        num_frames=3,
    )
    ref = hints_to_sparse_flow(hints, grid, reference_mode=True)
    assert ref.track_inside.tolist() == [True, False, False]
    assert torch.equal(ref.move_mask[0], torch.from_numpy(soft.astype(np.float32) / 255))
    default = hints_to_sparse_flow(hints, grid)
    assert default.track_inside.tolist() == [True, True, False]
    # the split parts rasterise exactly their tracks, and together they make the full flow
    in_flow, in_mask = ref.inside
    out_flow, out_mask = ref.outside
    assert in_mask.sum() == 2 and out_mask.sum() == 4
    assert torch.equal(in_flow + out_flow, ref.flow) and torch.equal(in_mask + out_mask, ref.mask)


def test_brush_split_none_side_when_empty() -> None:
    brush = _square_brush(IMAGE, slice(0, 10), slice(0, 10))
    sf = hints_to_sparse_flow(_hints(TRACK_A, brushes=[brush]), GRID)
    assert sf.inside is None and sf.outside is not None and sf.track_inside.tolist() == [False]


def test_static_brush_adds_zero_flow_anchor_lattice() -> None:
    static = _square_brush(IMAGE, slice(0, 160), slice(256, 512), kind="static")  # top-right quarter
    sf = hints_to_sparse_flow(_hints(TRACK_A, brushes=[static]), GRID)
    assert sf.static_mask.shape == (1, 384, 384)
    # lattice stride 16 offset 8 inside rows [0, 192), cols [192, 384): 12 x 12 anchors
    anchors = sf.mask[0, 0].clone()
    anchors[61, 75] = 0  # track A
    rows, cols = torch.nonzero(anchors, as_tuple=True)
    assert len(rows) == 144
    assert set(rows.tolist()) == set(range(8, 192, 16)) and set(cols.tolist()) == set(range(200, 384, 16))
    assert (sf.flow[:, :, rows, cols] == 0).all()
    assert sf.tracks.shape == (145, 5, 2)


def test_tiny_static_region_still_gets_one_anchor() -> None:
    m = torch.zeros(40, 40)
    m[3:6, 20:23] = 1
    pts = static_anchor_points(m)
    assert pts.tolist() == [[21.0, 4.0]]
    full = np.zeros((400, 400), bool)
    full[100, 200] = True  # vanishes at 40x40 with nearest; placed from the full-resolution mask
    assert static_anchor_points(torch.zeros(40, 40), full).tolist() == [[20.0, 10.0]]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(16, 200),
    st.integers(16, 200),
    st.lists(
        st.lists(st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)), min_size=1, max_size=4), min_size=1, max_size=4
    ),
    st.integers(2, 9),
    st.sampled_from([(32, 32), (48, 40), (97, 131)]),
)
def test_property_default_flow_at_start_pixel_is_scaled_displacement(
    height: int, width: int, rel_tracks: list, num_frames: int, grid: tuple[int, int]
) -> None:
    tracks = [[[u * width, v * height] for u, v in tr] for tr in rel_tracks]
    hints = HintSet((height, width), [DragHint(t) for t in tracks], num_frames=num_frames)
    sf = hints_to_sparse_flow(hints, grid)
    gh, gw = grid
    starts = {}
    for tr in tracks:
        pts = np.array(tr) * np.array([gw / width, gh / height])
        if len(pts) == 1:
            pos = np.repeat(pts, num_frames, axis=0)
        else:
            tk = np.linspace(0, 1, len(pts))
            pos = np.stack([PchipInterpolator(tk, pts[:, a])(np.linspace(0, 1, num_frames)) for a in range(2)], -1)
            pos[-1] = pts[-1]
        key = (int(np.floor(pts[0, 1])), int(np.floor(pts[0, 0])))
        starts.setdefault(key, []).append(pos[1:] - pts[0])
    for (r, c), disps in starts.items():
        want = torch.from_numpy(np.mean(disps, axis=0).T.astype(np.float32))  # [2, T-1]
        torch.testing.assert_close(sf.flow[:, :, r, c].T, want, atol=1e-3, rtol=1e-5)
        assert (sf.mask[:, 0, r, c] == 1).all()
    assert int(sf.mask[0].sum()) == len(starts)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 511), st.integers(0, 319)), min_size=1, max_size=4), min_size=1),
    st.integers(2, 12),
)
def test_property_reference_mask_counts_and_integer_flow(tracks: list, num_frames: int) -> None:
    small = (60, 90)
    sf = hints_to_sparse_flow(_hints(*[list(map(list, t)) for t in tracks], num_frames=num_frames), small, True)
    assert sf.mask.sum() == len(tracks) * (num_frames - 1)
    assert torch.equal(sf.flow, torch.trunc(sf.flow))
    # independent: sum of truncated displacements of every track lands in the flow total
    grid = grid_tracks(_hints(*[list(map(list, t)) for t in tracks], num_frames=num_frames), small, True)
    total = np.trunc(grid[:, 1:] - grid[:, :1]).sum(axis=0)  # [T-1, 2]
    np.testing.assert_array_equal(sf.flow.sum(dim=(-1, -2)).numpy(), total)


def _reference_literal(clicks: list, image: tuple[int, int], grid: tuple[int, int], n: int) -> tuple:
    """Spec §2.1 written out literally with Python ints and per-track numpy arrays (slow, independent)."""
    img_h, img_w = image
    gh, gw = grid
    interp = []
    for track in clicks:
        pts = [(int(x * gw / img_w), int(y * gh / img_h)) for x, y in track]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        t = np.linspace(0, 1, len(pts))
        tn = np.linspace(0, 1, n)
        interp.append(np.stack([PchipInterpolator(t, xs)(tn), PchipInterpolator(t, ys)(tn)], axis=-1))
    s_flow = np.zeros((len(clicks), n - 1, gh, gw, 2))
    mask = np.zeros((len(clicks), n - 1, gh, gw))
    for k, pts in enumerate(interp):
        start = pts[0]
        for i, end in enumerate(pts[1:]):
            s_flow[k, i, int(start[1]), int(start[0])] = np.int64(end - start)
            mask[k, i, int(start[1]), int(start[0])] = 1
    return s_flow.sum(0), mask.sum(0)


def test_reference_mode_equals_literal_transcription_on_random_tracks() -> None:
    rng = np.random.default_rng(3)
    image, grid, n = (320, 512), (96, 80), 25
    clicks = [rng.integers(0, [512, 320], size=(int(rng.integers(2, 6)), 2)).tolist() for _ in range(12)]
    clicks.append(clicks[0][:1] + [[511, 319]])  # shared start pixel
    want_flow, want_mask = _reference_literal(clicks, image, grid, n)
    sf = hints_to_sparse_flow(HintSet(image, clicks, num_frames=n), grid, reference_mode=True)
    assert torch.equal(sf.flow, torch.from_numpy(want_flow).permute(0, 3, 1, 2))
    assert torch.equal(sf.mask, torch.from_numpy(want_mask)[:, None])
