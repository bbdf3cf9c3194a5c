"""Denoising-step benchmark: MofaVideoPipeline vs the reference's way of stepping, same weights, same run.

Full-size architectures with random weights (SVD-XT UNet 1.52 B params + released-size MOFA-Adapter 0.69 B params,
fp32 ≈ 8.9 GB) on CPU. The VAE and CLIP encoder are tiny stand-ins (they run once per generation, outside the loop,
and are not what is measured). Modes (same seed and weights in all):

- ``reference``: the original MOFA-Video way — every step re-encodes and re-warps the first-frame feature pyramid
  (``cache_reference=False``), both guidance halves as one batch of 2, NCHW convolutions (``channels_last=False``),
  whole-batch feed-forwards (``chunk_feed_forward=False``), full attention to the one CLIP token
  (``shortcut_cross_attention=False``), torch's stock linear layers (MKL's ``addmm``; ``onednn_linear=False``), the
  adapter's residuals held for the whole UNet call (a hook keeps references, as the reference pipeline's variables
  do; the pipeline releases them after the UNet's down pass);
- ``cached_nchw``: reference features encoded + warped once per generation, otherwise as ``reference`` (isolates
  the caching);
- ``ours``: the pipeline defaults — cached features, feed-forwards in chunks of at most 64 MiB, cross-attention to
  the one CLIP token computed as its projected value, float32 linear layers through oneDNN with the bias fused
  (``onednn_linear=None`` picks that on a CPU), adapter residuals released after the UNet's down pass, freed
  host memory kept in glibc's heap for reuse during the call (``retain_heap=True``; no page faults for each new large
  tensor) and, on a CPU, the guidance halves one after the other (``low_memory=None`` picks that on a CPU); with
  ``--huge-pages`` run with ``THP_MEM_ALLOC_ENABLE=1`` as the ``mofa`` console script sets it (oneDNN re-lays out
  every convolution weight into fresh buffers on each call; with 4 KiB pages first-touching them dominates a CPU step
  at small sizes; at 256² it does not speed a step up and costs working memory);
- ``low_memory``: ``low_memory=True`` explicitly (on a CPU the same as ``ours``, so the two show the noise);
- ``reference_heap``: ``reference`` with the retained heap — how much of the speed-up is the allocator setting alone
  (which the reference could adopt too) and how much the rest of ours;
- ``reference_onednn`` (on request): ``reference`` with the oneDNN linear layers — how much of the speed-up is the
  matrix-product library alone (which the reference could adopt too);
- ``joint_guidance`` (on request): ours but the guidance halves as one batch of 2 (``low_memory=False``; the
  accelerator default);
- ``channels_last`` (on request): ours + channels-last convolutions (``channels_last=True``);
- ``cached_nchw`` (on request): see above.

Two phases:

1. **Memory** (every ``--modes`` entry, each in a fresh process): peak RSS of the process during the call (VmHWM,
   reset after loading) and that peak minus the RSS before the call = the **working memory** the sampler needs on
   top of the weights. The weights (~8.9 GiB) are identical in every mode by construction, so the memory targets are
   judged on working memory; the whole-process ratio is printed as well. Final latents of every mode are compared
   with the reference's. The warm step time of these processes is printed as ``fresh_speedup_*``.
2. **Speed** (``--speed-modes``, one process): the modes take turns call by call for ``--rounds`` rounds, the order
   rotating each round; a warm step is every step after the first of a call (wall and process CPU time). The speed-up
   is the median over rounds of the reference's step time divided by the mode's in the same round. A shared
   2-core machine drifts by ±20% over minutes (a plain 2048² matmul loop measured 100–161 GFLOP/s second by
   second), so timing modes in separate processes minutes apart measured that drift more than the modes: one
   setting gave 1.12× and 1.40× in two runs. Allocator settings are per call (``retain_heap`` trims the heap on exit
   and restores glibc's thresholds to the end values of its dynamic rule, 32 / 64 MiB), so a call does not inherit
   the previous call's heap.

Default size 256x256 with 14 frames: the largest that steps in a few minutes per mode on 2 CPU cores (real use is
512x512 × 25 frames, which this machine cannot step in reasonable time).

Usage:
    python bench/denoise.py                          # 256x256, 14 frames, 2 steps, 3 rounds, fp32
    python bench/denoise.py --size 64 --frames 4     # smoke run (weights dominate; ratios meaningless)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_PLAIN = {
    "channels_last": False,
    "chunk_feed_forward": False,
    "shortcut_cross_attention": False,
    "retain_heap": False,
    "onednn_linear": False,
}
MODES = {
    "reference": {"cache_reference": False, "low_memory": False, **_PLAIN},
    "reference_heap": {"cache_reference": False, "low_memory": False, **_PLAIN, "retain_heap": True},
    "reference_onednn": {"cache_reference": False, "low_memory": False, **_PLAIN, "onednn_linear": True},
    "cached_nchw": {"cache_reference": True, "low_memory": False, **_PLAIN},
    "ours": {"cache_reference": True},
    "joint_guidance": {"cache_reference": True, "low_memory": False},
    "channels_last": {"cache_reference": True, "channels_last": True},
    "low_memory": {"cache_reference": True, "low_memory": True},
}
DEFAULT_MODES = ("reference", "ours", "low_memory", "reference_heap")
DEFAULT_SPEED_MODES = ("reference", "ours", "reference_heap")
"""On a CPU ``low_memory`` differs from ``ours`` only in emptying the retained heap after every step (an explicit
``low_memory=True``): its speed is not timed again by default."""
HUGE_PAGE_MODES = ("ours", "joint_guidance", "channels_last", "low_memory")
"""Modes run with ``THP_MEM_ALLOC_ENABLE=1`` in the environment with ``--huge-pages`` (as the ``mofa`` console script
sets it)."""
HOLD_RESIDUAL_MODES = ("reference", "reference_heap", "reference_onednn", "cached_nchw")
"""Modes that keep the adapter's residuals alive for the whole UNet call, as the reference pipeline does (its
``down_block_res_samples`` variable); the pipeline itself releases them after the UNet's down pass."""


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _fill_random(module, seed: int) -> None:
    """Deterministic cheap init: a tiled pseudo-random pattern scaled to std 1/sqrt(fan_in) for weights, zero biases,
    unit norm scales (keeps activations O(1)). Tiling a 1 M-value pattern is ~10x faster than normal_ on 2.2 B
    parameters and the numbers do not matter for a timing benchmark."""
    import torch

    pattern = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                flat = param.view(-1)
                n = flat.numel()
                reps = -(-n // pattern.numel())
                flat.copy_(pattern.repeat(reps)[:n] if reps > 1 else pattern[:n])
                flat.mul_(1.0 / math.sqrt(math.prod(param.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def build_pipeline(dtype_name: str):
    """Full-size SVD-XT UNet + released-size adapter (random), tiny VAE / CLIP stand-ins."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from mofa.models.adapter import MofaAdapterModel
    from mofa.models.unet_injection import MofaUNetSpatioTemporalConditionModel
    from mofa.pipelines.pipeline_mofa import MofaVideoPipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import SVD_SCHEDULER, TINY_VAE

    diffusers_logging.set_verbosity_error()  # casting random modules with .to(dtype) warns once per class
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.device("meta"):
        unet = MofaUNetSpatioTemporalConditionModel(num_attention_heads=(5, 10, 20, 20))  # SVD-XT config
        adapter = MofaAdapterModel()  # released config
    unet = unet.to_empty(device="cpu")
    adapter = adapter.to_empty(device="cpu")
    _fill_random(unet, 0)
    _fill_random(adapter, 1)
    torch.manual_seed(2)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, projection_dim=1024, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, image_size=224, patch_size=32)
    )  # fmt: skip
    pipe = MofaVideoPipeline(
        vae=AutoencoderKLTemporalDecoder(**TINY_VAE),
        image_encoder=clip,
        unet=unet.to(dtype).eval(),
        adapter=adapter.to(dtype).eval(),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
    )
    pipe.vae.to(dtype).eval()
    pipe.image_encoder.to(dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _step_times(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of every step from the stamps taken at the start and after each step; the first also holds
    the call's setup."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]


def _warm_step(stamps: list[tuple[float, float]], clock: int) -> float:
    """Median step time on one clock (0 wall, 1 CPU), without the first interval (setup + the cold step 1)."""
    steps = [step[clock] for step in _step_times(stamps)]
    return statistics.median(steps[1:] or steps)


def _inputs(size: int, frames: int):
    import torch

    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(3))
    flow = torch.randn(frames - 1, 2, size, size, generator=torch.Generator().manual_seed(4)) * 3.0
    return image, flow


def _hold_residuals(pipe, active: Callable[[], bool]) -> None:
    """While ``active()``, keep the adapter's down residuals alive for the whole UNet call (the reference's way)."""
    held: list = []

    def grab(_module, _args, kwargs):
        if active():
            held.extend(kwargs["down_block_additional_residuals"])

    pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    pipe.unet.register_forward_hook(lambda *_: held.clear())


def _timed_call(pipe, mode: str, image, flow, frames: int, steps: int):
    """One generation in ``mode`` → (latents, stamps): (wall, process CPU) at the start and after every step."""
    import torch

    stamps: list[tuple[float, float]] = [(time.perf_counter(), time.process_time())]

    def on_step(_pipe, _i, _t, kwargs):
        stamps.append((time.perf_counter(), time.process_time()))
        return {}

    latents = pipe(
        image, flow=flow, num_frames=frames, num_inference_steps=steps, conditioning_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=on_step,
        **MODES[mode],
    ).frames  # fmt: skip
    return latents, stamps


def worker(mode: str, size: int, frames: int, steps: int, dtype_name: str, out: Path) -> None:
    """Memory phase: one mode in this fresh process; prints peak working memory and step times as JSON."""
    import torch

    pipe = build_pipeline(dtype_name)
    image, flow = _inputs(size, frames)
    if mode in HOLD_RESIDUAL_MODES:
        _hold_residuals(pipe, lambda: True)
    # No warm-up call: its freed activations would stay in the heap and hide the working memory from VmHWM. The
    # per-step time is taken from step 2 on (oneDNN primitives and first-touch page faults belong to step 1).
    rss_before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    latents, stamps = _timed_call(pipe, mode, image, flow, frames, steps)
    total = stamps[-1][0] - stamps[0][0]
    peak = _rss_kib("VmHWM")
    torch.save(latents.float(), out)
    print(json.dumps({
        "mode": mode, "sec_per_step": _warm_step(stamps, 0), "call_sec": total,
        "step_secs": [round(wall, 2) for wall, _ in _step_times(stamps)],
        "cpu_sec_per_step": _warm_step(stamps, 1),
        "peak_rss_gib": peak / 2**20, "rss_before_gib": rss_before / 2**20,
        "peak_extra_gib": (peak - rss_before) / 2**20,
        "finite": bool(torch.isfinite(latents).all()),
    }))  # fmt: skip


def speed_worker(modes: list[str], size: int, frames: int, steps: int, rounds: int, dtype_name: str) -> None:
    """Speed phase: all modes in this one process, alternating call by call for ``rounds`` rounds (the order rotates
    each round), so a slow minute of a shared machine hits every mode alike. Prints the warm step times (every step
    after the first of each call) per mode and round as JSON."""
    pipe = build_pipeline(dtype_name)
    image, flow = _inputs(size, frames)
    current = {"mode": ""}
    _hold_residuals(pipe, lambda: current["mode"] in HOLD_RESIDUAL_MODES)
    times: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            current["mode"] = mode
            _, stamps = _timed_call(pipe, mode, image, flow, frames, steps)
            warm = _step_times(stamps)[1:]
            times[mode].append(warm)
            print(
                f"  round {r + 1}/{rounds} {mode}: " + ", ".join(f"{w:.2f}" for w, _ in warm) + " s", file=sys.stderr
            )
    print(json.dumps(times))


def _subprocess_env(huge_pages: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["HF_HUB_OFFLINE"] = "1"
    if huge_pages:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def _run(cmd: list[str], what: str, huge_pages: bool = False) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_subprocess_env(huge_pages))
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}); its traceback is above")
    return proc.stdout.strip().splitlines()[-1]


def _common_args(args: argparse.Namespace) -> list[str]:
    return ["--dtype", args.dtype, "--size", str(args.size), "--frames", str(args.frames)]


def _run_worker(args: argparse.Namespace, mode: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--out", str(out), "--steps", str(args.steps)]
    began = time.perf_counter()
    result = json.loads(_run(cmd + _common_args(args), f"{mode} worker", args.huge_pages and mode in HUGE_PAGE_MODES))
    result["wall"] = time.perf_counter() - began
    print(json.dumps(result), flush=True)
    return result


def _median_step(calls: list[list[list[float]]], clock: int = 0) -> float:
    """Median warm step of a mode's speed-phase calls (each a list of (wall, CPU) pairs) on one clock."""
    return statistics.median(step[clock] for call in calls for step in call)


def _speed_ratios(times: dict[str, list[list[list[float]]]], mode: str, clock: int) -> float:
    """Median over rounds of (reference's warm step / mode's warm step) on one clock, each round's step time being
    the median of its warm steps: every ratio compares calls made minutes apart at most."""
    ratios = [
        _median_step([ref], clock) / _median_step([own], clock)
        for ref, own in zip(times["reference"], times[mode], strict=True)
    ]
    return statistics.median(ratios)


def _parse_modes(text: str, flag: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    if "reference" not in modes or any(m not in MODES for m in modes):
        sys.exit(f"{flag} must include 'reference' and name only {', '.join(MODES)}")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Phases: memory (a fresh process per --modes entry), speed (one process alternating --speed-modes).",
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="square resolution (multiple of 64)")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--steps", type=int, default=2, help="steps per call, at least 2 (step 1 is the cold one)")
    parser.add_argument("--rounds", type=int, default=3, help="speed phase: calls per mode, alternating (0 = skip)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--huge-pages", action="store_true", help="memory phase: our modes with THP_MEM_ALLOC_ENABLE=1"
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="memory phase: subset of " + ", ".join(MODES))
    parser.add_argument("--speed-modes", default=",".join(DEFAULT_SPEED_MODES), help="speed phase: subset of --modes")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--speed-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2: step 1 of a call is the cold one and is not timed")
    if args.worker:
        worker(args.worker, args.size, args.frames, args.steps, args.dtype, args.out)
        return
    if args.speed_worker:
        speed_worker(args.speed_worker.split(","), args.size, args.frames, args.steps, args.rounds, args.dtype)
        return
    modes = _parse_modes(args.modes, "--modes")
    speed_modes = _parse_modes(args.speed_modes, "--speed-modes") if args.rounds > 0 else []
    if any(m not in modes for m in speed_modes):
        sys.exit("--speed-modes must be a subset of --modes")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results[mode] = _run_worker(args, mode, Path(tmp) / f"{mode}.pt")
        import torch

        latents = {mode: torch.load(Path(tmp) / f"{mode}.pt", weights_only=True) for mode in modes}
    times = {}
    if speed_modes:
        print(f"speed phase: {args.rounds} rounds of {', '.join(speed_modes)} in one process", flush=True)
        cmd = [sys.executable, __file__, "--speed-worker", ",".join(speed_modes), "--steps", str(args.steps)]
        times = json.loads(_run(cmd + ["--rounds", str(args.rounds)] + _common_args(args), "speed worker"))
    ref = results["reference"]
    scale = float(latents["reference"].abs().max())
    print(f"config: {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, {args.dtype}, CFG on")
    fields = []
    for m in modes:
        r = results[m]
        diff = float((latents[m] - latents["reference"]).abs().max())
        fresh = ref["sec_per_step"] / r["sec_per_step"]
        work = r["peak_extra_gib"] / ref["peak_extra_gib"]
        total = r["peak_rss_gib"] / ref["peak_rss_gib"]
        line = f"{m:>14}: fresh process {r['sec_per_step']:7.2f} s/step ({fresh:.2f}x)"
        if m in times:
            speed, cpu_speed = _speed_ratios(times, m, 0), _speed_ratios(times, m, 1)
            own = _median_step(times[m])
            line += f", alternating {own:7.2f} s/step ({speed:.2f}x; CPU time {cpu_speed:.2f}x)"
            if m != "reference":
                fields += [f"speedup_{m}={speed:.3f}", f"cpu_speedup_{m}={cpu_speed:.3f}"]
        print(
            line
            + f", working memory {r['peak_extra_gib']:.3f} GiB ({work:.3f}x), peak RSS {r['peak_rss_gib']:.2f} GiB "
            f"({total:.3f}x), max |latents - reference| {diff:.1e} (scale {scale:.2f})"
        )
        if m != "reference":
            fields += [
                f"fresh_speedup_{m}={fresh:.3f}",
                f"work_mem_ratio_{m}={work:.3f}",
                f"rss_ratio_{m}={total:.3f}",
            ]
            fields.append(f"max_abs_diff_{m}={diff:.1e}")
    ref_step = _median_step(times["reference"]) if times else ref["sec_per_step"]
    fields += [
        f"ref_sec_per_step={ref_step:.2f}", f"ref_work_mem_gib={ref['peak_extra_gib']:.3f}",
        f"size={args.size}", f"frames={args.frames}", f"steps={args.steps}", f"rounds={args.rounds if times else 0}",
        f"dtype={args.dtype}", f"huge_pages={int(args.huge_pages)}",
    ]  # fmt: skip
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
