"""MofaVideoPipeline on tiny random-init SVD + adapter (CPU, seconds).

Invariant: with the adapter's zero convs at zero (fresh init) the pipeline IS Stable Video Diffusion: its output equals
diffusers' ``StableVideoDiffusionPipeline`` for the same seed. Argument mapping (default mode): ``fps`` and
``noise_aug_strength`` are passed unchanged (both pipelines condition on ``fps - 1``), ``motion_bucket_id`` is passed
explicitly (our default is 128, diffusers' 127), and both get the same PIL image (CLIP: [-1,1] blur-resize + CLIP
mean/std in both). ``reference_mode`` differs from stock SVD only by the un-normalised CLIP input, so it equals a
stock pipeline whose feature extractor has mean 0 / std 1.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from mofa.errors import MofaInputError
from mofa.pipelines import runtime
from mofa.pipelines.pipeline_mofa import MofaVideoPipeline, MofaVideoPipelineOutput
from tiny_models import (
    FakeGlibc233,
    build_tiny_pipeline,
    build_tiny_svd,
    pipeline_runtime,
    record_onednn_linears,
)

STEPS = 3
FRAMES = 6
JOINT = {"low_memory": False}
"""Guidance halves as one batch, as diffusers' SVD pipeline runs them: compared with it like with like (our CPU
default runs them one after the other: same numbers in float64, float32 rounding apart)."""


@pytest.fixture(scope="module")
def parts():
    return build_tiny_svd()


@pytest.fixture(scope="module")
def zero_pipe(parts):
    return build_tiny_pipeline(parts, zero_adapter=True)


@pytest.fixture(scope="module")
def live_pipe(parts):
    return build_tiny_pipeline(parts, zero_adapter=False)


@pytest.fixture(scope="module")
def live_pipe64(live_pipe):
    """float64 copy: batch-size-dependent float32 rounding (~1e-6) is amplified ~100x by the random tiny UNet, so
    "same computation" claims are checked in float64 where they hold to ~1e-12."""
    return copy.deepcopy(live_pipe).to(torch.float64)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def flow():
    return torch.randn(FRAMES - 1, 2, 64, 64, generator=torch.Generator().manual_seed(5)) * 4


def run(pipe, image, seed=0, **kwargs):
    kwargs.setdefault("num_frames", FRAMES)
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kwargs)


def stock_svd(parts, image, seed=0, feature_extractor=None, runtime=True, **kwargs):
    """diffusers' SVD pipeline; ``runtime`` = its UNet under our pipeline's default runtime scopes
    (:func:`tiny_models.pipeline_runtime`)."""
    components = dict(parts)
    if feature_extractor is not None:
        components["feature_extractor"] = feature_extractor
    svd = StableVideoDiffusionPipeline(**components)
    svd.set_progress_bar_config(disable=True)
    with pipeline_runtime(svd, enabled=runtime):
        return svd(
            image,
            height=64,
            width=64,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            decode_chunk_size=8,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            **kwargs,
        ).frames


def test_output_shapes_and_range(zero_pipe, image, flow):
    out = run(zero_pipe, image, flow=flow)
    assert isinstance(out, MofaVideoPipelineOutput)
    assert out.frames.shape == (1, FRAMES, 3, 64, 64)
    assert out.flow.shape == (1, FRAMES - 1, 2, 64, 64)
    torch.testing.assert_close(out.flow[0], flow)
    assert float(out.frames.min()) >= 0.0 and float(out.frames.max()) <= 1.0
    pil = run(zero_pipe, image, flow=flow, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (64, 64)


def test_zero_adapter_equals_stock_svd(parts, zero_pipe, image, flow):
    ours = run(zero_pipe, image, flow=flow, fps=7, motion_bucket_id=128, noise_aug_strength=0.02, **JOINT).frames
    stock = stock_svd(parts, image, fps=7, motion_bucket_id=128, noise_aug_strength=0.02)
    assert float((ours - stock).abs().max()) <= 1e-5
    # other micro-conditioning values are honoured the same way as stock SVD (fps - 1, bucket, aug)
    ours = run(zero_pipe, image, flow=flow, fps=12, motion_bucket_id=30, noise_aug_strength=0.1, **JOINT).frames
    stock = stock_svd(parts, image, fps=12, motion_bucket_id=30, noise_aug_strength=0.1)
    assert float((ours - stock).abs().max()) <= 1e-5
    # without feed-forward chunking, the cross-attention shortcut and oneDNN linears on both sides: diffusers' and
    # torch's arithmetic throughout
    stock_ways = {"chunk_feed_forward": False, "shortcut_cross_attention": False, "onednn_linear": False}
    ours = run(zero_pipe, image, flow=flow, **stock_ways, **JOINT).frames
    stock = stock_svd(parts, image, motion_bucket_id=128, runtime=False)
    assert float((ours - stock).abs().max()) <= 1e-5


def test_default_micro_conditioning_is_the_reference_value(parts, zero_pipe, image):
    """Defaults fps=7 → 6, motion_bucket_id=128, noise_aug 0.02: the reference's hard-coded [6, 128, 0.02]."""
    ours = run(zero_pipe, image, **JOINT).frames
    stock = stock_svd(parts, image, fps=7, motion_bucket_id=128, noise_aug_strength=0.02)
    assert float((ours - stock).abs().max()) <= 1e-5
    ref = run(zero_pipe, image, reference_mode=True, fps=30, motion_bucket_id=1, **JOINT).frames
    assert not torch.allclose(ref, ours)  # reference mode differs (CLIP input) ...
    # ... only by the un-normalised CLIP input, ids fixed. Compared in float64: the reference resizes [0, 1] where
    # stock SVD resizes [-1, 1] and maps back, equal up to float32 rounding that the random UNet amplifies to ~1e-4
    # (how much depends on the CPU's SIMD path); float64 weights leave the float32 CLIP preprocessing (~1e-5).
    parts64 = {
        k: v.to(torch.float64) if isinstance(v, torch.nn.Module) else v for k, v in copy.deepcopy(parts).items()
    }
    pipe64 = build_tiny_pipeline(parts64, zero_adapter=True).to(torch.float64)
    ref = run(pipe64, image, reference_mode=True, fps=30, motion_bucket_id=1, **JOINT).frames
    unnormalised = copy.deepcopy(parts["feature_extractor"])
    unnormalised.image_mean, unnormalised.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    stock_ref = stock_svd(parts64, image, feature_extractor=unnormalised, fps=7, motion_bucket_id=128)
    assert float((ref - stock_ref).abs().max()) <= 5e-5


def test_reference_mode_conditioning_values(zero_pipe, image):
    """spec §11.13: ids [6,128,0.02]×2 whatever the args; CLIP input in [0, 1]; zero negatives; unscaled latents."""
    seen = {}

    def unet_hook(module, args, kwargs):
        seen.setdefault("ids", kwargs["added_time_ids"].clone())
        seen.setdefault("ehs", kwargs["encoder_hidden_states"].clone())
        seen.setdefault("sample", args[0].clone())

    def clip_hook(module, args):
        seen["clip"] = args[0].clone()

    h1 = zero_pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    h2 = zero_pipe.image_encoder.register_forward_pre_hook(clip_hook)
    try:
        run(zero_pipe, image, reference_mode=True, fps=25, motion_bucket_id=3, noise_aug_strength=0.0, **JOINT)
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(seen["ids"], torch.tensor([[6.0, 128.0, 0.02]] * 2))
    x01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(seen["clip"], _resize_with_antialiasing(x01, (224, 224)))  # [0, 1], no mean/std
    assert float(seen["ehs"][0].abs().max()) == 0.0 and float(seen["ehs"][1].abs().max()) > 0
    image_latents = seen["sample"][:, :, 4:]
    assert float(image_latents[0].abs().max()) == 0.0  # CFG negative = zeros
    vae_in = zero_pipe.video_processor.preprocess(image, 64, 64)
    mode = zero_pipe.vae.encode(vae_in).latent_dist.mode()  # noise_aug 0 → exactly the unscaled mode
    torch.testing.assert_close(image_latents[1, 0], mode[0], atol=1e-5, rtol=1e-5)


def test_cached_reference_features_equal_uncached(live_pipe64, image, flow):
    cached = run(live_pipe64, image, flow=flow, conditioning_scale=0.6).frames
    uncached = run(live_pipe64, image, flow=flow, conditioning_scale=0.6, cache_reference=False).frames
    assert float((cached - uncached).abs().max()) <= 1e-10


def test_low_memory_equals_batched_guidance(live_pipe64, image, flow):
    """Guidance halves as one batch of 2 or one after the other: same video. The default (``low_memory=None``) runs
    them one after the other on a CPU (faster there, bench/denoise.py)."""
    batches: list[int] = []
    handle = live_pipe64.unet.register_forward_pre_hook(lambda _m, a: batches.append(a[0].shape[0]))
    try:
        batched = run(live_pipe64, image, flow=flow, low_memory=False).frames
        assert batches == [2] * STEPS
        batches.clear()
        low = run(live_pipe64, image, flow=flow, low_memory=True).frames
        assert batches == [1] * (2 * STEPS)
        batches.clear()
        default = run(live_pipe64, image, flow=flow).frames
        assert batches == [1] * (2 * STEPS)
    finally:
        handle.remove()
    assert float((batched - low).abs().max()) <= 1e-10
    assert torch.equal(default, low)


def test_retained_heap_spans_the_call_and_leaves_the_same_video(live_pipe64, image, flow, monkeypatch):
    """``retain_heap`` (default on) holds the allocator setting while the UNet runs and drops it after the call,
    trimming the heap after a step only if it grew (here it never does), or after every step with an explicit
    ``low_memory=True``; the video is the same either way."""
    libc = FakeGlibc233()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)  # count the scope and the trims on any C library
    depths: list[int] = []
    handle = live_pipe64.unet.register_forward_pre_hook(lambda _m, _a: depths.append(runtime._heap_depth))
    try:
        kept = run(live_pipe64, image, flow=flow).frames
        assert depths and set(depths) == {1}
        assert runtime._heap_depth == 0
        assert libc.calls.count(("malloc_trim", 0)) == 1  # on exit only
        libc.calls.clear()
        run(live_pipe64, image, flow=flow, low_memory=True, num_inference_steps=2)
        assert libc.calls.count(("malloc_trim", 0)) == 2 + 1  # after each step, and on exit
        depths.clear()
        libc.calls.clear()
        plain = run(live_pipe64, image, flow=flow, retain_heap=False).frames
        assert depths and set(depths) == {0}
        assert libc.calls == []
    finally:
        handle.remove()
    assert torch.equal(kept, plain)


def test_adapter_controls_the_video(parts, live_pipe, image, flow):
    base = stock_svd(parts, image, motion_bucket_id=128)
    driven = run(live_pipe, image, flow=flow, **JOINT).frames
    assert float((driven - base).abs().max()) > 1e-3
    off = run(live_pipe, image, flow=flow, conditioning_scale=0.0, **JOINT).frames
    assert float((off - base).abs().max()) <= 1e-5


def test_seed_reproducibility(live_pipe, image, flow):
    a = run(live_pipe, image, flow=flow, seed=42).frames
    b = run(live_pipe, image, flow=flow, seed=42).frames
    c = run(live_pipe, image, flow=flow, seed=43).frames
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3
    noise = torch.randn(1, FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    d = run(live_pipe, image, flow=flow, seed=1, latents=noise).frames
    e = run(live_pipe, image, flow=flow, seed=1, latents=noise.clone()).frames
    assert torch.equal(d, e)


def test_no_guidance_path(live_pipe64, image, flow):
    out = run(live_pipe64, image, flow=flow, max_guidance_scale=1.0)
    assert out.frames.shape == (1, FRAMES, 3, 64, 64)
    low = run(live_pipe64, image, flow=flow, max_guidance_scale=1.0, low_memory=True, cache_reference=False)
    assert float((out.frames - low.frames).abs().max()) <= 1e-10


def test_long_video_windows(live_pipe, image):
    n = 10
    flow = torch.randn(n - 1, 2, 64, 64, generator=torch.Generator().manual_seed(2))
    out = run(live_pipe, image, flow=flow, num_frames=n, window_size=6, window_stride=3, num_inference_steps=2)
    assert out.frames.shape == (1, n, 3, 64, 64)
    ref = run(
        live_pipe,
        image,
        flow=flow,
        num_frames=n,
        window_size=6,
        window_stride=3,
        num_inference_steps=2,
        reference_mode=True,
    )
    assert ref.frames.shape == (1, n, 3, 64, 64)
    # one window covering everything = the plain single-pass generation
    single = run(live_pipe, image, flow=flow[:5], num_frames=6, window_size=6)
    plain = run(live_pipe, image, flow=flow[:5], num_frames=6)
    torch.testing.assert_close(single.frames, plain.frames)


def test_bfloat16_pipeline_runs(live_pipe, image, flow):
    pipe = copy.deepcopy(live_pipe).to(torch.bfloat16)
    out = run(pipe, image, flow=flow[:2], num_frames=3, num_inference_steps=1)
    assert out.frames.dtype == torch.float32 and bool(torch.isfinite(out.frames).all())
    reference = run(live_pipe, image, flow=flow[:2], num_frames=3, num_inference_steps=1).frames
    assert float((out.frames - reference).abs().mean()) < 0.1  # same video up to bf16 rounding


def test_any_aspect_ratio(live_pipe):
    wide = torch.rand(3, 64, 128, generator=torch.Generator().manual_seed(1))
    out = run(live_pipe, wide, num_frames=3, num_inference_steps=1)
    assert out.frames.shape == (1, 3, 3, 64, 128)


def test_bad_inputs_raise_clear_errors(live_pipe, image, flow):
    with pytest.raises(MofaInputError, match="multiples of 64"):
        run(live_pipe, torch.rand(3, 72, 64))
    with pytest.raises(MofaInputError, match="resize_flow"):
        run(live_pipe, image, flow=torch.zeros(FRAMES - 1, 2, 32, 32))
    with pytest.raises(MofaInputError, match="num_frames"):
        run(live_pipe, image, flow=flow, num_frames=FRAMES + 2)
    with pytest.raises(MofaInputError, match="either hints or"):
        run(live_pipe, image, flow=flow, hints=object())


def test_hints_through_classic_densifier(live_pipe, image):
    pytest.importorskip("mofa.flow.classic")
    from mofa.hints.drag import DragHint
    from mofa.hints.schema import HintSet

    hints = HintSet(image_size=(64, 64), drags=[DragHint(np.array([[20.0, 20.0], [40.0, 30.0]]))], num_frames=FRAMES)
    out = run(live_pipe, image, hints=hints)
    assert out.flow.shape == (1, FRAMES - 1, 2, 64, 64)
    last = out.flow[0, -1]
    assert abs(float(last[0, 20, 20]) - 20.0) < 2.0 and abs(float(last[1, 20, 20]) - 10.0) < 2.0
    assert out.frames.shape == (1, FRAMES, 3, 64, 64)


def test_save_pretrained_roundtrip(tmp_path, live_pipe64, image, flow):
    live_pipe64.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert (tmp_path / "pipe" / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MofaVideoPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet).__name__ == "MofaUNetSpatioTemporalConditionModel"
    assert loaded.flow_model is None
    # float64: freshly loaded models may pick other (equivalent) attention kernels, whose float32 rounding the
    # random tiny UNet amplifies
    diff = run(loaded, image, flow=flow).frames - run(live_pipe64, image, flow=flow).frames
    assert float(diff.abs().max()) <= 1e-8


def test_runtime_settings_same_video(live_pipe64, image, flow):
    """Channels-last convolutions (UNet, adapter, VAE), chunked feed-forwards and the single-key cross-attention
    shortcut change how, not what."""
    off = {"channels_last": False, "chunk_feed_forward": False, "shortcut_cross_attention": False}
    plain = run(live_pipe64, image, flow=flow, **off).frames
    for setting in ("channels_last", "chunk_feed_forward", "shortcut_cross_attention"):
        got = run(live_pipe64, image, flow=flow, **{**off, setting: True}).frames
        assert float((plain - got).abs().max()) <= 1e-10, setting
    assert all(not m._forward_pre_hooks for m in live_pipe64.unet.modules())
    assert all(getattr(m, "_chunk_size", None) is None for m in live_pipe64.adapter.modules())
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in live_pipe64.unet.attn_processors.values())


@pytest.mark.skipif(not runtime.onednn_linear_available(), reason="torch build without oneDNN linear")
def test_onednn_linear_is_the_cpu_default_and_changes_rounding_only(live_pipe, image, flow, monkeypatch):
    """float32 on a CPU: the UNet's, adapter's, VAE's and image encoder's linear layers go through oneDNN by default,
    not with ``onednn_linear=False``; the video is the same to float32 rounding (which the random tiny UNet amplifies,
    see live_pipe64) and no layer stays patched."""
    calls = record_onednn_linears(monkeypatch)
    default = run(live_pipe, image, flow=flow).frames
    shapes = {weight_shape for _, weight_shape in calls}
    linears = {
        tuple(m.weight.shape)
        for part in (live_pipe.unet, live_pipe.adapter, live_pipe.vae, live_pipe.image_encoder)
        for m in part.modules()
        if type(m) is torch.nn.Linear
    }
    assert shapes and shapes <= linears
    assert len(shapes) >= len(linears) // 2  # most layer shapes ran through it (some sit in unused branches)
    calls.clear()
    stock = run(live_pipe, image, flow=flow, onednn_linear=False).frames
    assert calls == []
    assert float((default - stock).abs().max()) <= 2e-3
    assert all("forward" not in vars(m) for m in live_pipe.unet.modules())


def test_model_cpu_offload_hooks_same_video(parts, image, flow):
    """enable_model_cpu_offload's accelerate hooks (here with the CPU as the 'accelerator', the only device in CI):
    the adapter's reference encoding, which is not its forward, must still load the adapter; the video is unchanged."""
    pipe = build_tiny_pipeline(parts, zero_adapter=False)
    expected = run(pipe, image, flow=flow).frames
    pipe.enable_model_cpu_offload(device="cpu")
    assert getattr(pipe.adapter, "_hf_hook", None) is not None
    calls = []
    hook = pipe.adapter._hf_hook
    original = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: (calls.append(1), original(module, *a, **k))[1]
    forwards = []
    handle = pipe.adapter.register_forward_pre_hook(lambda *_: forwards.append(1))
    got = run(pipe, image, flow=flow).frames
    handle.remove()
    assert len(forwards) == 2 * STEPS  # guidance halves one after the other (the CPU default)
    assert len(calls) == 2 * STEPS + 1  # every forward + once for the cached reference encoding of the one window
    assert torch.equal(got, expected)
    pipe.remove_all_hooks()
