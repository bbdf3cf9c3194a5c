"""Drag hints: one trajectory drawn on the input image, resampled to one point per generated frame.

A drag is a polyline of ``K >= 1`` control points (clicks) in **input-image pixels** (x right, y down). Frame 0 of the
video sits at the first point, the last frame at the last point; intermediate frames follow a monotone cubic (PCHIP)
through the control points with evenly spaced parameters — exactly the reference app's ``interpolate_trajectory``
(spec §2.1). A single point is a *static anchor*: it asks the content under it to stay put (spec §12.19; the
reference crashed on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import PchipInterpolator

from mofa.errors import MofaInputError

__all__ = ["DragHint", "resample_polyline"]


def resample_polyline(points: np.ndarray, num_frames: int, exact_endpoints: bool = True) -> np.ndarray:
    """PCHIP-resample control points ``[K, 2]`` to ``[num_frames, 2]`` (float64, same units as the input).

    The control points get parameters ``linspace(0, 1, K)``, the output is evaluated at ``linspace(0, 1, T)``,
    separately for x and y (scipy ``PchipInterpolator``). ``K == 2`` is a straight line at constant speed; ``K == 1``
    repeats the point (static anchor).

    scipy evaluates the last sample on the last cubic piece and can land one ulp off the last control point (e.g.
    ``253.99999999999997`` for a click at 254), which the reference's integer truncation turns into a one-pixel
    error. ``exact_endpoints=True`` (default) pins the first and last outputs to the control points;
    ``False`` keeps scipy's raw values, as the reference did (used in ``reference_mode``).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 1:
        raise ValueError(f"points must have shape [K>=1, 2], got {pts.shape}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if pts.shape[0] == 1:
        return np.repeat(pts, num_frames, axis=0)
    t_ctrl = np.linspace(0.0, 1.0, pts.shape[0])
    t_out = np.linspace(0.0, 1.0, num_frames)
    out = np.empty((num_frames, 2), dtype=np.float64)
    for axis in range(2):
        out[:, axis] = PchipInterpolator(t_ctrl, pts[:, axis])(t_out)
    if exact_endpoints:
        out[-1] = pts[-1]
        out[0] = pts[0]
    return out


@dataclass(frozen=True)
class DragHint:
    """One drag trajectory.

    Args:
        points: control points ``[K, 2]`` (K >= 1), xy in pixels of the input image, frame 0 first. Stored as a
            read-only float64 array. One point = a static anchor (zero motion at that spot).
    """

    points: np.ndarray = field()

    def __post_init__(self) -> None:
        try:
            pts = np.array(self.points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise MofaInputError(f"drag points must be numbers [[x, y], ...]: {exc}") from None
        if pts.size == 0:
            raise MofaInputError("a drag needs at least one point; give [[x, y], ...] (one point = static anchor)")
        if pts.ndim == 1 and pts.shape[0] == 2:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise MofaInputError(f"drag points must be a list of [x, y] pairs (shape [K, 2]), got shape {pts.shape}")
        if not np.isfinite(pts).all():
            bad = int(np.flatnonzero(~np.isfinite(pts).all(axis=1))[0])
            raise MofaInputError(f"drag point {bad} {tuple(pts[bad].tolist())} is not finite; use real pixel values")
        pts.setflags(write=False)
        object.__setattr__(self, "points", pts)

    @classmethod
    def from_points(cls, points: Sequence[Sequence[float]] | np.ndarray) -> DragHint:
        """Build from any ``[[x, y], ...]`` sequence or array."""
        return cls(np.asarray(points, dtype=np.float64))

    @property
    def num_points(self) -> int:
        """Number of control points K."""
        return int(self.points.shape[0])

    @property
    def is_anchor(self) -> bool:
        """True for a single-point (static anchor) hint."""
        return self.num_points == 1

    def resample(self, num_frames: int, exact_endpoints: bool = True) -> np.ndarray:
        """Per-frame positions ``[num_frames, 2]`` float64 in input-image pixels (PCHIP, see
        :func:`resample_polyline`; frame 0 = first point, last frame = last point)."""
        return resample_polyline(self.points, num_frames, exact_endpoints=exact_endpoints)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DragHint) and np.array_equal(self.points, other.points)

    def __hash__(self) -> int:
        return hash(self.points.tobytes())
