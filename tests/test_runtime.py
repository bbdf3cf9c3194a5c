"""Scoped runtime settings: channels-last convolutions, chunked feed-forward, single-key cross-attention — applied
inside the block only, restored after, results unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mofa.pipelines.runtime import channels_last_convs, chunked_feed_forward, single_key_cross_attention


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


@pytest.mark.parametrize(
    ("max_bytes", "spatial_chunks", "temporal_chunks"),
    [
        # one spatial unit (sample) = 4 tokens x 128 inner x 8 B = 4 KiB; one temporal unit (frame) = 2·4 rows = 8 KiB
        (1, [(1, 4, 16)] * 6, [(8, 1, 16)] * 3),  # nothing fits: one sample / one frame at a time
        (8192, [(2, 4, 16)] * 3, [(8, 1, 16)] * 3),  # two samples; still one frame
        (12 * 1024, [(3, 4, 16)] * 2, [(8, 1, 16)] * 3),  # three samples (divisor of 6); 1 frame (3 has no 1 < d < 3)
        (64 * 2**20, [(6, 4, 16)], [(8, 3, 16)]),  # everything fits: the unchunked path
    ],
)
def test_chunked_feed_forward_sizes_chunks_by_bytes(max_bytes, spatial_chunks, temporal_chunks):
    """The feed-forward runs on the largest whole number of samples (spatial) / frames (temporal) that divides the
    batch and keeps the inner activation within ``max_chunk_bytes``; numbers unchanged; settings restored."""
    from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock

    torch.manual_seed(0)
    spatial = BasicTransformerBlock(16, 2, 8).double().eval()  # GEGLU inner width 2·4·16 = 128
    temporal = TemporalBasicTransformerBlock(16, 16, 2, 8).double().eval()
    spatial.set_chunk_feed_forward(4, dim=1)  # a user's own setting survives the scope
    x = torch.randn(6, 4, 16, dtype=torch.float64)  # spatial: [B·T, tokens, C]; temporal: [B·tokens, T, C] (T = 3)
    widths: dict[str, list] = {"spatial": [], "temporal": []}
    hooks = [
        b.ff.register_forward_pre_hook(lambda _m, a, k=k: widths[k].append(tuple(a[0].shape)))
        for k, b in (("spatial", spatial), ("temporal", temporal))
    ]
    with torch.no_grad():
        expected = spatial(x), temporal(x, num_frames=3)
        widths = {"spatial": [], "temporal": []}
        with chunked_feed_forward([spatial, None, temporal], max_chunk_bytes=max_bytes):
            got = spatial(x), temporal(x, num_frames=3)
    for h in hooks:
        h.remove()
    assert widths == {"spatial": spatial_chunks, "temporal": temporal_chunks}
    assert all(float((g - e).abs().max()) <= 1e-12 for g, e in zip(got, expected, strict=True))
    assert (spatial._chunk_size, spatial._chunk_dim) == (4, 1) and temporal._chunk_size is None
    assert not spatial._forward_pre_hooks and not temporal._forward_pre_hooks


def _blocks():
    from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock

    torch.manual_seed(0)
    spatial = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12).double().eval()
    temporal = TemporalBasicTransformerBlock(16, 16, 2, 8, cross_attention_dim=12).double().eval()
    return spatial, temporal


def _count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)

    def hook(i):
        def fn(*_):
            counts[i] += 1

        return fn

    return counts, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def test_single_key_cross_attention_equals_full_attention_without_queries():
    """SVD's context is one CLIP token: the softmax over it is 1, so each query's output is the token's value. The
    shortcut must match the full attention (float64) and never project a query or run the attention kernel."""
    spatial, temporal = _blocks()
    x = torch.randn(6, 4, 16, dtype=torch.float64)  # spatial [B·T, tokens, C] with T = 3, 4 tokens
    ctx_spatial = torch.randn(6, 1, 12, dtype=torch.float64)  # one context token per sample
    ctx_temporal = torch.randn(8, 1, 12, dtype=torch.float64)  # temporal blocks: one per [B·tokens] row
    queries, handles = _count_calls([spatial.attn2.to_q, temporal.attn2.to_q, spatial.attn1.to_q])
    with torch.no_grad():
        expected = spatial(x, encoder_hidden_states=ctx_spatial), temporal(x, 3, encoder_hidden_states=ctx_temporal)
        assert queries == [1, 1, 1]
        with single_key_cross_attention([spatial, None, temporal]):
            got = spatial(x, encoder_hidden_states=ctx_spatial), temporal(x, 3, encoder_hidden_states=ctx_temporal)
    for h in handles:
        h.remove()
    assert queries == [1, 1, 2]  # cross-attention queries skipped, self-attention untouched
    assert all(float((g - e).abs().max()) <= 1e-12 for g, e in zip(got, expected, strict=True))
    assert type(spatial.attn2.processor).__name__ == "AttnProcessor2_0"  # restored


def test_single_key_cross_attention_leaves_other_calls_alone():
    """A context of several tokens or an attention mask goes to the wrapped processor (same numbers, queries run);
    the processors are restored also when the block raises."""
    spatial, _ = _blocks()
    attn = spatial.attn2
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ctx = torch.randn(2, 3, 12, dtype=torch.float64)
    mask = torch.zeros(2, 5, 1, dtype=torch.float64)  # additive, [B, queries, keys]
    ctx1 = ctx[:, :1]
    queries, handles = _count_calls([attn.to_q])
    with torch.no_grad():
        expected = attn(x, encoder_hidden_states=ctx), attn(x, encoder_hidden_states=ctx1, attention_mask=mask)
        with single_key_cross_attention([spatial]):
            got = attn(x, encoder_hidden_states=ctx), attn(x, encoder_hidden_states=ctx1, attention_mask=mask)
    for h in handles:
        h.remove()
    assert queries == [4]
    assert all(float((g - e).abs().max()) <= 1e-12 for g, e in zip(got, expected, strict=True))
    original = attn.processor
    with pytest.raises(RuntimeError), single_key_cross_attention([spatial]):
        attn(x, encoder_hidden_states=torch.randn(2, 1, 7, dtype=torch.float64))  # wrong context width
    assert attn.processor is original
