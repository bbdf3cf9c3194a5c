"""Forward warping by splatting (softmax splatting, Niklaus & Liu, CVPR 2020) in pure PyTorch.

The original MOFA-Video code calls a cupy CUDA kernel (spec §8). This module reproduces its semantics exactly on any
device with a single ``scatter_add_`` per call:

- every source pixel ``(x, y)`` of sample ``b`` moves to ``(X, Y) = (x + flow[b, 0, y, x], y + flow[b, 1, y, x])``;
  integer coordinates are pixel centres (no +0.5 offset);
- its value is splatted bilinearly onto the 4 neighbouring pixel centres ``floor(X) + {0, 1}``,
  ``floor(Y) + {0, 1}``; each neighbour outside ``[0, W-1] x [0, H-1]`` is dropped individually (no clamping);
- source pixels with a non-finite target are ignored; pixels where nothing lands stay 0.

Accumulation is in float32 (float64 inputs stay float64) and the result is cast back to the input dtype. Gradients flow
to ``src``, ``flow`` (through the bilinear weights; ``floor`` is piecewise constant) and ``metric``.
"""

from __future__ import annotations

import torch

__all__ = ["SPLAT_MODES", "softsplat", "softsplat_with_weight"]

SPLAT_MODES: tuple[str, ...] = ("sum", "avg", "linear", "soft")


def _check_inputs(src: torch.Tensor, flow: torch.Tensor, mode: str, metric: torch.Tensor | None) -> None:
    if mode not in SPLAT_MODES:
        raise ValueError(f"unknown softsplat mode {mode!r}; use one of {SPLAT_MODES}")
    if src.dim() != 4:
        raise ValueError(f"src must be [B, C, H, W], got shape {tuple(src.shape)}")
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be [B, 2, H, W], got shape {tuple(flow.shape)}")
    if flow.shape[0] != src.shape[0] or flow.shape[2:] != src.shape[2:]:
        raise ValueError(
            f"flow {tuple(flow.shape)} does not match src {tuple(src.shape)}: batch and H, W must be equal"
        )
    if not src.is_floating_point() or not flow.is_floating_point():
        raise ValueError(f"src and flow must be floating point, got {src.dtype} and {flow.dtype}")
    if flow.device != src.device:
        raise ValueError(f"src is on {src.device} but flow is on {flow.device}; move them to one device")
    if mode in ("sum", "avg"):
        if metric is not None:
            raise ValueError(f"mode {mode!r} takes no metric; use mode='linear' or 'soft' to weight by a metric")
    else:
        if metric is None:
            raise ValueError(f"mode {mode!r} needs a metric [B, 1, H, W]")
        expected = (src.shape[0], 1, *src.shape[2:])
        if tuple(metric.shape) != expected:
            raise ValueError(f"metric must be [B, 1, H, W] = {expected}, got {tuple(metric.shape)}")
        if not metric.is_floating_point() or metric.device != src.device:
            raise ValueError(f"metric must be a float tensor on {src.device}, got {metric.dtype} on {metric.device}")


def _splat(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear forward splat (the 'sum' mode) of ``src`` [B, C, H, W] by ``flow`` [B, 2, H, W], same dtype.

    All four corners of all samples go through ONE ``scatter_add_`` on a ``[B, C, 4·H·W] → [B, C, H·W]`` layout.
    """
    batch, channels, height, width = src.shape
    hw = height * width
    dtype = src.dtype
    ys = torch.arange(height, device=src.device, dtype=dtype).view(1, height, 1)
    xs = torch.arange(width, device=src.device, dtype=dtype).view(1, 1, width)
    tx = xs + flow[:, 0]  # [B, H, W] target x
    ty = ys + flow[:, 1]
    # Non-finite targets are ignored; far-away finite targets are dropped too (this also keeps .long() in range).
    ok = torch.isfinite(tx) & torch.isfinite(ty) & (tx > -1) & (tx < width) & (ty > -1) & (ty < height)
    zero = torch.zeros((), dtype=dtype, device=src.device)
    flow_x = torch.where(ok, flow[:, 0], zero)  # masked so NaN/inf never reach the weights (or their gradients)
    flow_y = torch.where(ok, flow[:, 1], zero)
    x0f = torch.floor(xs + flow_x).detach()
    y0f = torch.floor(ys + flow_y).detach()
    # Fractional parts as (x - floor) + flow: one rounding instead of two, so float32 weights stay accurate
    # (~1e-7 absolute) even far from the origin.
    fx = (xs - x0f) + flow_x  # [B, H, W] weight of the right column, in [0, 1]
    fy = (ys - y0f) + flow_y
    # Corner weights and indices built as [B, 2 (dy), 2 (dx), H, W] by broadcasting: corner (dx, dy) gets
    # wx[dx]·wy[dy] (the spec's NW/NE/SW/SE products). A corner outside the grid gets weight 0 and a clamped (unused)
    # index, so one scatter handles all of them.
    x0 = x0f.long().unsqueeze(1)  # [B, 1, H, W]
    y0 = y0f.long().unsqueeze(1)
    fx = fx.unsqueeze(1)
    fy = fy.unsqueeze(1)
    okf = ok.unsqueeze(1).to(dtype)
    wx = torch.cat([(1 - fx) * (x0 >= 0), fx * (x0 < width - 1)], dim=1)  # [B, 2, H, W]
    wy = torch.cat([(1 - fy) * (y0 >= 0) * okf, fy * (y0 < height - 1) * okf], dim=1)
    weight = (wy.unsqueeze(2) * wx.unsqueeze(1)).view(batch, 1, 4, hw)
    xi = torch.cat([x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1)], dim=1)
    yi = torch.cat([y0.clamp(0, height - 1) * width, (y0 + 1).clamp(0, height - 1) * width], dim=1)
    index = (yi.unsqueeze(2) + xi.unsqueeze(1)).view(batch, 1, 4 * hw)
    values = (src.reshape(batch, channels, 1, hw) * weight).view(batch, channels, 4 * hw)
    out = torch.zeros(batch, channels, hw, dtype=dtype, device=src.device)
    out = out.scatter_add(2, index.expand(batch, channels, 4 * hw), values)
    return out.view(batch, channels, height, width)


def softsplat_with_weight(
    src: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "avg",
    metric: torch.Tensor | None = None,
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-warp ``src`` by ``flow`` and also return the splatted normaliser (where holes are).

    Args:
        src: ``[B, C, H, W]`` values on a grid (any float dtype; accumulation is float32, float64 stays float64).
        flow: ``[B, 2, H, W]`` forward flow in pixels of that grid, channel 0 = x; pixel ``(x, y)`` of sample ``b``
            moves to ``(x + flow[b,0,y,x], y + flow[b,1,y,x])``.
        mode: ``"sum"`` (plain splat), ``"avg"`` (splat ``[src, 1]`` and divide), ``"linear"`` (splat
            ``[src·metric, metric]`` and divide) or ``"soft"`` (splat ``[src·exp(metric), exp(metric)]`` and divide).
        metric: ``[B, 1, H, W]`` importance for ``"linear"`` / ``"soft"``; must be None for ``"sum"`` / ``"avg"``.
            For ``"soft"`` the per-sample maximum is subtracted before ``exp`` (numerically safe, same ratio).
        eps: added to the normaliser before dividing (the reference's ``-addeps`` behaviour, 1e-7).

    Returns:
        ``(out [B, C, H, W], weight [B, 1, H, W])`` in ``src``'s dtype. ``weight`` is the splatted normaliser:
        ones for ``"sum"`` / ``"avg"``, the metric for ``"linear"``, ``exp(metric - max)`` for ``"soft"``. It is 0
        exactly where nothing landed (holes); ``out`` is 0 there too.
    """
    _check_inputs(src, flow, mode, metric)
    compute = torch.float64 if torch.float64 in (src.dtype, flow.dtype) else torch.float32
    x = src.to(compute)
    f = flow.to(compute)
    if mode in ("sum", "avg"):
        norm = torch.ones_like(x[:, :1])
    elif mode == "linear":
        norm = metric.to(compute)
    else:
        m = metric.to(compute)
        # Subtracting the per-sample max leaves the normalised ratio unchanged but keeps exp() finite.
        finite = torch.where(torch.isfinite(m), m, torch.full_like(m, -torch.inf))
        peak = finite.flatten(1).amax(dim=1).clamp_min(-1e30).view(-1, 1, 1, 1).detach()
        norm = torch.exp(m - peak)
    numer = x if mode in ("sum", "avg") else x * norm
    splat = _splat(torch.cat([numer, norm], dim=1), f)
    out, weight = splat[:, :-1], splat[:, -1:]
    if mode != "sum":
        out = out / (weight + eps)
    return out.to(src.dtype), weight.to(src.dtype)


def softsplat(
    src: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "avg",
    metric: torch.Tensor | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Forward-warp ``src`` ``[B, C, H, W]`` by ``flow`` ``[B, 2, H, W]`` (softmax splatting, spec §8).

    Same arguments as :func:`softsplat_with_weight`; returns only ``[B, C, H, W]`` in ``src``'s dtype. With
    ``mode="avg"`` and zero flow the result is ``src / (1 + 1e-7)``; pixels where nothing lands are 0.
    """
    _check_inputs(src, flow, mode, metric)
    if mode == "sum":
        compute = torch.float64 if torch.float64 in (src.dtype, flow.dtype) else torch.float32
        return _splat(src.to(compute), flow.to(compute)).to(src.dtype)
    return softsplat_with_weight(src, flow, mode=mode, metric=metric, eps=eps)[0]
