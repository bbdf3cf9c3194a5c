"""Throughput of the batched softsplat ('avg') vs the naive per-frame, per-corner loop, measured in the same run.

Usage: python bench/softsplat.py [--repeats 3] [--quick]

Cases: adapter-like (24 frames × 320 channels at 64×64) and preview-like (24 frames × RGB at 512×512). The baseline
loops over frames and over the 4 bilinear corners with one scatter each (how a straight port of the CUDA kernel
typically looks); both produce the same numbers, which is checked before timing.
"""

from __future__ import annotations

import argparse
import time

import torch

from mofa.flow.softsplat import softsplat


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
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    cases = {
        "adapter": (24, 320, 64, 64),
        "preview": (24, 3, 512, 512),
    }
    if args.quick:
        cases = {"adapter": (8, 64, 32, 32), "preview": (8, 3, 128, 128)}
    results = {}
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    for name, (batch, channels, height, width) in cases.items():
        src = torch.rand(batch, channels, height, width, generator=gen)
        flow = torch.randn(batch, 2, height, width, generator=gen) * 4
        # Correctness check on a few frames (also warms both code paths up).
        diff = (softsplat(src[:4], flow[:4]) - loop_softsplat_avg(src[:4], flow[:4])).abs().max().item()
        ms_batched = 1e3 * best_of(lambda src=src, flow=flow: softsplat(src, flow), args.repeats)
        ms_loop = 1e3 * best_of(lambda src=src, flow=flow: loop_softsplat_avg(src, flow), args.repeats)
        ratio = ms_loop / ms_batched
        print(
            f"{name:8s} {batch}x{channels}x{height}x{width}: batched {ms_batched:8.1f} ms | per-frame loop "
            f"{ms_loop:8.1f} ms | speedup {ratio:5.2f}x | max|diff| {diff:.2e}"
        )
        results[name] = (ms_batched, ms_loop, ratio)
    keys = list(results)
    print(
        "RESULT "
        + " ".join(
            f"{k}_speedup={results[k][2]:.2f} {k}_ms_batched={results[k][0]:.1f} {k}_ms_loop={results[k][1]:.1f}"
            for k in keys
        )
    )


if __name__ == "__main__":
    main()
