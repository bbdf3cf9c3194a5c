"""Long videos: frame-0-anchored sliding windows and the per-step blending of overlapping windows (spec §7.4).

A video of ``N`` frames (frame 0 = the input image) is denoised as overlapping windows of ``window`` frames. A window
is written ``(start, end)`` and covers frame 0 followed by frames ``start .. end-1`` (so ``end - start + 1`` frames;
``window`` of them except for a short video). Every window is conditioned on the same first frame (CLIP embedding,
image latents, reference features) and on the flow slice ``flow[start-1 : end-1]``.

At every denoising step each window predicts its frames; the predictions are blended per frame with
:func:`blend_weights` and ONE scheduler step is taken on the full latent sequence. The reference instead steps each
window separately (rewinding the scheduler's step index) and averages the stepped latents; for the deterministic
Euler sampler a step is affine in the model output with the same sample, so averaging outputs and stepping once is the
same computation (up to float rounding) without touching scheduler internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mofa.errors import MofaInputError

Window = tuple[int, int]


def plan_windows(num_frames: int, window: int = 25, stride: int = 12, dedupe: bool = True) -> list[Window]:
    """Sliding windows ``(start, end)`` over a video of ``num_frames`` frames (frame 0 shared by all windows).

    The reference's list is ``[(1 + i·S, i·S + W) for i in range((N − W) // S + 1)] + [(N − W + 1, N)]`` (spec §7.4).
    Fixes (spec §12.14): a duplicated last window is dropped (``dedupe=True``), and ``N <= W`` gives the single window
    ``[(1, N)]`` (the reference crashes for ``N < W``). ``dedupe=False`` returns the reference's list verbatim
    (for ``N >= W``; e.g. ``[(1, 25), (1, 25)]`` for ``N = W = 25``) — :func:`blend_weights` of that list reproduces
    the reference's averaging, where the duplicate counts twice.

    Examples: ``plan_windows(25) == [(1, 25)]``; ``plan_windows(49) == [(1, 25), (13, 37), (25, 49)]``;
    ``plan_windows(50) == [(1, 25), (13, 37), (25, 49), (26, 50)]``.
    """
    if num_frames < 2:
        raise MofaInputError(f"num_frames={num_frames} is too small: a video needs at least 2 frames")
    if window < 2:
        raise MofaInputError(f"window size {window} is too small: use at least 2 frames (25 for SVD-XT)")
    if not 1 <= stride <= window - 1:
        raise MofaInputError(f"window stride {stride} must be in [1, {window - 1}] so that windows overlap or touch")
    if num_frames < window or (num_frames == window and dedupe):
        return [(1, num_frames)]
    views = [(1 + i * stride, i * stride + window) for i in range((num_frames - window) // stride + 1)]
    views.append((num_frames - window + 1, num_frames))
    if not dedupe:
        return views
    unique: list[Window] = []
    for view in views:
        if view not in unique:
            unique.append(view)
    return unique


def window_frame_indices(view: Window) -> list[int]:
    """Frame indices of a window: ``[0, start, start+1, ..., end-1]``."""
    start, end = view
    return [0, *range(start, end)]


def blend_weights(views: Sequence[Window], num_frames: int, mode: str = "uniform") -> torch.Tensor:
    """Per-window, per-frame blending weights ``[V, N]`` (float64); every column sums to 1.

    Args:
        views: windows from :func:`plan_windows` (duplicates allowed: each occurrence counts).
        num_frames: ``N``.
        mode: ``"uniform"`` — the reference's ``value / count`` average (every covering window weighs 1);
            ``"ramp"`` — triangular weights ``min(f − start + 1, end − f)`` that fade a window in and out across its
            overlap, so no frame switches abruptly from one window's estimate to an average (the uniform blend jumps
            at every window border).

    Frame 0 is anchored to the first window (weight 1 there, 0 elsewhere), as in the reference: the other windows'
    copies of frame 0 are discarded.
    """
    if mode not in ("uniform", "ramp"):
        raise ValueError(f"unknown blend mode {mode!r}; use 'uniform' or 'ramp'")
    weights = torch.zeros(len(views), num_frames, dtype=torch.float64)
    for v, (start, end) in enumerate(views):
        if not 1 <= start < end <= num_frames:
            raise ValueError(f"window {(start, end)} does not fit a {num_frames}-frame video")
        frames = torch.arange(start, end, dtype=torch.float64)
        if mode == "uniform":
            weights[v, start:end] = 1.0
        else:
            weights[v, start:end] = torch.minimum(frames - start + 1, end - frames)
    weights[0, 0] = 1.0
    total = weights.sum(dim=0)
    if bool((total == 0).any()):
        missing = torch.nonzero(total == 0).flatten().tolist()
        raise ValueError(f"frames {missing} are not covered by any window")
    return weights / total


def merge_duplicate_windows(views: Sequence[Window], weights: torch.Tensor) -> tuple[list[Window], torch.Tensor]:
    """Collapse repeated windows into one, summing their weight rows (a duplicate window predicts the same thing).

    Lets the pipeline reproduce the reference's duplicate-last-window average while denoising each window once.
    """
    unique: list[Window] = []
    rows: list[torch.Tensor] = []
    for view, row in zip(views, weights, strict=True):
        if view in unique:
            rows[unique.index(view)] = rows[unique.index(view)] + row
        else:
            unique.append(view)
            rows.append(row.clone())
    return unique, torch.stack(rows)


def blend_windows(
    window_outputs: Sequence[torch.Tensor], views: Sequence[Window], weights: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Blend per-window predictions ``[B, n_v, ...]`` (frame axis 1, window frame order of
    :func:`window_frame_indices`) into ``[B, N, ...]`` with ``weights`` ``[V, N]`` from :func:`blend_weights`.

    Accumulates in float32 (or the outputs' dtype if wider) and returns the outputs' dtype.
    """
    first = window_outputs[0]
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    out = torch.zeros(first.shape[0], num_frames, *first.shape[2:], dtype=acc_dtype, device=first.device)
    for v, (pred, view) in enumerate(zip(window_outputs, views, strict=True)):
        index = torch.tensor(window_frame_indices(view), device=first.device)
        w = weights[v].to(device=first.device, dtype=acc_dtype)[index]
        w = w.view(1, -1, *([1] * (pred.ndim - 2)))
        out.index_add_(1, index, pred.to(acc_dtype) * w)
    return out.to(first.dtype)
