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


def backward_warp(src: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``src`` ``[B, C, H, W]`` at ``p + flow(p)`` for every output pixel ``p`` (bilinear).

    ``flow`` is ``[B, 2, H, W]`` in pixels of the same grid. Integer coordinates are pixel centres.
    """
    batch, _, height, width = src.shape
    grid = coords_grid(height, width, device=src.device, dtype=flow.dtype).unsqueeze(0) + flow
    gx = 2.0 * grid[:, 0] / max(width - 1, 1) - 1.0
    gy = 2.0 * grid[:, 1] / max(height - 1, 1) - 1.0
    norm = torch.stack([gx, gy], dim=-1).to(src.dtype)
    return F.grid_sample(src, norm, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def subsample_flow(flow: torch.Tensor, stride: int) -> torch.Tensor:
    """Flow pyramid level: nearest subsampling ``[..., 2, H, W] → [..., 2, H/s, W/s]`` divided by ``s``.

    Samples rows/cols ``0, s, 2s, …`` exactly like ``F.interpolate(scale_factor=1/s)`` in nearest mode, which is
    how the released adapters were trained (spec §4, §12.13).
    """
    if stride == 1:
        return flow
    return flow[..., ::stride, ::stride] / stride
