"""Scoped runtime settings: channels-last convolutions, chunked feed-forward, single-key cross-attention, oneDNN
linear layers, retained heap — applied inside the block only, restored after, results unchanged."""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys

import pytest
import torch
from torch import nn

from mofa.pipelines import runtime
from mofa.pipelines.runtime import channels_last_convs, chunked_feed_forward, single_key_cross_attention
from tiny_models import FakeGlibc233, FakeLibc, record_onednn_linears


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


needs_onednn = pytest.mark.skipif(not runtime.onednn_linear_available(), reason="torch build without oneDNN linear")


class _TaggedLinear(nn.Linear):
    """A subclass of nn.Linear (like LoRA-compatible layers): its own forward is left alone."""


def _linears() -> tuple[nn.Module, list[nn.Linear]]:
    torch.manual_seed(0)
    layers = [nn.Linear(24, 40), nn.Linear(40, 16, bias=False), _TaggedLinear(16, 8)]
    return nn.Sequential(layers[0], nn.GELU(), layers[1], layers[2]), layers


@needs_onednn
def test_onednn_linears_match_a_float64_product_inside_the_block_only(monkeypatch):
    """Plain float32 layers (with and without bias, 2-D to 4-D and non-contiguous inputs) go through oneDNN and give
    ``x @ W.T + b`` computed in float64 to float32 rounding; the subclass does not; nothing stays patched after."""
    net, (first, second, tagged) = _linears()
    calls = record_onednn_linears(monkeypatch)
    strided = torch.randn(5, 6, 24).transpose(0, 1)  # non-contiguous
    inputs = [torch.randn(7, 24), torch.randn(3, 5, 24), torch.randn(2, 3, 4, 24), strided]
    with torch.no_grad(), runtime.onednn_linears([None, net]):
        assert "forward" in vars(first) and "forward" in vars(second) and "forward" not in vars(tagged)
        outs = [net(x) for x in inputs]
    assert [shape for shape, _ in calls] == [(*x.shape[:-1], n) for x in inputs for n in (24, 40)]  # not the subclass
    w1, b1, w2, w3, b3 = (t.detach().double() for t in (first.weight, first.bias, second.weight, *tagged.parameters()))
    for x, out in zip(inputs, outs, strict=True):
        expected = torch.nn.functional.gelu(x.double() @ w1.T + b1) @ w2.T @ w3.T + b3
        assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], 8)
        assert float((out.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert all("forward" not in vars(m) for m in net.modules())
    with torch.no_grad():
        net(inputs[0])
    assert len(calls) == 2 * len(inputs)  # outside the block: the stock path


@needs_onednn
def test_onednn_linears_leave_other_calls_alone(monkeypatch):
    """float64 inputs, calls that need autograd, an existing instance ``forward`` (accelerate's hooks), a disabled or
    unavailable block and a block that raises all leave the stock path in place."""
    net, (first, second, _) = _linears()
    calls = record_onednn_linears(monkeypatch)
    x = torch.randn(4, 24)
    with runtime.onednn_linears([net]):
        y64 = first.double()(x.double())
        first.float()
        y = first(x)  # grad mode on, parameters require grad: stock addmm, differentiable
        y.sum().backward()
    assert calls == [] and y.grad_fn is not None and first.weight.grad is not None
    assert torch.equal(y64, torch.nn.functional.linear(x.double(), first.weight.double(), first.bias.double()))
    wrapper = functools.partial(nn.Linear.forward, second)
    second.forward = wrapper
    with torch.no_grad(), runtime.onednn_linears([net]):
        second(torch.randn(2, 40))
        assert second.forward is wrapper
    assert second.forward is wrapper and calls == []
    del second.forward
    with torch.no_grad(), runtime.onednn_linears([net], enabled=False):
        net(x)
    monkeypatch.setattr(runtime, "onednn_linear_available", lambda: False)
    with torch.no_grad(), runtime.onednn_linears([net]):
        net(x)
    assert calls == [] and all("forward" not in vars(m) for m in net.modules())
    monkeypatch.undo()
    with pytest.raises(RuntimeError), torch.no_grad(), runtime.onednn_linears([net]):
        net(torch.randn(4, 23))  # wrong width
    assert all("forward" not in vars(m) for m in net.modules())


HEAP_PROBE = """
import ctypes, json, resource, sys
from mofa.pipelines import runtime

BLOCK = int(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def pair_faults():
    # minor page faults of a BLOCK-byte malloc, written and freed twice in a row, over four tries
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for value in (1, 2):
            block = libc.malloc(BLOCK)
            ctypes.memset(block, value, BLOCK)
            libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


out = {"before": pair_faults()}
with runtime.retained_heap(enabled=False):
    out["disabled"] = pair_faults()
with runtime.retained_heap():
    out["noted"] = runtime.trim_retained_heap()  # notes the heap's size, trims nothing
    out["inside"] = pair_faults()
    with runtime.retained_heap():
        pass
    out["after_nested"] = pair_faults()
    rss_inside = rss()
    out["trimmed"] = runtime.trim_retained_heap()  # the heap grew by a block since: trims
    out["rss_trimmed"] = rss_inside - rss()
    out["after_trim"] = pair_faults()
    rss_inside = rss()
out["rss_freed"] = rss_inside - rss()
json.dump(out, sys.stdout)
"""
PROBE_BLOCK_BYTES = 96 * 2**20
"""Above glibc's largest dynamic mmap (32 MiB) and trim (64 MiB) thresholds: mmapped afresh by default."""


@pytest.mark.skipif(runtime._glibc() is None, reason="retained_heap acts on glibc only")
def test_retained_heap_reuses_freed_blocks_inside_the_block_only():
    """In a fresh process (so no earlier block has left reusable memory behind): before and with ``enabled=False``
    glibc unmaps every freed 96 MiB block and the next one faults all its pages in again; inside, once the heap has
    grown (the first pair), every freed block is reused without a fault, also after a nested block ended;
    :func:`runtime.trim_retained_heap` hands the retained block back (RSS drops by at least a block) and the heap then
    grows once more and is reused again; on exit the retained memory goes back to the OS.

    The probe calls ``malloc``/``free`` itself: that is what the thresholds govern, and it is deterministic. Torch's
    CPU allocator asks for 64-byte alignment (``posix_memalign``), which leaves slivers of 32-96 bytes beside each
    block; glibc's per-thread cache holds them, so a freed block sometimes cannot merge back into the top of the heap
    and the next block of the same size (a few bytes larger inside ``memalign``) does not fit it. With torch tensors
    in this probe, the second pair faulted again in 10 of 30 fresh processes and 4 of 30 still did on the fourth pair
    (none of 30 with ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``): see :func:`runtime.trim_retained_heap`."""
    probe = [sys.executable, "-c", HEAP_PROBE, str(PROBE_BLOCK_BYTES)]
    done = subprocess.run(probe, capture_output=True, text=True, check=True, timeout=120)
    out = json.loads(done.stdout)
    pages = PROBE_BLOCK_BYTES // resource.getpagesize()
    assert min(out["before"]) > pages and min(out["disabled"]) > pages, out  # each pair: two blocks faulted in
    assert out["inside"][0] >= pages * 3 // 4, out  # the heap grows by one block, the second one reuses it
    assert max(out["inside"][1:] + out["after_nested"]) < pages // 16, out
    noting = hasattr(runtime._glibc(), "mallinfo2")  # glibc 2.33+: the first call only notes the heap's size
    assert (out["noted"], out["trimmed"]) == (not noting, True), out
    assert out["rss_trimmed"] >= PROBE_BLOCK_BYTES, out
    assert out["after_trim"][0] >= pages * 3 // 4 and max(out["after_trim"][1:]) < pages // 16, out
    assert out["rss_freed"] >= PROBE_BLOCK_BYTES, out


def test_retained_heap_disabled_or_without_glibc_is_a_no_op(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with runtime.retained_heap(enabled=False):
        assert runtime._heap_depth == 0
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    with runtime.retained_heap():
        assert runtime._heap_depth == 0
    assert libc.calls == []


def test_retained_heap_restored_on_error(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: FakeLibc())
    with pytest.raises(RuntimeError, match="boom"), runtime.retained_heap():
        assert runtime._heap_depth == 1
        raise RuntimeError("boom")
    assert runtime._heap_depth == 0


def test_retained_heap_sets_and_restores_the_thresholds(monkeypatch):
    """The allocator calls, on any platform: both thresholds to 1 GiB on entry (once for nested blocks); on exit
    the values glibc's dynamic rule ends at (mmap 32 MiB, trim 64 MiB) and the retained memory trimmed."""
    libc = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with runtime.retained_heap(), runtime.retained_heap():
        assert libc.calls == [("mallopt", -3, 2**30), ("mallopt", -1, 2**30)]
    assert libc.calls[2:] == [("mallopt", -3, 32 * 2**20), ("mallopt", -1, 64 * 2**20), ("malloc_trim", 0)]


def test_trim_retained_heap_acts_inside_the_block_only(monkeypatch):
    """Without ``mallinfo2`` (glibc < 2.33) every call inside the block trims; outside it, none does."""
    libc = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    assert runtime.trim_retained_heap() is False
    with runtime.retained_heap():
        assert runtime.trim_retained_heap() is True
        assert libc.calls[-1] == ("malloc_trim", 0)
        assert runtime.trim_retained_heap() is True
    with runtime.retained_heap(enabled=False):
        assert runtime.trim_retained_heap() is False
    assert libc.calls.count(("malloc_trim", 0)) == 3  # the two asked for inside, the one on exit


def test_trim_retained_heap_trims_only_when_the_heap_grew(monkeypatch):
    """With ``mallinfo2``: the first call of a block notes the heap's size; later calls trim only when it has grown
    since the previous call; a new block starts noting afresh; ``always=True`` trims every time."""
    libc = FakeGlibc233()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    trimmed = []
    for _ in range(2):
        with runtime.retained_heap():
            for heap in (100, 100, 120, 120, 110, 130):
                libc.heap = heap
                trimmed.append(runtime.trim_retained_heap())
    assert trimmed == [False, False, True, False, False, True] * 2
    with runtime.retained_heap():
        assert runtime.trim_retained_heap(always=True) is True  # whatever the heap did
        assert runtime.trim_retained_heap(always=True) is True
    # per noting block: two grown steps and the exit; the always block: two calls and the exit
    assert libc.calls.count(("malloc_trim", 0)) == 2 * (2 + 1) + (2 + 1)
