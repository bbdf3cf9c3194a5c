"""Channels-last convolution scope: layout seen by the convolutions, hooks removed, results unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mofa.pipelines.layout import channels_last_convs, want_channels_last


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)).double()


def _recorded_layouts(net: nn.Module, x: torch.Tensor) -> list[bool]:
    seen: list[bool] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    net(x)
    for h in handles:
        h.remove()
    return seen


def test_convs_see_channels_last_inside_the_block_only():
    net = _net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert _recorded_layouts(net, x) == [False, False]
    with channels_last_convs([net, None]):
        # the scope's hooks run before the recorder's (registered first), so both convs get NHWC input
        assert _recorded_layouts(net, x) == [True, True]
    assert _recorded_layouts(net, x) == [False, False]
    with channels_last_convs([net], enabled=False):
        assert _recorded_layouts(net, x) == [False, False]


def test_same_numbers_and_untouched_parameters():
    net = _net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
        with channels_last_convs([net]):
            got = net(x)
    assert float((got - expected).abs().max()) <= 1e-12
    assert all(p.is_contiguous() for p in net.parameters())  # safetensors can still save the module


def test_hooks_removed_on_error():
    net = _net()
    with pytest.raises(RuntimeError), channels_last_convs([net]):
        net(torch.randn(2, 5, 8, 8, dtype=torch.float64))  # wrong channel count
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_auto_rule():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert want_channels_last(None, cpu, 512, 320) is True
    assert want_channels_last(None, cpu, 64, 64) is False
    assert want_channels_last(None, meta, 512, 512) is False
    assert want_channels_last(True, cpu, 64, 64) is True
    assert want_channels_last(False, cpu, 512, 512) is False
