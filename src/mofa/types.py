"""Shared type aliases and Protocols (a leaf module: imports nothing from mofa)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Size", "SparseToDense"]

Size = tuple[int, int]
"""(height, width) in pixels."""


@runtime_checkable
class SparseToDense(Protocol):
    """A sparse-to-dense flow model ("densifier").

    ``densifier(image, flow, mask) -> dense``:

    - ``image``: ``[3, h, w]`` float in [0, 1], the reference frame (frame 0) on the densifier's grid.
    - ``flow``: ``[N, 2, h, w]`` sparse flow in pixels of that grid (channel 0 = x), frame 0 → frame t, zero where
      ``mask`` is 0.
    - ``mask``: ``[N, 1, h, w]`` float, > 0 where ``flow`` holds a hint (counts may exceed 1 in reference mode).
    - returns dense flow ``[N, 2, h, w]`` on the same grid, in pixels of that grid.

    ``preferred_grid(image_size)`` returns the (h, w) grid the model wants for an input image of ``image_size``
    (e.g. ``(384, 384)`` for the released CMP; the image grid itself for the classic densifier).

    Objects whose ``__call__`` means something else (e.g. an ``nn.Module`` with its own ``forward``) may instead
    expose the callable as a ``densify`` method; :func:`mofa.flow.densify.densify_hints` prefers ``.densify`` when
    present.
    """

    def __call__(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def preferred_grid(self, image_size: Size) -> Size: ...
