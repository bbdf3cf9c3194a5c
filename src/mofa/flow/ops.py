"""Leaf tensor operations on flows, masks and coordinates — the one place where grids are converted.

Conventions used across mofa:

- A flow is ``[..., 2, H, W]`` in **pixels of the grid it lives on**, channel 0 = x (right), channel 1 = y (down),
  always "from the reference frame (frame 0) to frame t".
- Pixel centres sit at integer coordinates: pixel ``(x, y)`` covers ``[x - 0.5, x + 0.5)``.
- Points are ``[..., 2]`` xy in pixels. Sizes are ``(height, width)``.
- Three grids appear in the product: the input image (``H×W``, multiples of 64 for diffusion), the sparse-to-dense grid
  (``S2D_GRID`` = 384×384 for the released CMP) and the latent grid (``H/8×W/8``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

S2D_GRID: tuple[int, int] = (384, 384)
"""Grid of the released CMP sparse-to-dense network (height, width)."""


def scale_points(points: torch.Tensor, src_size: tuple[int, int], dst_size: tuple[int, int]) -> torch.Tensor:
    """Map xy pixel points ``[..., 2]`` from a ``src_size`` (H, W) grid to a ``dst_size`` (h, w) grid.

    x is multiplied by ``w / W`` and y by ``h / H`` — the reference's ``x·384/W`` rule, kept in floating point.
    """
    sx = dst_size[1] / src_size[1]
    sy = dst_size[0] / src_size[0]
    scale = torch.tensor([sx, sy], dtype=points.dtype if points.is_floating_point() else torch.float64)
    return points.to(scale.dtype) * scale.to(points.device)


def resize_flow(flow: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize a flow ``[..., 2, H, W]`` to ``size`` = (h, w) and rescale its vectors to the new grid's pixels.

    Args:
        flow: flow in pixels of the source grid.
        size: target (height, width).
        mode: ``"nearest"`` (the reference's choice for 384 → H×W, spec §2.1) or ``"bilinear"`` (align_corners=False).

    Returns:
        ``[..., 2, h, w]`` flow whose x channel is scaled by ``w / W`` and y channel by ``h / H``.
    """
    *lead, two, height, width = flow.shape
    if two != 2:
        raise ValueError(f"flow must have 2 channels in dim -3, got shape {tuple(flow.shape)}")
    if (height, width) == tuple(size):
        return flow
    flat = flow.reshape(-1, 2, height, width)
    if mode == "nearest":
        out = F.interpolate(flat, size=size, mode="nearest")
    elif mode == "bilinear":
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"unknown flow resize mode {mode!r}; use 'nearest' or 'bilinear'")
    scale = torch.tensor([size[1] / width, size[0] / height], dtype=out.dtype, device=out.device)
    out = out * scale.view(1, 2, 1, 1)
    return out.reshape(*lead, 2, size[0], size[1])


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize a float mask ``[..., C, H, W]`` to ``size`` = (h, w) with ``"nearest"`` or ``"bilinear"`` interpolation.

    Nearest keeps a {0, 1} mask binary (the fixed behaviour); bilinear reproduces the reference's accidental
    ``cv2.resize`` default (spec §12.8) and yields fractional values on edges.
    """
    *lead, channels, height, width = mask.shape
    if (height, width) == tuple(size):
        return mask
    flat = mask.reshape(-1, channels, height, width).float()
    if mode == "nearest":
        out = F.interpolate(flat, size=size, mode="nearest")
    elif mode == "bilinear":
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"unknown mask resize mode {mode!r}; use 'nearest' or 'bilinear'")
    return out.reshape(*lead, channels, size[0], size[1]).to(mask.dtype if mask.is_floating_point() else out.dtype)


def coords_grid(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel-centre coordinates ``[2, H, W]``: channel 0 = x (column index), channel 1 = y (row index)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=0)


def sample_at(src: torch.Tensor, x: torch.Tensor, y: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``src`` ``[B, C, H, W]`` bilinearly at pixel coordinates ``x, y`` ``[B, h, w]`` of its own grid.

    Integer coordinates are pixel centres; outside the grid per ``padding_mode`` (grid_sample's). Returns
    ``[B, C, h, w]``.
    """
    height, width = src.shape[-2:]
    gx = 2.0 * x / max(width - 1, 1) - 1.0
    gy = 2.0 * y / max(height - 1, 1) - 1.0
    norm = torch.stack([gx, gy], dim=-1).to(src.dtype)
    return F.grid_sample(src, norm, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def backward_warp(src: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``src`` ``[B, C, H, W]`` at ``p + flow(p)`` for every output pixel ``p`` (bilinear).

    ``flow`` is ``[B, 2, H, W]`` in pixels of the same grid. Integer coordinates are pixel centres.
    """
    height, width = src.shape[-2:]
    grid = coords_grid(height, width, device=src.device, dtype=flow.dtype).unsqueeze(0) + flow
    return sample_at(src, grid[:, 0], grid[:, 1], padding_mode=padding_mode)


def subsample_flow(flow: torch.Tensor, stride: int) -> torch.Tensor:
    """Flow pyramid level: nearest subsampling ``[..., 2, H, W] → [..., 2, H/s, W/s]`` divided by ``s``.

    Samples rows/cols ``0, s, 2s, …`` exactly like ``F.interpolate(scale_factor=1/s)`` in nearest mode, which is
    how the released adapters were trained (spec §4, §12.13).
    """
    if stride == 1:
        return flow
    return flow[..., ::stride, ::stride] / stride


def _cell_rows(flow: torch.Tensor) -> torch.Tensor:
    """``[N·h·w, 8]``: per grid cell (by its top-left pixel, row-major) the flow at its four corners — top-left,
    top-right, bottom-left, bottom-right, the last row and column repeated — so one row gather fetches a cell."""
    right = torch.cat([flow[..., 1:], flow[..., -1:]], dim=-1)
    below = torch.cat([flow[..., 1:, :], flow[..., -1:, :]], dim=-2)
    below_right = torch.cat([right[..., 1:, :], right[..., -1:, :]], dim=-2)
    return torch.cat([flow, right, below, below_right], dim=1).permute(0, 2, 3, 1).reshape(-1, 8)


def _bilinear_with_jacobian(
    rows: torch.Tensor, size: tuple[int, int], frame: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The border-extended bilinear interpolant of a flow and its exact Jacobian at points ``x, y [K]`` of frames
    starting at flat index ``frame [K]``: ``(value [K, 2], jacobian [K, 4]`` as dFx/dx, dFy/dx, dFx/dy, dFy/dy``)``.

    Exact rather than finite differences, so a Newton step solves a piecewise-linear ramp (a sharp flow edge) at once.
    """
    height, width = size
    cx, cy = x.clamp(0, width - 1), y.clamp(0, height - 1)
    x0, y0 = cx.floor().clamp(max=max(width - 2, 0)), cy.floor().clamp(max=max(height - 2, 0))
    corners = rows[frame + (y0 * width + x0).long()]
    f00, f01, f10, f11 = corners.split(2, dim=1)
    fx, fy = (cx - x0).unsqueeze(1), (cy - y0).unsqueeze(1)
    top, bottom = torch.lerp(f00, f01, fx), torch.lerp(f10, f11, fx)
    # Beyond the outermost pixel centres the border-extended interpolant is flat.
    ddx = torch.lerp(f01 - f00, f11 - f10, fy) * ((x >= 0) & (x <= width - 1)).unsqueeze(1)
    ddy = (bottom - top) * ((y >= 0) & (y <= height - 1)).unsqueeze(1)
    return torch.lerp(top, bottom, fy), torch.cat([ddx, ddy], dim=1)


def _solve_forward_jacobian(jac: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(I + J)⁻¹ v`` per row (``I + J`` is the Jacobian of ``x ↦ x + F(x)``); ``v`` itself where it is singular."""
    a, c, b, e = 1.0 + jac[:, 0:1], jac[:, 1:2], jac[:, 2:3], 1.0 + jac[:, 3:4]
    det = a * e - b * c
    ok = det.abs() > 1e-3
    out = torch.cat([e * v[:, 0:1] - b * v[:, 1:2], a * v[:, 1:2] - c * v[:, 0:1]], dim=1)
    return torch.where(ok, out / torch.where(ok, det, torch.ones_like(det)), v)


def invert_flow(
    flow: torch.Tensor,
    start: torch.Tensor,
    iterations: int = 3,
    prefer_moving: bool = True,
    tol: float = 0.05,
    margin: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward displacement ``D`` with ``D(p) = F(p − D(p))`` for every pixel ``p``, refined from ``start``.

    ``F`` is the border-extended bilinear interpolant of ``flow``; frame t at ``p`` shows the reference frame at
    ``p − D(p)`` (``-D`` is the backward flow for :func:`backward_warp`). Each iteration gives every pixel without a
    root (``|F(p − D) − D| ≥ tol``) a Newton step (exact Jacobian of the interpolant; the fixed-point step
    ``D ← F(p − D)`` where it is singular) and then a neighbour's ``D`` — the best one in a dilated 3×3 window, the
    dilation halving per iteration like jump flooding — extrapolated to the pixel (its source moves by
    ``(I + J)⁻¹ (p − p_n)``, so stretches and translations propagate alike), plus a Newton step from there. A
    candidate is kept only if it lowers the residual. Where the flow folds, several sources land on ``p``: a pixel's
    root is then kept unless, with ``prefer_moving``, a neighbour leads to a root that moves more by ``margin`` —
    moving content stays on top, also in the gaps a stretched moving region leaves in a splatted start. Only pixels
    without a root, or with such a neighbour, are computed in an iteration.

    Args:
        flow: ``[N, 2, h, w]`` forward flow in pixels of its grid, reference frame → frame t.
        start: ``[N, 2, h, w]`` initial ``D`` (e.g. a splatted flow reversal); not modified.
        iterations: refinement iterations; 2–3 reach a root for > 99% of the pixels of a typical drag.
        prefer_moving: where several roots exist, prefer the one that moves most (else keep the first found).
        tol: residual (grid pixels) below which ``D`` counts as a root.
        margin: how much more (grid pixels) a root must move to replace another one.

    Returns:
        ``(D [N, 2, h, w], residual [N, 1, h, w])`` in pixels of the grid; ``residual = |F(p − D) − D|``, large where
        no root was found (e.g. a flow that folds onto itself with no consistent source).
    """
    if flow.dim() != 4 or flow.shape[1] != 2 or start.shape != flow.shape:
        raise ValueError(f"flow and start must both be [N, 2, h, w], got {tuple(flow.shape)} and {tuple(start.shape)}")
    n, _, height, width = flow.shape
    plane = height * width
    rows = _cell_rows(flow)
    flat = torch.arange(n * plane, device=flow.device)
    frame = flat - flat % plane
    px, py = (flat % width).to(flow.dtype), (flat % plane // width).to(flow.dtype)
    d = start.permute(0, 2, 3, 1).reshape(-1, 2).clone()

    def evaluate(ids: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value, jac = _bilinear_with_jacobian(
            rows, (height, width), frame[ids], px[ids] - cand[:, 0], py[ids] - cand[:, 1]
        )
        r = value - cand
        return r, jac, r.square().sum(dim=1)

    r, jac, err = evaluate(flat, d)
    tol2 = tol**2

    def offer(
        ids: torch.Tensor, cand: torch.Tensor, magnitude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take ``cand`` where it fits better. ``magnitude`` (the flow magnitudes at the iteration's start) marks a
        candidate from a neighbour, i.e. another branch: taken only where the current one has not converged or, with
        ``prefer_moving``, where both converge and the candidate moves more; None = a refinement of the current one."""
        r_c, jac_c, err_c = evaluate(ids, cand)
        current = err[ids]
        better = err_c < current
        if magnitude is not None:
            better &= current >= tol2
            if prefer_moving:
                gain = torch.hypot(cand[:, 0], cand[:, 1]) - magnitude[ids]
                better |= (err_c < tol2) & (current < tol2) & (gain > margin)
        keep = ids[better]
        d[keep], r[keep], jac[keep], err[keep] = cand[better], r_c[better], jac_c[better], err_c[better]
        return r_c, jac_c

    for i in range(iterations):
        found = err < tol2
        magnitude = torch.hypot(d[:, 0], d[:, 1])
        score = torch.where(found, magnitude, -1.0 - err) if prefer_moving else -err
        dil = 2 ** max(iterations - 2 - i, 0)
        padded = F.pad(score.view(n, 1, height, width), (dil,) * 4, value=-3e38)
        _, idx = F.max_pool2d(padded, 3, stride=1, dilation=dil, return_indices=True)
        row, col = idx.view(-1) // (width + 2 * dil) - dil, idx.view(-1) % (width + 2 * dil) - dil
        neighbour = frame + row * width + col
        active = ~found
        if prefer_moving:
            active |= found & found[neighbour] & (magnitude[neighbour] > magnitude + margin)
        ids = active.nonzero().squeeze(1)
        if ids.numel() == 0:
            break
        offer(ids, d[ids] + _solve_forward_jacobian(jac[ids], r[ids]))
        nb = neighbour[ids]
        offset = torch.stack([px[ids] - px[nb], py[ids] - py[nb]], dim=1)
        cand = d[nb] + offset - _solve_forward_jacobian(jac[nb], offset)
        r_c, jac_c = offer(ids, cand, magnitude)
        offer(ids, cand + _solve_forward_jacobian(jac_c, r_c), magnitude)
    backward = d.view(n, height, width, 2).permute(0, 3, 1, 2).contiguous()
    return backward, err.sqrt().view(n, 1, height, width)
