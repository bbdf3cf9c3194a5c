"""Channels-last execution of 2-D convolutions, scoped to one pipeline call.

On a CPU, oneDNN runs a 2-D convolution whose input is channels-last (NHWC) much faster than the same convolution on
an NCHW input at the sizes SVD works at (measured on the full-size SVD-XT UNet, 256x256, 8 frames, CFG batch 2:
~34 s → ~21 s per call; see ``bench/denoise.py``). The outputs equal the NCHW ones up to float32 summation order.

Converting the weights with ``module.to(memory_format=torch.channels_last)`` would do the same but leaves
non-contiguous parameters behind, which ``safetensors`` refuses to save; so instead a forward pre-hook hands every
``nn.Conv2d`` a channels-last input for the duration of a ``with`` block and nothing about the modules changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["CHANNELS_LAST_MIN_SIDE", "channels_last_convs", "want_channels_last"]

CHANNELS_LAST_MIN_SIDE = 256
"""Shortest output side (pixels) from which ``channels_last=None`` (auto) turns channels-last on for a CPU run. Below
it the latents are at most 32 px and the per-convolution layout reorders cost about what they save."""


def want_channels_last(requested: bool | None, device: torch.device, height: int, width: int) -> bool:
    """Resolve a pipeline's ``channels_last`` argument: an explicit bool wins; ``None`` means on for CPU runs whose
    shorter output side is at least :data:`CHANNELS_LAST_MIN_SIDE` pixels, off elsewhere."""
    if requested is not None:
        return bool(requested)
    return device.type == "cpu" and min(height, width) >= CHANNELS_LAST_MIN_SIDE


def _to_channels_last(_module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


@contextmanager
def channels_last_convs(modules: Iterable[nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``nn.Conv2d`` inside ``modules`` receives its 4-D input in channels-last layout.

    Parameters, buffers and state dicts are untouched; the hooks are removed on exit, also on error. ``None`` entries
    (absent optional components) are skipped; ``enabled=False`` makes the block a no-op.
    """
    handles = []
    try:
        if enabled:
            for module in modules:
                if module is None:
                    continue
                for sub in module.modules():
                    if isinstance(sub, nn.Conv2d):
                        handles.append(sub.register_forward_pre_hook(_to_channels_last))
        yield
    finally:
        for handle in handles:
            handle.remove()
