"""Hints → dense flow in output pixels: brush split, sparse-to-dense passes, merge, static brush, resize.

Reference mode follows MOFA-Video-Traj (spec §2.1): the image goes to the grid with nearest interpolation; tracks
starting inside the motion brush and outside it get separate densifier passes; the inside flow is multiplied by the
bilinear (0..1) brush mask; a pixel takes the inside flow only where *both* components are non-zero (the reference's
``.all`` quirk, §12.10); the merged flow is resized to the output with nearest interpolation and scaled per axis.

Default: antialiased bilinear image resize to the grid, the brush mask (nearest, {0, 1}) decides which pass a pixel
takes, and the flow is resized to the output bilinearly (smoother than nearest; no blocky 384→H×W steps).

Both modes: a static brush (our extension) zeroes the final flow inside its region (at output resolution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mofa.errors import MofaInputError
from mofa.flow.ops import resize_flow
from mofa.flow.sparse import SparseFlow, hints_to_sparse_flow
from mofa.hints.brush import MotionBrush
from mofa.hints.schema import HintSet

__all__ = ["densify_hints", "densify_sparse", "image_to_grid", "resolve_densifier"]

DensifyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_densifier(densifier: object) -> tuple[DensifyFn, Callable[[tuple[int, int]], tuple[int, int]] | None]:
    """Return ``(densify_fn, preferred_grid_fn or None)`` for a densifier object.

    Prefers a ``.densify`` method (e.g. ``CMPModel.densify``), else the object itself if callable. ``preferred_grid``
    is looked up on the object, or on the owner of a bound method.
    """
    fn = getattr(densifier, "densify", None)
    if not callable(fn):
        if not callable(densifier):
            raise TypeError(f"densifier must be callable or have a .densify method, got {type(densifier).__name__}")
        fn = densifier
    owner = getattr(densifier, "__self__", densifier)
    preferred = getattr(densifier, "preferred_grid", None) or getattr(owner, "preferred_grid", None)
    if preferred is not None and not callable(preferred):
        value = tuple(preferred)
        return fn, lambda _size: (int(value[0]), int(value[1]))
    return fn, preferred


def image_to_grid(image: torch.Tensor, grid_size: tuple[int, int], reference_mode: bool = False) -> torch.Tensor:
    """Resize ``image [3, H, W]`` in [0, 1] to the grid: nearest (reference, ``F.interpolate`` default) or
    antialiased bilinear (default)."""
    if tuple(image.shape[-2:]) == tuple(grid_size):
        return image
    if reference_mode:
        return F.interpolate(image[None], size=grid_size, mode="nearest")[0]
    out = F.interpolate(image[None], size=grid_size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp(0.0, 1.0)


def _run(
    fn: DensifyFn,
    image: torch.Tensor,
    passes: list[tuple[torch.Tensor, torch.Tensor] | None],
    shape: tuple[int, ...],
) -> list[torch.Tensor]:
    """Dense flow of each sparse pass (``(flow, mask)`` or None; ``shape`` each), all in one densifier call.

    The densifier maps every frame independently, so the frames of several passes can share one batch: the image is
    then encoded once (for CMP the image branch is the bulk of a call) instead of once per pass. Passes without any
    hint are all zeros and are not sent.
    """
    active = [i for i, part in enumerate(passes) if part is not None and bool((part[1] > 0).any())]
    results = [torch.zeros(shape, dtype=image.dtype, device=image.device) for _ in passes]
    if not active or shape[0] == 0:
        return results
    flow, mask = (torch.cat([passes[i][k].to(device=image.device, dtype=image.dtype) for i in active]) for k in (0, 1))
    dense = fn(image, flow, mask)
    expected = (len(active) * shape[0], *shape[1:])
    if tuple(dense.shape) != expected:
        raise ValueError(f"densifier returned shape {tuple(dense.shape)}, expected {expected}")
    for i, part in zip(active, dense.split(shape[0]), strict=True):
        results[i] = part
    return results


def densify_sparse(
    image_grid: torch.Tensor, sparse: SparseFlow, densifier: object, reference_mode: bool = False
) -> torch.Tensor:
    """Dense flow ``[T-1, 2, h, w]`` on the sparse grid from a :class:`SparseFlow` (passes + merge, no resize).

    ``image_grid`` is ``[3, h, w]`` in [0, 1] already on ``sparse.grid_size``. With a move brush, the out- and in-pass
    frames go to the densifier as one batch of ``2 (T-1)`` frames (one image encoding).
    """
    fn, _ = resolve_densifier(densifier)
    shape = (sparse.num_frames - 1, 2, *sparse.grid_size)
    if sparse.move_mask is None:
        return _run(fn, image_grid, [(sparse.flow, sparse.mask)], shape)[0]
    if sparse.inside is None:
        # No drag starts in the brush: the brush selects nothing (the reference's in-pass is all zeros too).
        return _run(fn, image_grid, [sparse.outside], shape)[0]
    move = sparse.move_mask.to(device=image_grid.device, dtype=image_grid.dtype)  # [1, h, w]
    flow_out, flow_in = _run(fn, image_grid, [sparse.outside, sparse.inside], shape)
    flow_in = flow_in * move
    if reference_mode:
        take_in = (flow_in != 0).all(dim=-3, keepdim=True)
    else:
        take_in = (move > 0.5).expand_as(flow_in[:, :1])
    return torch.where(take_in, flow_in, flow_out)


def densify_hints(
    image: torch.Tensor,
    hints: HintSet,
    densifier: object,
    out_size: tuple[int, int] | None = None,
    grid_size: tuple[int, int] | None = None,
    reference_mode: bool = False,
) -> torch.Tensor:
    """Dense flow for every generated frame from the hints.

    Args:
        image: ``[3, H, W]`` (or ``[1, 3, H, W]``) float in [0, 1], the input image (frame 0); ``(H, W)`` must equal
            ``hints.image_size``.
        hints: drags and brushes on the input image.
        densifier: a :class:`mofa.types.SparseToDense` (callable ``(image, flow, mask) -> dense`` or an object with a
            ``.densify`` method, optionally with ``preferred_grid(image_size)``).
        out_size: (H_out, W_out) of the result; default the image size.
        grid_size: grid of the sparse-to-dense step; None = the densifier's ``preferred_grid`` (CMP: 384², classic:
            the image grid), or the image grid if it has none.
        reference_mode: spec §2.1 numerics (see module docstring).

    Returns:
        ``[T-1, 2, H_out, W_out]`` flow in output pixels, entry ``t-1`` = frame 0 → frame t; all zeros when there are
        no tracks.
    """
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise MofaInputError(f"image must be [3, H, W] RGB, got shape {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != hints.image_size:
        h, w = image.shape[-2:]
        raise MofaInputError(
            f"image is {w}x{h} but the hints were made for {hints.image_size[1]}x{hints.image_size[0]} (WxH); "
            "load the hints with the same image"
        )
    if not image.is_floating_point():
        image = image.float()
    out_size = hints.image_size if out_size is None else (int(out_size[0]), int(out_size[1]))
    if grid_size is None:
        _, preferred = resolve_densifier(densifier)
        grid_size = preferred(hints.image_size) if preferred is not None else hints.image_size
    grid_size = (int(grid_size[0]), int(grid_size[1]))

    sparse = hints_to_sparse_flow(hints, grid_size, reference_mode=reference_mode)
    image_grid = image_to_grid(image, grid_size, reference_mode=reference_mode)
    dense = densify_sparse(image_grid, sparse, densifier, reference_mode=reference_mode)
    dense = resize_flow(dense, out_size, mode="nearest" if reference_mode else "bilinear")

    static = hints.union_mask("static")
    if static is not None:
        keep = 1.0 - MotionBrush(static, kind="static").resized(out_size).to(device=dense.device, dtype=dense.dtype)
        dense = dense * keep
    return dense
