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


def _splat(
    src: torch.Tensor, flow: torch.Tensor, norm: torch.Tensor | None = None, append_norm: bool = False
) -> torch.Tensor:
    """Bilinear forward splat of ``src·norm`` [B, C, H, W] by ``flow`` [B, 2, H, W] (all one float dtype).

    ``norm`` [B, 1, H, W] (None = ones) multiplies every source pixel; with ``append_norm`` the splatted ``norm`` is
    returned as an extra last channel, giving [B, C+1, H, W]. All four corners of all samples go through ONE
    ``scatter_add`` on a ``[B, C, 4·(H+2)·(W+2)]`` layout: the canvas has a 1-pixel border so that every corner of
    a kept target has a valid index; corners landing in the border are cropped away afterwards (the spec's
    "out-of-range targets are dropped individually") without any per-corner validity masks.
    """
    batch, channels, height, width = src.shape
    hw = height * width
    pw = width + 2
    dtype = src.dtype
    ys = torch.arange(height, device=src.device, dtype=dtype).view(1, height, 1)
    xs = torch.arange(width, device=src.device, dtype=dtype).view(1, 1, width)
    fx = flow[:, 0]
    fy = flow[:, 1]
    tx = xs + fx  # [B, H, W] target position
    ty = ys + fy
    # Non-finite targets are ignored; targets with no corner inside the grid are dropped (also keeps .long() safe).
    ok = (tx > -1) & (tx < width) & (ty > -1) & (ty < height)  # False for NaN
    all_ok = bool(ok.all())
    if not all_ok:
        zero = torch.zeros((), dtype=dtype, device=src.device)
        fx = torch.where(ok, fx, zero)  # masked so NaN/inf never reach the weights (or their gradients)
        fy = torch.where(ok, fy, zero)
        tx = xs + fx
        ty = ys + fy
    x0f = torch.floor(tx).detach()
    y0f = torch.floor(ty).detach()
    # Fractional parts from the rounded target, exactly like the reference CUDA kernel (X - floor(X) in float32).
    ax = tx - x0f  # weight of the right column, in [0, 1]
    ay = ty - y0f  # weight of the lower row
    ry = 1 - ay
    if not all_ok:  # dropped sources get weight 0 through both rows
        ay = ay * ok
        ry = ry * ok
    # Corner (dx, dy) gets wx[dx]·wy[dy] (the spec's NW, NE, SW, SE products), laid out as [B, 1, 4, HW].
    wx = torch.stack([1 - ax, ax], dim=1).view(batch, 1, 2, hw)
    wy = torch.stack([ry, ay], dim=1).view(batch, 2, 1, hw)
    weight = (wy * wx).view(batch, 1, 4, hw)
    if norm is not None:
        weight = weight * norm.reshape(batch, 1, 1, hw)
    base = ((y0f.long() + 1) * pw + (x0f.long() + 1)).view(batch, 1, hw)  # NW corner on the padded canvas
    offsets = torch.tensor([0, 1, pw, pw + 1], device=src.device).view(1, 4, 1)
    index = (base + offsets).view(batch, 1, 4 * hw)
    out_channels = channels + int(append_norm)
    if append_norm and not (torch.is_grad_enabled() and (src.requires_grad or weight.requires_grad)):
        # Write the products straight into one buffer instead of concatenating [src, ones] first.
        values = torch.empty(batch, out_channels, 4, hw, dtype=dtype, device=src.device)
        torch.mul(src.reshape(batch, channels, 1, hw), weight, out=values[:, :channels])
        values[:, channels:] = weight
    else:
        values = src.reshape(batch, channels, 1, hw) * weight
        if append_norm:
            values = torch.cat([values, weight], dim=1)
    canvas = torch.zeros(batch, out_channels, (height + 2) * pw, dtype=dtype, device=src.device)
    canvas.scatter_add_(2, index.expand(batch, out_channels, 4 * hw), values.reshape(batch, out_channels, -1))
    return canvas.view(batch, out_channels, height + 2, pw)[:, :, 1:-1, 1:-1]


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
        norm = None
    elif mode == "linear":
        norm = metric.to(compute)
    else:
        m = metric.to(compute)
        # Subtracting the per-sample max leaves the normalised ratio unchanged but keeps exp() finite.
        finite = torch.where(torch.isfinite(m), m, torch.full_like(m, -torch.inf))
        peak = finite.flatten(1).amax(dim=1).clamp_min(-1e30).view(-1, 1, 1, 1).detach()
        norm = torch.exp(m - peak)
    splat = _splat(x, f, norm=norm, append_norm=True)
    out, weight = splat[:, :-1], splat[:, -1:]
    out = out / (weight + eps) if mode != "sum" else out.contiguous()
    return out.to(src.dtype), weight.contiguous().to(src.dtype)


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
        return _splat(src.to(compute), flow.to(compute)).to(src.dtype).contiguous()
    return softsplat_with_weight(src, flow, mode=mode, metric=metric, eps=eps)[0]
