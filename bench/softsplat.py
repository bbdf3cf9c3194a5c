"""Throughput of the batched softsplat ('avg') vs the naive per-frame, per-corner loop, measured in the same run.

Usage: python bench/softsplat.py [--repeats 3] [--threads 1] [--quick]

Cases: adapter-like (24 frames × 320 channels at 64×64) and preview-like (24 frames × RGB at 512×512), timed under
``torch.no_grad`` (the inference engines; the engine picked is reported). The baseline loops over frames and over
the 4 bilinear corners with one scatter each (how a straight port of the CUDA kernel typically looks); both produce
the same numbers, which is checked before timing. Also timed, for reference: the autograd path's single batched
scatter (the previous inference implementation) and ``src.clone()``, a floor for any op that reads ``src`` and writes
a new tensor of its size (on these VMs mostly page faults of the fresh output). One thread by default: these machines
are shared.
"""

from __future__ import annotations

import argparse
import time

import torch

from mofa.flow.softsplat import _inference_engine, _splat, softsplat


def loop_softsplat_avg(src: torch.Tensor, flow: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Baseline: for each frame, for each of the 4 corners, compute weights and scatter separately."""
    batch, channels, height, width = src.shape
    outs = []
    for b in range(batch):
        inp = torch.cat([src[b], torch.ones_like(src[b, :1])], dim=0).float().view(channels + 1, -1)
        gy, gx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        tx = gx + flow[b, 0].float()
        ty = gy + flow[b, 1].float()
        ok = torch.isfinite(tx) & torch.isfinite(ty)
        tx = torch.where(ok, tx, 0.0)
        ty = torch.where(ok, ty, 0.0)
        x0 = torch.floor(tx)
        y0 = torch.floor(ty)
        acc = torch.zeros(channels + 1, height * width)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xt = x0 + dx
            yt = y0 + dy
            w = (1 - (tx - xt).abs()) * (1 - (ty - yt).abs())
            valid = ok & (xt >= 0) & (xt <= width - 1) & (yt >= 0) & (yt <= height - 1)
            idx = (yt.clamp(0, height - 1) * width + xt.clamp(0, width - 1)).long().view(1, -1)
            acc.scatter_add_(1, idx.expand(channels + 1, -1), inp * (w * valid).view(1, -1))
        acc = acc.view(channels + 1, height, width)
        outs.append(acc[:channels] / (acc[channels:] + eps))
    return torch.stack(outs).to(src.dtype)


def one_scatter_avg(src: torch.Tensor, flow: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Reference: the autograd path's single scatter for all frames, then the division (no graph recorded)."""
    splat = _splat(src, flow, append_norm=True)
    return splat[:, :-1] / (splat[:, -1:] + eps)


def best_of(fn, repeats: int) -> float:
    """Best wall time (s) of ``repeats`` calls (the caller has warmed both paths up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cases = {
        "adapter": (24, 320, 64, 64),
        "preview": (24, 3, 512, 512),
    }
    if args.quick:
        cases = {"adapter": (8, 64, 32, 32), "preview": (8, 3, 128, 128)}
    results = {}
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, best of {args.repeats}")
    for name, (batch, channels, height, width) in cases.items():
        src = torch.rand(batch, channels, height, width, generator=gen)
        flow = torch.randn(batch, 2, height, width, generator=gen) * 4
        with torch.no_grad():
            # Correctness check on a few frames (also warms the code paths up).
            diff = (softsplat(src[:4], flow[:4]) - loop_softsplat_avg(src[:4], flow[:4])).abs().max().item()
            one_scatter_avg(src[:4], flow[:4])
            ms_batched = 1e3 * best_of(lambda src=src, flow=flow: softsplat(src, flow), args.repeats)
            ms_scatter = 1e3 * best_of(lambda src=src, flow=flow: one_scatter_avg(src, flow), args.repeats)
            ms_loop = 1e3 * best_of(lambda src=src, flow=flow: loop_softsplat_avg(src, flow), args.repeats)
            ms_clone = 1e3 * best_of(src.clone, args.repeats)
        ratio = ms_loop / ms_batched
        engine = _inference_engine(src)
        print(
            f"{name:8s} {batch}x{channels}x{height}x{width}: batched ({engine}) {ms_batched:8.1f} ms | one scatter "
            f"{ms_scatter:8.1f} ms | per-frame loop {ms_loop:8.1f} ms | speedup vs loop {ratio:5.2f}x, vs one "
            f"scatter {ms_scatter / ms_batched:5.2f}x | clone {ms_clone:6.1f} ms | max|diff| {diff:.2e}"
        )
        results[name] = (ms_batched, ms_loop, ratio, ms_scatter, engine, ms_clone)
    print(
        "RESULT "
        + " ".join(
            f"{k}_speedup={r[2]:.2f} {k}_ms_batched={r[0]:.1f} {k}_ms_loop={r[1]:.1f} {k}_ms_one_scatter={r[3]:.1f} "
            f"{k}_ms_clone={r[5]:.1f} {k}_engine={r[4]}"
            for k, r in results.items()
        )
        + f" threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
