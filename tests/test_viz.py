"""mofa.viz: Middlebury colour wheel known answers, a slow per-pixel reference, flow videos, overlays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mofa.viz import color_wheel, draw_tracks, flow_to_color, flow_video, overlay_mask


def _one(u: float, v: float, max_radius: float = 1.0) -> tuple[int, ...]:
    return tuple(int(c) for c in flow_to_color(np.array([u, v], float).reshape(2, 1, 1), max_radius=max_radius)[0, 0])


def test_color_wheel_layout() -> None:
    wheel = color_wheel()
    assert wheel.shape == (55, 3)
    np.testing.assert_array_equal(wheel[0], [255, 0, 0])  # red
    np.testing.assert_array_equal(wheel[15], [255, 255, 0])  # yellow starts YG
    np.testing.assert_array_equal(wheel[21], [0, 255, 0])  # green starts GC
    np.testing.assert_array_equal(wheel[25], [0, 255, 255])  # cyan starts CB
    np.testing.assert_array_equal(wheel[36], [0, 0, 255])  # blue starts BM
    np.testing.assert_array_equal(wheel[49], [255, 0, 255])  # magenta starts MR


def test_flow_to_color_known_answers() -> None:
    assert _one(0.0, 0.0) == (255, 255, 255)  # no motion = white
    assert _one(1.0, 0.0) == (255, 0, 0)  # +x at full radius = pure red
    assert _one(1.0, -0.0) == (255, 0, 0)  # the sign of a zero v does not matter
    assert _one(0.0, 1.0) == (255, 229, 0)  # +y (down): between wheel entries 13 and 14 (yellow)
    assert _one(-1.0, 0.0) == (0, 209, 255)  # -x: wheel entry 27 (cyan-blue)
    assert _one(0.5, 0.0) == (255, 127, 127)  # half radius: halfway to white, floor(255 · 0.5)
    assert _one(2.0, 0.0) == (191, 0, 0)  # beyond max radius: 75 % brightness


def _slow_flow_to_color(u: float, v: float, max_radius: float) -> tuple[int, int, int]:
    """Per-pixel reference written from the Middlebury description (angle → wheel position → blend → saturation)."""
    wheel = color_wheel()
    n = len(wheel)
    rad = math.hypot(u, v) / max_radius
    a = math.atan2(-v, -u) / math.pi
    if a >= 1.0:
        a = -1.0
    fk = (a + 1) / 2 * (n - 1)
    k0 = int(math.floor(fk))
    k1 = (k0 + 1) % n
    f = fk - k0
    out = []
    for c in range(3):
        col = ((1 - f) * wheel[k0, c] + f * wheel[k1, c]) / 255
        col = 1 - rad * (1 - col) if rad <= 1 else col * 0.75
        out.append(int(math.floor(255 * col)))
    return tuple(out)  # type: ignore[return-value]


def test_flow_to_color_matches_slow_reference() -> None:
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(2, 6, 7)) * 5
    out = flow_to_color(flow, max_radius=8.0)
    for y in range(6):
        for x in range(7):
            expected = _slow_flow_to_color(flow[0, y, x], flow[1, y, x], 8.0)
            assert np.abs(out[y, x].astype(int) - np.array(expected)).max() <= 1, (y, x)


def test_flow_to_color_default_normalisation_and_tensor_input() -> None:
    flow = torch.zeros(2, 3, 3)
    flow[0, 1, 1] = 7.0
    out = flow_to_color(flow)
    assert tuple(out[1, 1]) == (255, 0, 0)  # the largest vector sets the radius
    assert (out[0, 0] == 255).all()


def test_flow_video_white_first_frame_and_common_scale() -> None:
    flow = torch.zeros(3, 2, 4, 5)
    flow[0, 0] = 1.0
    flow[2, 0] = 2.0
    frames = flow_video(flow)
    assert frames.shape == (4, 4, 5, 3) and frames.dtype == np.uint8
    assert (frames[0] == 255).all()
    assert tuple(frames[3, 0, 0]) == (255, 0, 0)  # the largest motion over the clip is saturated
    assert tuple(frames[1, 0, 0]) == (255, 127, 127)  # half of it, in the same scale
    assert (frames[2] == 255).all()


def test_draw_tracks_draws_colours_and_keeps_input() -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    before = image.copy()
    out = draw_tracks(image, [np.array([[10.0, 10.0], [40.0, 10.0], [60.0, 40.0]]), np.array([[80.0, 50.0]])])
    np.testing.assert_array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != before).any(axis=-1)
    assert changed[10, 25]  # on the first segment
    assert changed[50, 80]  # the anchor dot
    assert not changed[55, 10]  # far from everything
    # Distinct colours: the track line and the anchor dot are drawn in different colours.
    assert not np.array_equal(out[10, 25], out[50, 80])


def test_draw_tracks_accepts_array_of_tracks() -> None:
    tracks = np.array([[[5.0, 5.0], [20.0, 5.0]], [[5.0, 20.0], [20.0, 20.0]]])
    out = draw_tracks(np.zeros((32, 32, 3), np.uint8), tracks)
    assert (out[5, 12] > 0).any() and (out[20, 12] > 0).any()


def test_overlay_mask() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    out = overlay_mask(image, mask, color=(200, 100, 0), alpha=0.5, outline=False)
    assert tuple(out[5, 5]) == (100, 50, 0)
    assert tuple(out[0, 0]) == (0, 0, 0)
    with pytest.raises(ValueError):
        overlay_mask(image, np.zeros((3, 3), bool))
