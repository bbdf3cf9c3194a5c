"""A 3x3 convolution of a bilinearly resized input, computed without building the resized input.

Inference helper of :class:`mofa.models.cmp.CMPModel`'s per-frame decoder (its fusion convolutions at 1/8, 1/4 and
1/2 read upsampled features). A leaf module: plain tensor code, no model imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ResizedConv3x3"]


def _resize_matrix(src: int, dst: int, device, dtype: torch.dtype) -> torch.Tensor:
    """``[dst, src]`` matrix of 1-D bilinear resizing with ``align_corners=True`` — the per-axis map of
    ``F.interpolate(..., mode="bilinear", align_corners=True)``: source position ``i * (src-1)/(dst-1)``, two taps."""
    pos = torch.arange(dst, dtype=torch.float64) * ((src - 1) / (dst - 1) if dst > 1 else 0.0)
    lo = pos.floor().long().clamp(max=src - 1)
    frac = pos - lo
    rows = torch.arange(dst)
    matrix = torch.zeros(dst, src, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, (lo + 1).clamp(max=src - 1)), frac, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def _shifted_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``[3, dst, src]``: slice ``k`` has row ``y`` = row ``y + k - 1`` of ``matrix``, zero outside (conv padding)."""
    padded = F.pad(matrix, (0, 0, 1, 1))
    return torch.stack([padded[k : k + matrix.shape[0]] for k in range(3)])


def _row_windows(matrix: torch.Tensor, block: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(r0, r1, c0, c1)`` of ``block`` rows of a banded matrix: rows ``[r0, r1)`` are zero outside columns
    ``[c0, c1)``. All-zero blocks are left out."""
    nonzero = matrix != 0
    windows = []
    for r0 in range(0, matrix.shape[0], block):
        r1 = min(matrix.shape[0], r0 + block)
        cols = nonzero[r0:r1].any(dim=0).nonzero()
        if len(cols):
            windows.append((r0, r1, int(cols[0]), int(cols[-1]) + 1))
    return windows


class ResizedConv3x3:
    """``conv2d(resize(x), weight, padding=1)`` (no bias), ``resize`` = bilinear ``align_corners=True``, computed
    without building the resized input.

    An exact rewrite: a 3×3 convolution is nine channel mixings ``W[:, :, ka, kb]``, each followed by a shift; a
    channel mixing commutes with a per-channel resize, and the resize is separable (``R_a x R_bᵀ``), so
    ``out = Σ_{ka,kb} R_a^{ka} (W_{ka,kb} x) (R_b^{kb})ᵀ`` with ``R^{k}`` the 1-D resize matrix whose rows are shifted
    by ``k - 1`` (rows falling off the edge are zero: the zero padding). The channel mixing then runs at the *source*
    resolution (a quarter of the multiply-adds for a 2× resize) and the two resize passes are matrix products over
    row blocks of the banded ``R`` (two non-zeros per row). Only float round-off differs from the reference.

    Layout: ``x`` is ``[A, B, C_in]`` (two spatial axes, channels last, contiguous); the result is ``[B', A', C_out]``:
    the spatial axes come out swapped, which lets both resize passes be plain matrix products. ``weight`` is
    ``[C_out, C_in, 3, 3]`` with its kernel axes in the order (A, B).
    """

    def __init__(self, weight: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], block: int = 32):
        cout, cin = weight.shape[:2]
        self.cout, self.src, self.dst = cout, src, dst
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        # [ka, C_in, (kb, C_out)]: x @ mix[ka] is the channel mixing of kernel row ka for all kernel columns at once
        self.mix = weight.permute(2, 1, 3, 0).reshape(3, cin, 3 * cout).contiguous()
        self.resize_a = _shifted_rows(_resize_matrix(src[0], dst[0], **kwargs))  # [ka, A', A]
        self.windows_a = [_row_windows(m, block) for m in self.resize_a]
        # [B', (B, kb)]: the B pass sums over source column and kernel column in one product
        resize_b = _shifted_rows(_resize_matrix(src[1], dst[1], **kwargs))  # [kb, B', B]
        self.resize_b = resize_b.permute(1, 2, 0).reshape(dst[1], 3 * src[1]).contiguous()
        self.windows_b = _row_windows(self.resize_b, block)
        self._buffers: tuple[torch.Tensor, ...] | None = None

    def accumulate_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out [B', A', C_out] += conv3x3(resize(x))`` in place for ``x [A, B, C_in]``; returns ``out``.

        The intermediate buffers are kept and reused by the next call (one plan serves all frames of a decode call:
        fresh multi-megabyte buffers per frame cost as much in page faults as the arithmetic saved).
        """
        (a, b), (a2, b2), cout = self.src, self.dst, self.cout
        if self._buffers is None:
            self._buffers = (
                x.new_empty((3, a * b, 3 * cout)),
                x.new_empty((a2, b * 3 * cout)),
                x.new_empty((b * 3, a2 * cout)),
            )
        mixed, rows, cols = self._buffers  # mixed[ka] = [A, (B, kb, C_out)], rows = [A', (B, kb, C_out)]
        flat = x.reshape(a * b, -1)
        for k in range(3):
            torch.mm(flat, self.mix[k], out=mixed[k])
        mixed = mixed.view(3, a, b * 3 * cout)
        for k in (1, 0, 2):  # A pass; the centre row (k = 1) has no zero rows and initialises ``rows``
            for r0, r1, c0, c1 in self.windows_a[k]:
                if k == 1:
                    torch.mm(self.resize_a[k][r0:r1, c0:c1], mixed[k][c0:c1], out=rows[r0:r1])
                else:
                    rows[r0:r1].addmm_(self.resize_a[k][r0:r1, c0:c1], mixed[k][c0:c1])
        cols.view(b * 3, a2, cout).copy_(rows.view(a2, b * 3, cout).transpose(0, 1))  # [(B, kb), (A', C_out)]
        cols = cols.view(b * 3, a2 * cout)
        acc = out.view(b2, a2 * cout)
        for r0, r1, c0, c1 in self.windows_b:
            acc[r0:r1].addmm_(self.resize_b[r0:r1, c0:c1], cols[c0:c1])
        return out
