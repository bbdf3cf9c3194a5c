"""Flow reversal: the backward flow of a forward flow, for warping one image along many flows (the preview).

Given a forward flow ``F`` (reference frame → frame t, pixels, channel 0 = x), find for every pixel ``p`` of frame t
the displacement ``D(p)`` with ``D(p) = F(p − D(p))``: frame t shows ``I_0(p − D(p))``. Start: ``F`` splatted to
where it points with importance ``exp(k·|F|)`` (softmax splatting, spec §8), so where a moving region lands on a
still one the moving (dragged) content wins. Then a few vectorised refinement steps (Newton on the bilinear flow,
propagation from neighbours) make ``D`` the exact inverse wherever one exists — stretched regions behind a large drag
stay clean. Disocclusions behind a straight object edge take the background just behind that edge.

Used by :mod:`mofa.pipelines.preview`; pure tensor code on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mofa.flow.ops import coords_grid, invert_flow, resize_flow, sample_at
from mofa.flow.softsplat import softsplat

__all__ = ["FOREGROUND_SHARPNESS", "REFINE_ITERATIONS", "importance_splat", "reverse_flow", "splat_importance"]

FOREGROUND_SHARPNESS = 1.0
"""``k`` of the splatting importance ``exp(k·|flow|)`` (per pixel of motion): a region moving 5 px more than what it
lands on outweighs it ~150:1."""

REFINE_ITERATIONS = 3
"""Refinement iterations of the flow reversal (:func:`reverse_flow`): Newton steps and propagation."""

_ROOT_TOL = 0.05  # |F(p − D) − D| in reversal-grid pixels below which D counts as an exact inverse
_USABLE_TOL = 0.5  # residual above which a pixel's D is replaced by its neighbours' (no root found)
# A cell whose flow steps by more than _STEP[0] (fully: _STEP[1]) grid pixels beyond the stretch measured over
# ±_STEP_BASELINE cells, along an edge running straight for ±_EDGE_RUN cells, is an object edge: its disocclusion is
# filled (:func:`_fill_disocclusions`).
_STEP = (2.0, 3.0)
_STEP_BASELINE = 2
_EDGE_RUN = 2
_LANDED = 1e-2  # coverage below which a pixel counts as a hole (bilinear splats leave ≥ 1 − spacing/2 elsewhere)
_MAX_EXPONENT = 60.0  # exp(-60) ≈ 1e-26: far from float32 underflow even after bilinear weights and [0, 1] values


def splat_importance(flow: torch.Tensor, sharpness: float, unit: float = 1.0) -> torch.Tensor:
    """Splatting importance ``exp(k·(|F|·unit − max))`` ``[N, 1, H, W]`` in (0, 1].

    Normalised per frame so ``exp`` never overflows; clamped so it never underflows. ``unit`` converts the flow's
    pixels to full-resolution pixels (the sharpness is per full-resolution pixel of motion).
    """
    n = flow.shape[0]
    mag = torch.hypot(flow[:, 0:1], flow[:, 1:2]) * unit
    peak = mag.flatten(1).amax(dim=1).view(n, 1, 1, 1)
    return torch.exp(torch.clamp(sharpness * (mag - peak), min=-_MAX_EXPONENT))


def importance_splat(
    values: torch.Tensor, flow: torch.Tensor, importance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax-splat ``values [N, C, H, W]`` along ``flow [N, 2, H, W]`` with ``importance [N, 1, H, W]``.

    ``[v·e, e, 1]`` go through one plain ``'sum'`` splat and are normalised here: ``'soft'`` mode's 1e-7 epsilon
    would bias pixels whose importance is tiny; the ones channel measures coverage.

    Returns:
        ``(mean [N, C, H, W], weight [N, 1, H, W], coverage [N, 1, H, W])``: the importance-weighted mean of what
        landed on each pixel (0 where no weight landed), the summed importance and the summed bilinear coverage.
    """
    c = values.shape[1]
    splat = softsplat(
        torch.cat([values * importance, importance, torch.ones_like(importance)], dim=1), flow, mode="sum"
    )
    numer, weight, coverage = splat[:, :c], splat[:, c : c + 1], splat[:, c + 1 :]
    landed = weight > 0
    mean = torch.where(landed, numer / torch.where(landed, weight, torch.ones_like(weight)), torch.zeros_like(numer))
    return mean, weight, coverage


def _fill_disocclusions(flow: torch.Tensor, backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Show the background behind a moved object's edge in the strip it uncovers, not the edge smeared across it.

    The exact inverse maps the whole strip into the one grid cell where the flow steps from the background to the
    object, i.e. it stretches a blend of both sides' colours across the strip. A cell is such a step along x (or y)
    where it expands along that axis by more than ``_STEP`` grid pixels beyond the stretch over ``±_STEP_BASELINE``
    cells — a smooth ramp, however steep, stays exact — and the step runs straight along the edge for
    ``±_EDGE_RUN`` cells: the classic densifier's edges often wander from row to row, and filling those row by row
    would shred them again, so they keep the exact (smeared) inverse. There the source moves back from the edge by
    the step, bounded to the strip: a local version of ``I_0(p − F(p))`` that never shows far-away content twice.

    Args:
        flow: ``[N, 2, h, w]`` forward flow on the grid.
        backward: ``[N, 2, h, w]`` its inverse (:func:`mofa.flow.ops.invert_flow`).

    Returns:
        ``(backward [N, 2, h, w], weight [N, 1, h, w])``: the adjusted inverse and how much of it is filled (0..1).
    """
    height, width = flow.shape[-2:]
    base = coords_grid(height, width, device=flow.device, dtype=flow.dtype)
    qx, qy = base[0] - backward[:, 0], base[1] - backward[:, 1]
    # The source's grid cell (clamped into the grid like the border-extended interpolant) and the flow on its sides.
    x0 = qx.clamp(0, width - 1).floor().clamp(max=max(width - 2, 0))
    y0 = qy.clamp(0, height - 1).floor().clamp(max=max(height - 2, 0))
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    left, right, top, bottom = (sample_at(flow, x, y) for x, y in ((x0, qy), (x1, qy), (qx, y0), (qx, y1)))
    lo, hi = _STEP
    weights = []
    for axis in (0, 1):  # per axis: how much each cell [i, i+1] expands beyond the wider stretch around it
        f = flow[:, axis : axis + 1].transpose(-1, -2) if axis else flow[:, 0:1]  # step axis last
        k = _STEP_BASELINE
        n = f.shape[-1]
        pad = F.pad(f, (k, k + 1, 0, 0), mode="replicate")  # pad[..., j] = f[..., j - k], clamped
        cell = pad[..., k + 1 : k + 1 + n] - pad[..., k : k + n]  # the step across cell [i, i+1]
        wide = (pad[..., 2 * k + 1 : 2 * k + 1 + n] - pad[..., :n]) / (2 * k + 1)  # over cells [i-k, i+1+k]
        excess = cell - wide.clamp_min(0.0)
        # Opened (min, then max) along the edge: only steps running straight for 2·_EDGE_RUN + 1 cells count.
        run, pad_run = (2 * _EDGE_RUN + 1, 1), (_EDGE_RUN, 0)
        excess = -F.max_pool2d(-excess, run, stride=1, padding=pad_run)
        excess = F.max_pool2d(excess, run, stride=1, padding=pad_run)
        excess = excess.transpose(-1, -2) if axis else excess
        weights.append(((excess - lo) / (hi - lo)).clamp(0.0, 1.0))
    weight_x = sample_at(weights[0], x0, qy)  # the cell's column, interpolated along y only
    weight_y = sample_at(weights[1], qx, y0)
    out, share = [], []
    axes = ((qx, x0, left, right, weight_x), (qy, y0, top, bottom, weight_y))
    for axis, (q, start, low_side, high_side, weight) in enumerate(axes):
        q = q.unsqueeze(1)
        cell = high_side[:, axis : axis + 1] - low_side[:, axis : axis + 1]  # expansion of the cell along the axis
        # The background is the side that moves less. A root at fraction t of the way from it across the cell is
        # moved back by (1 − t)·cell: the strip shows the background just behind the edge, shifted by the object's
        # motion — what F(p) shows for a translating object — and meets the moved object continuously at t = 1.
        low_is_background = low_side.square().sum(dim=1, keepdim=True) <= high_side.square().sum(dim=1, keepdim=True)
        direction = torch.where(low_is_background, 1.0, -1.0)
        edge = start.unsqueeze(1) + (1.0 - direction) / 2
        behind = q - direction * (1.0 - ((q - edge) * direction).clamp(0.0, 1.0)) * cell
        out.append(q + weight * (behind - q))
        share.append(weight)
    return torch.cat([base[0:1] - out[0], base[1:2] - out[1]], dim=1), torch.maximum(*share)


def _fill_holes(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``values [N, C, h, w]`` where ``known [N, 1, h, w]`` (bool), elsewhere smoothly interpolated from known pixels.

    Push-pull: average the known values down a 2× pyramid, then fill each level's gaps from the bilinearly upsampled
    coarser level. Frames with nothing known keep their ``values``.
    """
    levels = [(values * known, known.to(values.dtype))]
    while min(levels[-1][0].shape[-2:]) > 1:
        v, w = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    v, w = levels[-1]
    filled = v / w.clamp_min(1e-12)
    for v, w in reversed(levels[:-1]):
        up = F.interpolate(filled, size=v.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(w > 0, v / w.clamp_min(1e-12), up)
    return torch.where(known | ~known.flatten(1).any(dim=1).view(-1, 1, 1, 1), values, filled)


def reverse_flow(
    flow: torch.Tensor,
    sharpness: float = FOREGROUND_SHARPNESS,
    stride: int = 2,
    iterations: int = REFINE_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward flows for forward flows: splatted flow reversal (Xu et al., NeurIPS 2019) refined to the exact inverse.

    1. Start: ``B(p)`` is the importance-weighted average of ``F(x)`` over the source pixels ``x`` that land on
       ``p = x + F(x)`` (bilinear softmax splatting, spec §8, importance ``exp(k·|F|)`` so moving content wins); where
       nothing lands it is interpolated from the surrounding ``B``.
    2. Refinement: ``B(p) = F(p − B(p))`` is solved per pixel (:func:`mofa.flow.ops.invert_flow`): smooth and
       stretched flows are inverted exactly, and where the flow folds the moving content stays on top.
    3. Disocclusions behind a moved object's straight edge show the background behind that edge
       (:func:`_fill_disocclusions`).

    Why not blend towards ``F(p)`` by ``1 − coverage`` (the earlier rule): where the flow stretches, as everywhere
    behind a large drag, each source spreads over more than one pixel and bilinear coverage is a jagged fraction, so
    the blend mixed two unrelated flows pixel by pixel and shredded the frame into streaks.

    Args:
        flow: ``[N, 2, H, W]`` forward flow in image pixels, reference frame → frame t.
        sharpness: ``k`` of the importance, per pixel of motion (0 = plain averaging, no preference for moving
            content where the flow folds).
        stride: the reversal runs on a grid ``stride`` times coarser (flows are smooth; the image is still sampled
            at full resolution), which makes it ``stride²`` times cheaper. 1 = full resolution.
        iterations: refinement iterations (0 = the splatted start alone).

    Returns:
        ``(backward [N, 2, H, W], holes [N, 1, H, W])``: ``backward`` in image pixels (frame t → reference frame is
        ``-backward``); ``holes`` in [0, 1] marks what shows no moved content: filled disocclusions, and 1 where the
        source lies outside the image (an uncovered border, mirrored).
    """
    n, _, height, width = flow.shape
    f = flow.to(torch.float32)
    grid = (-(-height // stride), -(-width // stride))
    low = resize_flow(f, grid, mode="bilinear") if stride > 1 else f
    unit = 0.5 * (height / grid[0] + width / grid[1])
    mean, weight, coverage = importance_splat(low, low, splat_importance(low, sharpness, unit))
    landed = (coverage > _LANDED) & (weight > 0)
    backward = torch.where(landed, mean, low)
    backward = _fill_holes(backward, landed)
    backward, residual = invert_flow(low, backward, iterations, prefer_moving=sharpness > 0, tol=_ROOT_TOL)
    backward = _fill_holes(backward, residual < _USABLE_TOL)  # no usable root: interpolate the neighbours'

    backward, filled = _fill_disocclusions(low, backward)
    base = coords_grid(*grid, device=low.device, dtype=low.dtype)
    qx, qy = base[0] - backward[:, 0], base[1] - backward[:, 1]
    # Distance (grid pixels, capped at 1) by which the source lies beyond the outermost pixel centres.
    outside = torch.maximum(torch.maximum(-qx, qx - (grid[1] - 1)), torch.maximum(-qy, qy - (grid[0] - 1)))
    holes = torch.maximum(filled, outside.unsqueeze(1).clamp(0.0, 1.0))
    if stride > 1:
        backward = resize_flow(backward, (height, width), mode="bilinear")
        holes = F.interpolate(holes, size=(height, width), mode="bilinear", align_corners=False)
    return backward, holes
