"""Hints → sparse flow on the sparse-to-dense grid (spec §2.1, with the §12.8-11/19 fixes by default).

A sparse flow is ``flow [T-1, 2, h, w]`` + ``mask [T-1, 1, h, w]`` on a ``grid_size`` = (h, w) grid: at the grid pixel
where a track starts (frame 0), entry ``t-1`` holds the track's displacement from frame 0 to frame ``t`` in pixels of
that grid (channel 0 = x). Everywhere else both are 0.

Two behaviours behind one switch:

``reference_mode=True`` reproduces MOFA-Video-Traj bit for bit: clicks are scaled to the grid with ``int(x·w/W)``
truncation *before* the PCHIP resampling, displacements are truncated toward zero (``np.int64``), tracks sharing a
start pixel add their flows and mask counts (mask values 2+), tensors are float64.

Default: sub-pixel float32 flow of the exactly scaled tracks, start pixel = floor of the scaled start (clamped into the
grid), tracks sharing a start pixel are averaged, mask is {0, 1}, last PCHIP sample pinned to the last click.

Both modes: 1-point drags are zero-flow anchors (the reference crashed on them); a *static* brush adds zero-flow
anchors on a lattice inside its region; a *move* brush splits tracks by whether their start pixel is inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mofa.errors import MofaInputError
from mofa.flow.ops import S2D_GRID
from mofa.hints.brush import MotionBrush
from mofa.hints.drag import resample_polyline
from mofa.hints.schema import HintSet

__all__ = [
    "SparseFlow",
    "grid_tracks",
    "hints_to_sparse_flow",
    "static_anchor_points",
    "tracks_to_sparse_flow",
]

STATIC_ANCHOR_STRIDE = 16
"""Spacing (grid pixels) of the zero-flow anchor lattice placed inside static brushes."""


@dataclass
class SparseFlow:
    """Sparse flow on the S2D grid, plus the motion-brush split.

    Attributes:
        flow: ``[T-1, 2, h, w]`` all tracks (drags + static anchors); entry ``t-1`` = frame 0 → frame t, grid pixels.
        mask: ``[T-1, 1, h, w]`` hint positions ({0, 1}; counts in reference mode).
        inside / outside: ``(flow, mask)`` of the tracks whose start pixel is inside / outside the move brush;
            None when there is no move brush or that side has no tracks.
        move_mask: ``[1, h, w]`` float32 move-brush union on the grid (reference mode: the bilinear 0..1 mask used as
            the soft multiplier), or None.
        static_mask: ``[1, h, w]`` float32 {0, 1} static-brush union (nearest resize), or None.
        grid_size: (h, w).
        tracks: ``[N, T, 2]`` float64 grid tracks in rasterisation order (drags first, then static anchors).
        track_inside: ``[N]`` bool, start inside the move brush (None without a move brush).
        reference_mode: which behaviour produced this.
    """

    flow: torch.Tensor
    mask: torch.Tensor
    inside: tuple[torch.Tensor, torch.Tensor] | None = None
    outside: tuple[torch.Tensor, torch.Tensor] | None = None
    move_mask: torch.Tensor | None = None
    static_mask: torch.Tensor | None = None
    grid_size: tuple[int, int] = S2D_GRID
    tracks: torch.Tensor | None = None
    track_inside: torch.Tensor | None = None
    reference_mode: bool = False

    @property
    def num_frames(self) -> int:
        """T, including frame 0."""
        return int(self.flow.shape[0]) + 1


def _start_pixels(start: torch.Tensor, grid_size: tuple[int, int], reference_mode: bool) -> tuple[torch.Tensor, ...]:
    """Integer (row, col) of start points ``[N, 2]`` xy: truncation (reference, must be inside) or clamped floor."""
    h, w = grid_size
    if reference_mode:
        col = torch.trunc(start[:, 0]).long()
        row = torch.trunc(start[:, 1]).long()
        bad = (col < 0) | (col >= w) | (row < 0) | (row >= h)
        if bad.any():
            i = int(torch.nonzero(bad)[0, 0])
            x, y = start[i].tolist()
            raise MofaInputError(
                f"track {i} starts at ({x:g}, {y:g}), outside the {w}x{h} grid; start inside the image"
            )
        return row, col
    col = torch.floor(start[:, 0]).long().clamp(0, w - 1)
    row = torch.floor(start[:, 1]).long().clamp(0, h - 1)
    return row, col


def tracks_to_sparse_flow(
    tracks: torch.Tensor | np.ndarray, grid_size: tuple[int, int], reference_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise tracks ``[N, T, 2]`` (xy, pixels of the grid, frame 0 first) into a sparse flow.

    Args:
        tracks: per-frame positions on the ``grid_size`` grid; ``N`` may be 0 (all-zero result).
        grid_size: (h, w).
        reference_mode: spec §2.1 numerics (truncated start pixel and displacement, summed overlaps, float64);
            default: sub-pixel float32 flow, averaged overlaps, mask in {0, 1}.

    Returns:
        ``flow [T-1, 2, h, w]`` and ``mask [T-1, 1, h, w]``; float64 in reference mode, float32 otherwise; on the
        device of ``tracks``.
    """
    tr = torch.as_tensor(tracks).to(torch.float64)
    if tr.ndim != 3 or tr.shape[-1] != 2 or tr.shape[1] < 2:
        raise ValueError(f"tracks must have shape [N, T>=2, 2], got {tuple(tr.shape)}")
    n, t, _ = tr.shape
    h, w = int(grid_size[0]), int(grid_size[1])
    out_dtype = torch.float64 if reference_mode else torch.float32
    if n == 0:
        zeros = torch.zeros(t - 1, 2, h, w, dtype=out_dtype, device=tr.device)
        return zeros, torch.zeros(t - 1, 1, h, w, dtype=out_dtype, device=tr.device)
    start = tr[:, 0]
    disp = tr[:, 1:] - start[:, None]  # [N, T-1, 2]
    if reference_mode:
        disp = torch.trunc(disp)  # np.int64(end - start)
    row, col = _start_pixels(start, (h, w), reference_mode)
    index = row * w + col  # [N]
    # Accumulate per distinct start pixel, then scatter once into the (large) output tensors.
    pixels, inverse = torch.unique(index, return_inverse=True)
    sums = torch.zeros(t - 1, 2, len(pixels), dtype=torch.float64, device=tr.device)
    sums.index_add_(2, inverse, disp.permute(1, 2, 0))
    count = torch.zeros(len(pixels), dtype=torch.float64, device=tr.device)
    count.index_add_(0, inverse, torch.ones(n, dtype=torch.float64, device=tr.device))
    if reference_mode:
        values, marks = sums, count  # summed flows, mask counts (spec §2.1)
    else:
        values, marks = sums / count, torch.ones_like(count)  # averaged, mask clamped to 1 (spec §12.11 fix)
    flow = torch.zeros(t - 1, 2, h * w, dtype=out_dtype, device=tr.device)
    flow[:, :, pixels] = values.to(out_dtype)
    mask = torch.zeros(t - 1, 1, h * w, dtype=out_dtype, device=tr.device)
    mask[:, 0, pixels] = marks.to(out_dtype)
    return flow.reshape(t - 1, 2, h, w), mask.reshape(t - 1, 1, h, w)


def grid_tracks(hints: HintSet, grid_size: tuple[int, int], reference_mode: bool = False) -> np.ndarray:
    """The drags of ``hints`` resampled to ``hints.num_frames`` on the grid: ``[N, T, 2]`` float64 grid pixels.

    Reference mode scales each click with ``int(x·w/W)``, ``int(y·h/H)`` first and then runs PCHIP on the integer
    grid points with scipy's raw endpoint; default scales exactly (``x·w/W``) and pins both endpoints.
    """
    img_h, img_w = hints.image_size
    h, w = grid_size
    out = []
    for drag in hints.drags:
        pts = drag.points
        scaled = np.stack([pts[:, 0] * w / img_w, pts[:, 1] * h / img_h], axis=-1)
        if reference_mode:
            scaled = np.trunc(scaled)  # Python int() on non-negative values
        out.append(resample_polyline(scaled, hints.num_frames, exact_endpoints=not reference_mode))
    if not out:
        return np.zeros((0, hints.num_frames, 2), dtype=np.float64)
    return np.stack(out)


def static_anchor_points(
    static_mask: torch.Tensor, full_mask: np.ndarray | None = None, stride: int = STATIC_ANCHOR_STRIDE
) -> np.ndarray:
    """Zero-flow anchor positions ``[M, 2]`` (xy grid pixels) inside a static mask ``[h, w]`` on the grid.

    A lattice with spacing ``stride`` offset by ``stride // 2``; a region smaller than the lattice still gets one
    anchor (the painted grid pixel nearest to the region's centroid). ``full_mask`` (input-image grid) is used only
    when the region vanished in the resize, to place that single anchor.
    """
    m = static_mask.detach().cpu().numpy() > 0.5
    h, w = m.shape
    off = stride // 2
    ys, xs = np.meshgrid(np.arange(off, h, stride), np.arange(off, w, stride), indexing="ij")
    keep = m[ys, xs]
    pts = np.stack([xs[keep], ys[keep]], axis=-1).astype(np.float64)
    if len(pts):
        return pts
    if m.any():
        ry, rx = np.nonzero(m)
    elif full_mask is not None and full_mask.any():
        fy, fx = np.nonzero(full_mask)
        ry = np.minimum((fy * h) // full_mask.shape[0], h - 1)
        rx = np.minimum((fx * w) // full_mask.shape[1], w - 1)
    else:
        return np.zeros((0, 2), dtype=np.float64)
    cy, cx = ry.mean(), rx.mean()
    k = int(np.argmin((ry - cy) ** 2 + (rx - cx) ** 2))
    return np.array([[rx[k], ry[k]]], dtype=np.float64)


def hints_to_sparse_flow(
    hints: HintSet, grid_size: tuple[int, int] = S2D_GRID, reference_mode: bool = False
) -> SparseFlow:
    """Turn a :class:`~mofa.hints.HintSet` into a :class:`SparseFlow` on ``grid_size`` (default the CMP 384² grid).

    Steps: drags → grid tracks (:func:`grid_tracks`); static brushes → zero-flow anchors on a lattice (skipped where a
    drag already starts); move brush → split of all tracks by start pixel (reference: the bilinear-resized 0..255
    brush ``== 255`` at ``[int(y0), int(x0)]``; default: nearest-resized brush at the floor pixel); each group
    rasterised with :func:`tracks_to_sparse_flow`. See the module docstring for the two modes.
    """
    grid_size = (int(grid_size[0]), int(grid_size[1]))
    h, w = grid_size
    t = hints.num_frames
    tracks = grid_tracks(hints, grid_size, reference_mode)

    static_full = hints.union_mask("static")
    static_mask = None
    if static_full is not None:
        static_grid = MotionBrush(static_full, kind="static").resized(grid_size)
        static_mask = static_grid[None]
        anchors = static_anchor_points(static_grid, static_full)
        if len(tracks) and len(anchors):
            taken = {(int(y), int(x)) for x, y in _pixels(tracks[:, 0], grid_size)}
            anchors = np.array([p for p in anchors if (int(p[1]), int(p[0])) not in taken]).reshape(-1, 2)
        if len(anchors):
            tracks = np.concatenate([tracks, np.repeat(anchors[:, None], t, axis=1)], axis=0)

    tracks_t = torch.from_numpy(np.ascontiguousarray(tracks))
    flow, mask = tracks_to_sparse_flow(tracks_t, grid_size, reference_mode)
    result = SparseFlow(
        flow=flow,
        mask=mask,
        static_mask=static_mask,
        grid_size=grid_size,
        tracks=tracks_t,
        reference_mode=reference_mode,
    )

    move_full = hints.union_mask("move")
    if move_full is not None:
        move_grid = MotionBrush(move_full, kind="move").resized(grid_size, reference_mode=reference_mode)
        result.move_mask = move_grid[None]
        if len(tracks):
            pix = _pixels(tracks[:, 0], grid_size)
            values = move_grid.numpy()[pix[:, 1], pix[:, 0]]
            inside = values == 1.0 if reference_mode else values > 0.5
        else:
            inside = np.zeros(0, dtype=bool)
        result.track_inside = torch.from_numpy(inside)
        for name, sel in (("inside", inside), ("outside", ~inside)):
            if sel.any():
                setattr(
                    result, name, tracks_to_sparse_flow(tracks_t[torch.from_numpy(sel)], grid_size, reference_mode)
                )
    assert result.flow.shape == (t - 1, 2, h, w)
    return result


def _pixels(points: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Start pixels ``[N, 2]`` (col, row) of grid points ``[N, 2]``; same rule in both modes for in-image points
    (truncation == floor for non-negative values), clamped into the grid."""
    h, w = grid_size
    col = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, w - 1)
    row = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, h - 1)
    return np.stack([col, row], axis=-1)
