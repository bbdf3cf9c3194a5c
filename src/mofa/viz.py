"""Pictures of flows and hints: the Middlebury flow colour wheel, flow videos, track and mask overlays.

All functions return new RGB uint8 arrays and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TRACK_COLORS", "color_wheel", "draw_tracks", "flow_to_color", "flow_video", "overlay_mask"]

# Distinct, saturated colours for tracks (RGB); cycled when there are more tracks.
TRACK_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),
    (64, 160, 255),
    (255, 200, 0),
    (64, 220, 96),
    (230, 80, 255),
    (0, 230, 230),
    (255, 128, 0),
    (160, 255, 64),
    (255, 96, 180),
    (140, 120, 255),
)

# Middlebury colour wheel segment lengths (Baker et al., "A Database and Evaluation Methodology for Optical Flow"):
# red→yellow, yellow→green, green→cyan, cyan→blue, blue→magenta, magenta→red.
_SEGMENTS = (("RY", 15), ("YG", 6), ("GC", 4), ("CB", 11), ("BM", 13), ("MR", 6))


def color_wheel() -> np.ndarray:
    """The 55-entry Middlebury colour wheel, float ``[55, 3]`` RGB in 0..255 (entry 0 = red, hue advancing
    red → yellow → green → cyan → blue → magenta)."""
    rows: list[np.ndarray] = []
    for name, n in _SEGMENTS:
        ramp = np.floor(255.0 * np.arange(n) / n)
        seg = np.zeros((n, 3))
        if name == "RY":
            seg[:, 0], seg[:, 1] = 255, ramp
        elif name == "YG":
            seg[:, 0], seg[:, 1] = 255 - ramp, 255
        elif name == "GC":
            seg[:, 1], seg[:, 2] = 255, ramp
        elif name == "CB":
            seg[:, 1], seg[:, 2] = 255 - ramp, 255
        elif name == "BM":
            seg[:, 2], seg[:, 0] = 255, ramp
        else:  # MR
            seg[:, 2], seg[:, 0] = 255 - ramp, 255
        rows.append(seg)
    return np.concatenate(rows, axis=0)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def flow_to_color(flow: Any, max_radius: float | None = None) -> np.ndarray:
    """Colour-code a flow ``[2, H, W]`` (pixels, channel 0 = x) with the Middlebury wheel → RGB uint8 ``[H, W, 3]``.

    Hue = direction, saturation = magnitude / ``max_radius`` (None: the largest magnitude in this flow). Zero flow is
    white; a flow of length ``max_radius`` pointing right (+x) is pure red ``(255, 0, 0)``, down (+y) yellow,
    left cyan-blue, up violet. Magnitudes beyond ``max_radius`` are drawn at 75 % brightness. Non-finite vectors are
    treated as zero.

    As in the standard code, the angle is ``atan2(-v, -u) / π``; the +x direction is pinned to entry 0 regardless of
    the sign of a zero ``v`` (the original maps ``v = -0.0`` to the last wheel entry).
    """
    arr = _as_numpy(flow).astype(np.float64)
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise ValueError(f"flow must be [2, H, W], got shape {arr.shape}")
    u = np.nan_to_num(arr[0], nan=0.0, posinf=0.0, neginf=0.0)
    v = np.nan_to_num(arr[1], nan=0.0, posinf=0.0, neginf=0.0)
    mag = np.sqrt(u * u + v * v)
    if max_radius is None:
        max_radius = float(mag.max()) if mag.size else 0.0
    scale = max(float(max_radius), 1e-8)
    rad = mag / scale
    wheel = color_wheel()
    ncols = wheel.shape[0]
    a = np.arctan2(-v, -u) / np.pi
    a = np.where(a >= 1.0, -1.0, a)
    fk = (a + 1.0) / 2.0 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    f = (fk - k0)[..., None]
    col = ((1.0 - f) * wheel[k0] + f * wheel[k1]) / 255.0
    inside = (rad <= 1.0)[..., None]
    col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)
    return np.floor(255.0 * np.clip(col, 0.0, 1.0)).astype(np.uint8)


def flow_video(flow: Any, max_radius: float | None = None) -> np.ndarray:
    """Colour frames ``[T, H, W, 3]`` uint8 for a flow ``[T-1, 2, H, W]`` (frame 0 → frame t).

    Frame 0 is white (no motion yet), like the reference app. One normalisation for the whole clip (None: the largest
    magnitude over all frames), so colours are comparable over time.
    """
    arr = _as_numpy(flow).astype(np.float32)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[1] != 2:
        raise ValueError(f"flow must be [T-1, 2, H, W], got shape {arr.shape}")
    if max_radius is None:
        finite = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        max_radius = float(np.sqrt((finite**2).sum(axis=1)).max()) if arr.size else 0.0
    _, _, h, w = arr.shape
    frames = [np.full((h, w, 3), 255, dtype=np.uint8)]
    frames += [flow_to_color(f, max_radius=max_radius) for f in arr]
    return np.stack(frames)


def _colour(i: int, colors: Sequence[tuple[int, int, int]] | None) -> tuple[int, int, int]:
    palette = colors if colors else TRACK_COLORS
    c = palette[i % len(palette)]
    return (int(c[0]), int(c[1]), int(c[2]))


def draw_tracks(
    image: Any,
    tracks: Any,
    colors: Sequence[tuple[int, int, int]] | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw trajectories on an RGB image: a polyline with an arrow head per track, a dot for 1-point anchors.

    Args:
        image: RGB uint8 ``[H, W, 3]`` (or float ``[H, W, 3]`` / ``[3, H, W]`` in [0, 1]).
        tracks: a list of ``[K, 2]`` xy pixel arrays (K >= 1), or an array ``[N, T, 2]``.
        colors: RGB colours cycled over tracks (default :data:`TRACK_COLORS`).
        thickness: line width in pixels (default scales with the image, 2 at 512 px).

    Returns:
        A new uint8 ``[H, W, 3]`` image.
    """
    import cv2

    canvas = _as_rgb_uint8(image)
    h, w = canvas.shape[:2]
    if thickness is None:
        thickness = max(1, int(round(min(h, w) / 256)))
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    one = 1 << shift
    items = list(tracks) if not isinstance(tracks, np.ndarray) or tracks.ndim == 3 else [tracks]
    for i, track in enumerate(items):
        pts = _as_numpy(track).astype(np.float64).reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) == 0:
            continue
        colour = _colour(i, colors)
        fixed = np.round(pts * one).astype(np.int32)
        radius = max(2, 2 * thickness)
        # Dark outline first so tracks stay visible on bright and dark images alike.
        if len(pts) == 1 or np.allclose(pts, pts[0]):
            centre = (int(fixed[0, 0]), int(fixed[0, 1]))
            cv2.circle(canvas, centre, (radius + 1) * one, (0, 0, 0), -1, cv2.LINE_AA, shift)
            cv2.circle(canvas, centre, radius * one, colour, -1, cv2.LINE_AA, shift)
            continue
        cv2.polylines(canvas, [fixed[:-1].reshape(-1, 1, 2)], False, (0, 0, 0), thickness + 2, cv2.LINE_AA, shift)
        cv2.polylines(canvas, [fixed[:-1].reshape(-1, 1, 2)], False, colour, thickness, cv2.LINE_AA, shift)
        start = (int(fixed[0, 0]), int(fixed[0, 1]))
        cv2.circle(canvas, start, radius * one, colour, -1, cv2.LINE_AA, shift)
        # Arrow head on the last segment with a fixed length in pixels (tipLength is relative to the segment).
        tail, tip = fixed[-2], fixed[-1]
        seg = float(np.hypot(*(pts[-1] - pts[-2])))
        tip_len = min(0.9, (6.0 + 3.0 * thickness) / max(seg, 1e-6))
        args = ((int(tail[0]), int(tail[1])), (int(tip[0]), int(tip[1])))
        cv2.arrowedLine(canvas, *args, (0, 0, 0), thickness + 2, cv2.LINE_AA, shift, tip_len)
        cv2.arrowedLine(canvas, *args, colour, thickness, cv2.LINE_AA, shift, tip_len)
    return canvas


def overlay_mask(
    image: Any, mask: Any, color: tuple[int, int, int] = (0, 200, 255), alpha: float = 0.4, outline: bool = True
) -> np.ndarray:
    """Tint the painted region of ``mask`` ``[H, W]`` (nonzero / True = painted) on an RGB image and outline it.

    Returns a new uint8 ``[H, W, 3]``; ``alpha`` is the tint opacity.
    """
    import cv2

    canvas = _as_rgb_uint8(image)
    m = _as_numpy(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    m = m > (0.5 if np.issubdtype(m.dtype, np.floating) else 0)
    if m.shape != canvas.shape[:2]:
        raise ValueError(f"mask is {m.shape} but the image is {canvas.shape[:2]} (H, W)")
    tint = np.asarray(color, dtype=np.float32)
    blended = canvas.astype(np.float32)
    blended[m] = (1.0 - alpha) * blended[m] + alpha * tint
    canvas = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline and m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in color), 1, cv2.LINE_AA)
    return canvas


def _as_rgb_uint8(image: Any) -> np.ndarray:
    arr = _as_numpy(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr.copy())
