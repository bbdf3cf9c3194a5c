"""Weight-free sparse-to-dense flow: edge-aware normalised interpolation with implicit zero anchors.

``ClassicDensifier`` turns the sparse hint flow of the S2D grid (spec §2.1: a few pixels carry a vector, ``mask > 0``)
into a dense flow without any network. It stands in for CMP in the CPU preview and in tests.

Method (a normalised edge-aware convolution, cf. Knutsson & Westin's normalised convolution with an edge-aware
kernel; the kernel is OpenCV's fast global smoother, Min et al. 2014, guided by the image):

    dense_n(p) = F[ w · sum_k v_{n,k} δ_k ](p) / ( F[ w · sum_k δ_k + sum_j δ_j ](p) + c )

with ``F`` the image-guided smoothing operator (linear for a fixed guide), ``δ_k`` the hint pixels with vectors
``v_{n,k}`` of frame ``n``, ``δ_j`` implicit **zero anchors** on a lattice (spacing ``anchor_spacing``) at Euclidean
distance ``> anchor_radius`` from every hint, ``w = hint_weight`` and a tiny ``c`` so that pixels nothing reaches
get 0. The anchors are a design choice standing in for CMP's learnt prior "what is not dragged stays still"; their
radius bounds how far a drag can reach in regions without edges. Consequences:

- the flow spreads from a hint inside its region (the smoother diffuses across weak image gradients) and is stopped at
  strong edges, so the object under a drag moves with it while a differently coloured neighbour stays still;
- zero anchors beyond ``anchor_radius`` pull the flow to 0 far from all drags (user "anchor" points with flow 0 are
  ordinary hints and are honoured the same way);
- at hint pixels the vectors are reproduced exactly (they are written back after interpolation);
- the result is linear in the hint vectors and deterministic.

Speed: every frame's hints sit at the same pixels (the frame-0 start positions), only the vectors change. The
operator is therefore applied to an orthonormal basis of the hint vectors (rank ≤ min(#hints, 2N), from an SVD) and
all N frames are one matrix product of the filtered basis: a 24-frame densify at 384² costs a few filter passes.
Frames whose hint pixels differ are grouped and handled group by group.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["ClassicDensifier"]


class ClassicDensifier:
    """Edge-aware, weight-free sparse-to-dense flow (implements the SparseToDense protocol).

    Args:
        max_size: long side of the preferred grid (the image grid capped to this, aspect kept).
        smoothness: lambda of the fast global smoother; reach of a hint grows like ``sqrt(smoothness)`` pixels.
        sigma_color: colour scale (0..255 units) of the smoother: image differences much larger than this stop the
            flow.
        anchor_radius: zero anchors are placed farther than this fraction of the grid's long side from every hint.
        anchor_spacing: lattice spacing of the zero anchors, in grid pixels.
        hint_weight: weight of one hint pixel relative to one zero anchor: higher values let a drag carry a larger
            region (and leak more across weak edges).
        num_iter: smoother iterations (alternating horizontal/vertical passes).
    """

    def __init__(
        self,
        max_size: int = 384,
        smoothness: float = 500.0,
        sigma_color: float = 12.0,
        anchor_radius: float = 0.25,
        anchor_spacing: int = 12,
        hint_weight: float = 100.0,
        num_iter: int = 3,
    ) -> None:
        if max_size < 8:
            raise ValueError(f"max_size must be >= 8, got {max_size}")
        if smoothness <= 0 or sigma_color <= 0 or anchor_spacing < 1 or hint_weight <= 0 or num_iter < 1:
            raise ValueError("smoothness, sigma_color must be > 0; anchor_spacing, num_iter >= 1; hint_weight > 0")
        self.max_size = int(max_size)
        self.smoothness = float(smoothness)
        self.sigma_color = float(sigma_color)
        self.anchor_radius = float(anchor_radius)
        self.anchor_spacing = int(anchor_spacing)
        self.hint_weight = float(hint_weight)
        self.num_iter = int(num_iter)

    def preferred_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The grid (height, width) this densifier works on for an input image of ``image_size`` = (H, W).

        The image grid itself, scaled down (aspect kept) so that the long side is at most ``max_size``.
        """
        height, width = int(image_size[0]), int(image_size[1])
        if height < 1 or width < 1:
            raise ValueError(f"image_size must be positive (height, width), got {image_size}")
        scale = min(1.0, self.max_size / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _smoother(self, image: torch.Tensor):
        guide = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        guide = np.ascontiguousarray(guide)
        return cv2.ximgproc.createFastGlobalSmootherFilter(
            guide, self.smoothness, self.sigma_color, 0.25, self.num_iter
        )

    @staticmethod
    def _filter(smoother, planes: np.ndarray) -> np.ndarray:
        """Apply the smoother to ``planes`` [M, h, w] float32, up to 4 channels per call."""
        out = np.empty_like(planes)
        for start in range(0, planes.shape[0], 4):
            chunk = planes[start : start + 4]
            if chunk.shape[0] == 2:  # OpenCV images have 1, 3 or 4 channels
                chunk = np.concatenate([chunk, np.zeros_like(chunk[:1])])
            res = smoother.filter(np.ascontiguousarray(chunk.transpose(1, 2, 0)))
            res = res.reshape(*res.shape[:2], -1).transpose(2, 0, 1)
            out[start : start + 4] = res[: min(4, planes.shape[0] - start)]
        return out

    def _anchors(self, hint: np.ndarray) -> np.ndarray:
        """Zero-anchor indicator [h, w] float32: lattice points farther than the anchor radius from every hint."""
        height, width = hint.shape
        dist = cv2.distanceTransform((~hint).astype(np.uint8), cv2.DIST_L2, 5)
        lattice = np.zeros_like(hint)
        off = self.anchor_spacing // 2
        lattice[min(off, height - 1) :: self.anchor_spacing, min(off, width - 1) :: self.anchor_spacing] = True
        radius = self.anchor_radius * max(height, width)
        return (lattice & (dist > radius)).astype(np.float32)

    def _densify_group(self, smoother, hint: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Dense flow [M, h*w] float32 for M value channels sharing the hint pixels ``hint`` [h, w] (values [M, K])."""
        height, width = hint.shape
        hint_np = hint.numpy()
        u, s, vt = np.linalg.svd(values.double().numpy(), full_matrices=False)
        if s.size == 0 or s[0] == 0:
            return torch.zeros(values.shape[0], height * width)
        # Filter an orthonormal basis of the hint vectors instead of every frame: rank <= min(K, 2N) planes.
        rank = int((s > 1e-7 * s[0]).sum())
        planes = np.zeros((rank + 1, height, width), np.float32)
        planes[:rank, hint_np] = vt[:rank] * self.hint_weight
        planes[rank] = self.hint_weight * hint_np.astype(np.float32) + self._anchors(hint_np)
        filtered = torch.from_numpy(self._filter(smoother, planes)).view(rank + 1, -1)
        coeff = torch.from_numpy(u[:, :rank] * s[:rank]).float()
        den = filtered[rank:]
        # c keeps pixels that no hint or anchor reaches at 0 instead of 0/0. Normalising the r basis planes first
        # makes the N-frame output a single matrix product.
        basis = filtered[:rank] / (den + 1e-6 * float(den.max()) + 1e-30)
        dense = coeff @ basis
        dense[:, hint.view(-1)] = values.float()
        return dense

    def __call__(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Densify sparse hint flow.

        Args:
            image: ``[3, h, w]`` reference frame (frame 0) in [0, 1] on the S2D grid.
            flow: ``[N, 2, h, w]`` sparse flow in grid pixels (frame 0 → frame n+1), meaningful where ``mask > 0``.
            mask: ``[N, 1, h, w]`` hint mask; any value > 0 marks a hint (fractional brush values included).

        Returns:
            ``[N, 2, h, w]`` dense flow in grid pixels, same dtype/device as ``flow``.
        """
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, h, w] in [0, 1], got shape {tuple(image.shape)}")
        if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[2:] != image.shape[1:]:
            raise ValueError(
                f"flow must be [N, 2, h, w] with (h, w) = {tuple(image.shape[1:])}, got {tuple(flow.shape)}"
            )
        if mask.shape != (flow.shape[0], 1, *flow.shape[2:]):
            raise ValueError(
                f"mask must be [N, 1, h, w] = {(flow.shape[0], 1, *flow.shape[2:])}, got {tuple(mask.shape)}"
            )
        frames, _, height, width = flow.shape
        hints = (mask[:, 0] > 0).cpu()
        vec = flow.detach().cpu()
        if not bool(hints.any()):
            return torch.zeros_like(flow)
        smoother = self._smoother(image)
        same = (hints == hints[:1]).flatten(1).all(dim=1)
        if bool(same.all()):  # the usual case: every frame's hints sit at the frame-0 start pixels
            values = vec[:, :, hints[0]].reshape(2 * frames, -1)
            dense = self._densify_group(smoother, hints[0], values)
            return dense.view(frames, 2, height, width).to(dtype=flow.dtype, device=flow.device)
        out = torch.zeros(frames, 2, height * width, dtype=flow.dtype)
        todo = list(range(frames))
        while todo:
            pattern = hints[todo[0]]
            group = [n for n in todo if torch.equal(hints[n], pattern)]
            todo = [n for n in todo if n not in group]
            if not bool(pattern.any()):
                continue
            values = vec[group][:, :, pattern].reshape(2 * len(group), -1)
            dense = self._densify_group(smoother, pattern, values)
            out[group] = dense.view(len(group), 2, -1).to(flow.dtype)
        return out.view(frames, 2, height, width).to(flow.device)
