"""Tests of mofa.flow.softsplat against hand-computed cases (spec §11 item 8) and a slow per-pixel loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mofa.flow.softsplat import (
    INFERENCE_ENGINES,
    SPLAT_MODES,
    _inference_engine,
    _splat,
    _splat_inference,
    softsplat,
    softsplat_with_weight,
)

EPS = 1e-7


def slow_softsplat(src, flow, mode="avg", metric=None, eps=EPS):
    """Independent per-pixel python loop of the spec §8 kernel, accumulating in float64.

    Like the CUDA kernel, the target ``X = x + flow`` is rounded to the flow's precision (float32 for float32
    flows) before the bilinear weights are taken from it; everything after that is float64.
    """
    batch, channels, height, width = src.shape
    rounding = np.float32 if flow.dtype == torch.float32 else np.float64
    src = src.double()
    num = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    den = torch.zeros(batch, height, width, dtype=torch.float64)
    for b in range(batch):
        if mode == "soft":
            peak = max(v for v in metric[b].double().flatten().tolist() if math.isfinite(v))
        for y in range(height):
            for x in range(width):
                tx = float(rounding(x) + rounding(flow[b, 0, y, x].item()))
                ty = float(rounding(y) + rounding(flow[b, 1, y, x].item()))
                if not (math.isfinite(tx) and math.isfinite(ty)):
                    continue
                if mode in ("sum", "avg"):
                    m = 1.0
                elif mode == "linear":
                    m = float(metric[b, 0, y, x])
                else:
                    m = math.exp(float(metric[b, 0, y, x]) - peak)
                x0, y0 = math.floor(tx), math.floor(ty)
                corners = (
                    (x0, y0, (x0 + 1 - tx) * (y0 + 1 - ty)),
                    (x0 + 1, y0, (tx - x0) * (y0 + 1 - ty)),
                    (x0, y0 + 1, (x0 + 1 - tx) * (ty - y0)),
                    (x0 + 1, y0 + 1, (tx - x0) * (ty - y0)),
                )
                for cx, cy, w in corners:
                    if 0 <= cx <= width - 1 and 0 <= cy <= height - 1:
                        num[b, :, cy, cx] += src[b, :, y, x] * m * w
                        den[b, cy, cx] += m * w
    if mode == "sum":
        return num
    return num / (den[:, None] + eps)


def test_zero_flow_is_identity():
    x = torch.rand(2, 3, 7, 9)
    out = softsplat(x, torch.zeros(2, 2, 7, 9))
    torch.testing.assert_close(out, x / (1 + EPS), rtol=0, atol=1e-7)
    torch.testing.assert_close(softsplat(x, torch.zeros(2, 2, 7, 9), mode="sum"), x, rtol=0, atol=0)


@pytest.mark.parametrize("shift", [(2, 0), (0, 3), (-1, -2), (3, 1)])
def test_integer_shift_moves_pixels_exactly(shift):
    sx, sy = shift
    x = torch.rand(1, 2, 8, 10)
    flow = torch.zeros(1, 2, 8, 10)
    flow[:, 0], flow[:, 1] = sx, sy
    out = softsplat(x, flow, mode="sum")
    expected = torch.zeros_like(x)
    h, w = 8, 10
    expected[..., max(sy, 0) : h + min(sy, 0), max(sx, 0) : w + min(sx, 0)] = x[
        ..., max(-sy, 0) : h - max(sy, 0), max(-sx, 0) : w - max(sx, 0)
    ]
    assert torch.equal(out, expected)
    # The uncovered band is exactly zero in 'avg' mode too.
    avg = softsplat(x, flow)
    band = (expected == 0).all(dim=1)
    assert band.sum() > 0
    assert torch.all(avg[:, :, band[0]] == 0)


def test_half_pixel_shift_splits_and_avg_renormalises():
    x = torch.zeros(1, 1, 1, 4)
    x[0, 0, 0, 1] = 2.0
    flow = torch.full((1, 2, 1, 4), 0.0)
    flow[:, 0] = 0.5
    out = softsplat(x, flow, mode="sum")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    out, weight = softsplat_with_weight(torch.full((1, 1, 1, 4), 3.0), flow)
    # Pixel 0 only gets half of source 0; 'avg' divides it back to the source value.
    torch.testing.assert_close(weight[0, 0, 0], torch.tensor([0.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(out[0, 0, 0], torch.full((4,), 3.0), rtol=1e-6, atol=1e-6)


def test_sum_conserves_mass_when_all_lands_inside():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 12, generator=gen)
    flow = torch.rand(3, 2, 12, 12, generator=gen) * 4 - 2
    x[..., :2, :] = 0
    x[..., -2:, :] = 0
    x[..., :, :2] = 0
    x[..., :, -2:] = 0
    out = softsplat(x, flow, mode="sum")
    torch.testing.assert_close(out.sum(dim=(2, 3)), x.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_collisions_are_averaged():
    x = torch.tensor([[[[1.0, 5.0, 0.0]]]])
    flow = torch.zeros(1, 2, 1, 3)
    flow[0, 0, 0, 0] = 2.0  # pixel 0 lands on pixel 2
    flow[0, 0, 0, 1] = 1.0  # pixel 1 lands on pixel 2
    flow[0, 0, 0, 2] = -2.0  # pixel 2 lands on pixel 0
    out = softsplat(x, flow)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.0, 3.0]), rtol=1e-6, atol=1e-6)


def test_out_of_range_targets_are_dropped_individually():
    x = torch.ones(1, 1, 3, 3)
    flow = torch.zeros(1, 2, 3, 3)
    flow[0, 0] = 0.25  # right column's right neighbour falls off the grid
    out = softsplat(x, flow, mode="sum")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 1.0, 1.0]))
    flow[0, 0] = 100.0
    flow[0, 1] = -1e30
    assert torch.equal(softsplat(x, flow, mode="sum"), torch.zeros_like(x))


def test_non_finite_flow_is_ignored():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    flow = torch.zeros(1, 2, 3, 3)
    flow[0, 0, 1, 1] = float("nan")
    flow[0, 1, 0, 0] = float("inf")
    flow[0, 0, 2, 2] = -float("inf")
    out = softsplat(x, flow, mode="sum")
    expected = x.clone()
    expected[0, 0, 1, 1] = expected[0, 0, 0, 0] = expected[0, 0, 2, 2] = 0
    assert torch.equal(out, expected)
    assert torch.isfinite(softsplat(x, flow)).all()


@pytest.mark.parametrize("mode", ["sum", "avg", "linear", "soft"])
def test_batched_matches_slow_loop(mode):
    gen = torch.Generator().manual_seed(1)
    batch, channels, height, width = 3, 2, 6, 7
    x = torch.rand(batch, channels, height, width, generator=gen)
    flow = torch.randn(batch, 2, height, width, generator=gen) * 2.5
    flow[0, :, 0, 0] = 0.0  # exact integer targets
    flow[1, 0, 2, 3] = float("nan")
    metric = None
    if mode == "linear":
        metric = torch.rand(batch, 1, height, width, generator=gen) + 0.1
    elif mode == "soft":
        metric = torch.randn(batch, 1, height, width, generator=gen) * 3
    out = softsplat(x, flow, mode=mode, metric=metric)
    ref = slow_softsplat(x, flow, mode=mode, metric=metric)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    metric64 = None if metric is None else metric.double()
    out64 = softsplat(x.double(), flow.double(), mode=mode, metric=metric64)
    ref64 = slow_softsplat(x.double(), flow.double(), mode=mode, metric=metric64)
    torch.testing.assert_close(out64, ref64, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["avg", "soft"])
def test_autograd_path_equals_inference_path(mode):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 9, 8, generator=gen)
    flow = torch.randn(2, 2, 9, 8, generator=gen) * 2
    metric = torch.randn(2, 1, 9, 8, generator=gen) if mode == "soft" else None
    with torch.no_grad():
        fast, fast_w = softsplat_with_weight(x, flow, mode=mode, metric=metric)
    slow, slow_w = softsplat_with_weight(x.requires_grad_(True), flow, mode=mode, metric=metric)
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(slow.detach(), fast, rtol=0, atol=0)
    torch.testing.assert_close(slow_w.detach(), fast_w, rtol=0, atol=0)


def test_soft_mode_is_safe_for_large_metrics():
    x = torch.rand(1, 2, 5, 5)
    flow = torch.randn(1, 2, 5, 5)
    metric = torch.randn(1, 1, 5, 5)
    a = softsplat(x, flow, mode="soft", metric=metric)
    b = softsplat(x, flow, mode="soft", metric=metric + 1000.0)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_with_weight_matches_softsplat_and_marks_holes():
    x = torch.rand(2, 3, 6, 6)
    flow = torch.zeros(2, 2, 6, 6)
    flow[:, 0] = 2.0
    out, weight = softsplat_with_weight(x, flow)
    assert weight.shape == (2, 1, 6, 6)
    assert torch.equal(out, softsplat(x, flow))
    assert torch.all(weight[..., :2] == 0) and torch.all(weight[..., 2:] == 1)


def test_gradcheck_src_and_flow():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    # Non-integer positions keep floor() locally constant, where the function is smooth.
    flow = (torch.rand(2, 2, 4, 5, generator=gen, dtype=torch.float64) * 1.6 - 0.8 + 0.1).requires_grad_(True)
    metric = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    for mode in ("sum", "avg"):
        assert torch.autograd.gradcheck(lambda a, f, mode=mode: softsplat(a, f, mode=mode), (x, flow), eps=1e-6)
    for mode in ("linear", "soft"):
        assert torch.autograd.gradcheck(
            lambda a, f, m, mode=mode: softsplat(a, f, mode=mode, metric=m + 0.5), (x, flow, metric), eps=1e-6
        )


def test_half_precision_input_gives_half_output():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 4, 16, 16, generator=gen)
    flow = torch.randn(2, 2, 16, 16, generator=gen) * 3
    ref = softsplat(x, flow)
    for dtype in (torch.float16, torch.bfloat16):
        out = softsplat(x.to(dtype), flow.to(dtype))
        assert out.dtype == dtype
        ref_d = softsplat(x.to(dtype).float(), flow.to(dtype).float())
        # Same inputs after rounding: only the final cast differs.
        torch.testing.assert_close(out.float(), ref_d, rtol=1e-2, atol=1e-2)
    out16 = softsplat(x.half(), flow)
    torch.testing.assert_close(out16.float(), ref, rtol=2e-3, atol=2e-3)


def test_bad_shapes_raise_value_error():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="flow"):
        softsplat(x, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        softsplat(x, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="src"):
        softsplat(x[0], torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="metric"):
        softsplat(x, torch.zeros(2, 2, 4, 4), mode="soft")
    with pytest.raises(ValueError, match="metric"):
        softsplat(x, torch.zeros(2, 2, 4, 4), mode="linear", metric=torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match="takes no metric"):
        softsplat(x, torch.zeros(2, 2, 4, 4), mode="avg", metric=torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown softsplat mode"):
        softsplat(x, torch.zeros(2, 2, 4, 4), mode="max")


def test_channels_last_input_matches_contiguous() -> None:
    src = torch.rand(2, 5, 7, 9)
    flow = torch.randn(2, 2, 7, 9) * 2
    expected = softsplat(src, flow, mode="avg")
    got = softsplat(src.to(memory_format=torch.channels_last), flow.to(memory_format=torch.channels_last), mode="avg")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --- no-grad inference engines (sparse CSR product, chunked scatter, batched scatter) ---

SPARSE_AVAILABLE = _inference_engine(torch.empty(1, 64, 64, 64)) == "sparse"
needs_sparse = pytest.mark.skipif(not SPARSE_AVAILABLE, reason="the sparse engine needs Linux and PyTorch with MKL")


def _hard_case(gen, batch, channels, height, width, dtype):
    """Random src and flow with the awkward cases: NaN/inf flow, targets fully or partly off the grid, integers."""
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=dtype)
    flow = (torch.randn(batch, 2, height, width, generator=gen) * 3).to(dtype)
    flow[0, 0, 0, 0] = float("nan")
    flow[0, 1, 1, 2] = float("inf")
    flow[-1, 0, -1, -1] = -float("inf")
    flow[-1, :, 2, 3] = 40.0  # lands fully outside: dropped
    flow[0, 0, 3, :] = -0.5  # left column half off the grid
    flow[0, :, 4, 1] = 2.0  # exact integer target
    return x, flow


def _metric(gen, mode, batch, height, width, dtype):
    if mode == "linear":
        return (torch.rand(batch, 1, height, width, generator=gen) + 0.1).to(dtype)
    if mode == "soft":
        return (torch.randn(batch, 1, height, width, generator=gen) * 3).to(dtype)
    return None


def test_inference_engine_rule():
    assert _inference_engine(torch.empty(2, 3, 512, 512)) == "chunked"  # preview-like RGB
    assert _inference_engine(torch.empty(2, 16, 64, 64)) == "chunked"
    assert _inference_engine(torch.empty(2, 320, 8, 8)) == "chunked"  # C·H·W too small to pay for the matrices
    assert _inference_engine(torch.empty(2, 320, 64, 64, device="meta")) == "batched"
    assert _inference_engine(torch.empty(2, 320, 64, 64)) == ("sparse" if SPARSE_AVAILABLE else "chunked")
    with pytest.raises(ValueError, match="unknown softsplat engine"):
        _splat_inference(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), None, None, False, engine="cuda")


@pytest.mark.parametrize("engine", INFERENCE_ENGINES)
@pytest.mark.parametrize("mode", SPLAT_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 40])
def test_inference_engines_match_autograd_path(engine, mode, dtype, channels):
    if engine == "sparse" and not SPARSE_AVAILABLE:
        pytest.skip("the sparse engine needs Linux and PyTorch with MKL")
    gen = torch.Generator().manual_seed(5)
    x, flow = _hard_case(gen, 3, channels, 9, 11, dtype)
    metric = _metric(gen, mode, 3, 9, 11, dtype)
    norm = None if metric is None else (metric if mode == "linear" else torch.exp(metric - metric.amax()))
    eps = None if mode == "sum" else EPS
    out, weight = _splat_inference(x, flow, norm, eps, with_weight=True, engine=engine)
    out_only, no_weight = _splat_inference(x, flow, norm, eps, with_weight=False, engine=engine)
    assert no_weight is None and torch.equal(out, out_only)
    splat = _splat(x.requires_grad_(True), flow, norm=norm, append_norm=True)  # the autograd path
    expected = splat[:, :-1] if eps is None else splat[:, :-1] / (splat[:, -1:] + eps)
    assert out.dtype == weight.dtype == dtype and out.is_contiguous() and not out.requires_grad
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight, splat[:, -1:].detach(), rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()


@needs_sparse
@pytest.mark.parametrize("mode", SPLAT_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_engine_matches_slow_loop(mode, dtype):
    gen = torch.Generator().manual_seed(6)
    batch, channels, height, width = 2, 32, 32, 32  # large enough for the dispatcher to pick the sparse engine
    x, flow = _hard_case(gen, batch, channels, height, width, dtype)
    metric = _metric(gen, mode, batch, height, width, dtype)
    assert _inference_engine(x) == "sparse"
    with torch.no_grad():
        out, weight = softsplat_with_weight(x, flow, mode=mode, metric=metric)
        plain = softsplat(x, flow, mode=mode, metric=metric)
    assert torch.equal(out, plain)
    ref = slow_softsplat(x, flow, mode=mode, metric=metric)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    slow_out, slow_weight = softsplat_with_weight(x.requires_grad_(True), flow, mode=mode, metric=metric)
    assert slow_out.requires_grad
    torch.testing.assert_close(out, slow_out.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight, slow_weight.detach(), rtol=0, atol=1e-6)


@needs_sparse
def test_no_grad_takes_the_sparse_engine():
    """The dispatcher runs the sparse product without grad and the single scatter with grad (seen by the profiler)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 40, 32, 32, generator=gen)
    flow = torch.randn(2, 2, 32, 32, generator=gen) * 3

    def ops(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {event.key for event in prof.key_averages()}

    with torch.no_grad():
        assert "aten::addmm" in ops(lambda: softsplat(x, flow))
    assert "aten::addmm" in ops(lambda: softsplat(x, flow))  # grad mode on, but nothing requires grad
    assert "aten::addmm" not in ops(lambda: softsplat(x.requires_grad_(True), flow))
    with torch.no_grad():
        assert "aten::addmm" not in ops(lambda: softsplat(x[:, :3], flow))  # RGB: chunked scatter


@needs_sparse
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_engine_half_precision_equals_autograd_path(dtype):
    gen = torch.Generator().manual_seed(8)
    x, flow = _hard_case(gen, 2, 40, 32, 32, torch.float32)
    x, flow = x.to(dtype), flow.to(dtype)
    with torch.no_grad():
        fast = softsplat(x, flow)
    slow = softsplat(x.requires_grad_(True), flow)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), slow.detach().float(), rtol=0, atol=1e-6)


@needs_sparse
def test_sparse_engine_channels_last_and_expanded_inputs():
    gen = torch.Generator().manual_seed(9)
    x, flow = _hard_case(gen, 3, 40, 32, 32, torch.float32)
    with torch.no_grad():
        expected = softsplat(x, flow)
        got = softsplat(x.to(memory_format=torch.channels_last), flow)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        # The adapter warps one feature by several flows: a stride-0 batch must work as well.
        shared = x[:1].expand(3, -1, -1, -1)
        torch.testing.assert_close(softsplat(shared, flow), softsplat(shared.contiguous(), flow), rtol=0, atol=1e-6)
