"""Benchmark: CMP sparse-to-dense for 24 frames at 384x384 — image encoded once + batched per-frame decoder
(``CMPModel.densify``) vs the reference's way, the full network once per frame (``CMPModel.forward`` in a loop).

Each mode runs in a fresh subprocess with the same random weights (seed 0) and the same inputs (seed 1), so peak
memory is measured per mode: a sampler thread reads the process RSS (``/proc/self/statm``) every 2 ms while the mode
runs; ``peak_mb`` is the peak minus the RSS just before the run (model and inputs already resident), and
``ru_maxrss`` is reported too. torch allocations are plain malloc on CPU, so RSS sees them (tracemalloc would not).

The per-frame baseline costs ~2-3 s per frame on this 2-core machine, so by default only ``--baseline-frames`` of
the 24 frames are run and its time is scaled linearly (each frame is an identical, independent full-network run);
pass ``--baseline-frames 24`` to time all. Both wall and CPU (process) time are reported: the machine is shared, and
CPU time is less sensitive to other users' load. The two modes alternate ``--repeats`` times (fresh processes each
time) and each mode's fastest run counts, so a burst of load during one run does not decide the ratio; peak memory
is the largest seen. Outputs of the timed baseline frames are compared with densify's.

Usage:
    python bench/cmp.py                          # 24 frames, 384², 1 thread, baseline timed on 4 frames, 2 repeats
    python bench/cmp.py --threads 2 --baseline-frames 24 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self._stop_event = period, _rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def _inputs(frames: int, size: int, tracks: int = 24):
    """Drag-like sparse flow: ``tracks`` start points with motion growing linearly over the frames (384-grid px)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, size, size, generator=gen)
    starts = torch.randint(0, size, (tracks, 2), generator=gen)
    ends = (torch.rand(tracks, 2, generator=gen) - 0.5) * 80
    flow = torch.zeros(frames, 2, size, size)
    mask = torch.zeros(frames, 1, size, size)
    for t in range(frames):
        step = ends * (t + 1) / frames
        flow[t, :, starts[:, 1], starts[:, 0]] = step.T
        mask[t, 0, starts[:, 1], starts[:, 0]] = 1.0
    return image, flow, mask


def child(mode: str, args: argparse.Namespace) -> None:
    import torch

    from mofa.models.cmp import CMPModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CMPModel().eval()
    image, flow, mask = _inputs(args.frames, args.size)
    with torch.inference_mode():  # warm-up at a small size (kernel selection, allocator), not timed
        small = (slice(None), slice(0, 64), slice(0, 64))
        model.densify(image[small], flow[:2, :, :64, :64], mask[:2, :, :64, :64])
        model(image[small][None], flow[:1, :, :64, :64], mask[:1, :, :64, :64])
    before = _rss_bytes()
    sampler = _PeakSampler()
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "once":
        out = model.densify(image, flow, mask, chunk_size=args.chunk_size)
        frames_run = args.frames
    else:
        with torch.inference_mode():
            frames_run = min(args.baseline_frames, args.frames)
            out = torch.cat([model(image[None], flow[i : i + 1], mask[i : i + 1]) for i in range(frames_run)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = sampler.stop()
    torch.save(out, args.out)
    result = {
        "mode": mode,
        "frames_run": frames_run,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": (peak - before) / 2**20,
        "rss_before_mb": before / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--out", str(out)]
    for name in ("frames", "size", "threads", "baseline_frames", "chunk_size"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (machine is shared)")
    parser.add_argument("--baseline-frames", type=int, default=4, help="per-frame runs actually timed")
    parser.add_argument("--chunk-size", type=int, default=2, help="densify decoder chunk")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the fastest counts")
    parser.add_argument("--child", choices=["once", "per_frame"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return

    import torch

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"once": [], "per_frame": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, args.repeats)):
            for mode in runs:
                runs[mode].append(run_mode(mode, args, Path(tmp) / f"{mode}.pt"))
        dense, ref = torch.load(Path(tmp) / "once.pt"), torch.load(Path(tmp) / "per_frame.pt")
    once, base = (min(runs[mode], key=lambda r: r["cpu_s"]) for mode in ("once", "per_frame"))
    for best, mode in ((once, "once"), (base, "per_frame")):
        best["peak_mb"] = max(r["peak_mb"] for r in runs[mode])
        best["ru_maxrss_mb"] = max(r["ru_maxrss_mb"] for r in runs[mode])
    load_after = os.getloadavg()[0]
    k = base["frames_run"]
    diff = (dense[:k] - ref).abs().max().item()
    scale = args.frames / k
    base_wall, base_cpu = base["wall_s"] * scale, base["cpu_s"] * scale
    speed_wall, speed_cpu = base_wall / once["wall_s"], base_cpu / once["cpu_s"]
    print(
        f"CMP densify, {args.frames} frames at {args.size}x{args.size}, {args.threads} thread(s), "
        f"best of {len(runs['once'])} run(s) per mode"
    )
    print(
        f"  once-per-image (densify):  wall {once['wall_s']:7.2f} s  cpu {once['cpu_s']:7.2f} s  "
        f"peak +{once['peak_mb']:.0f} MB (ru_maxrss {once['ru_maxrss_mb']:.0f} MB)"
    )
    print(
        f"  per-frame full network:    wall {base_wall:7.2f} s  cpu {base_cpu:7.2f} s  "
        f"peak +{base['peak_mb']:.0f} MB (ru_maxrss {base['ru_maxrss_mb']:.0f} MB)  "
        f"[{k} of {args.frames} frames timed, scaled x{scale:.1f}]"
    )
    per_run = {mode: ", ".join(f"{r['cpu_s']:.2f}" for r in rs) for mode, rs in runs.items()}
    print(f"  cpu s per run: once [{per_run['once']}], per-frame [{per_run['per_frame']}] ({k} frames, unscaled)")
    print(f"  speed-up: {speed_wall:.2f}x wall, {speed_cpu:.2f}x cpu;  max |densify - per-frame| = {diff:.2e} px")
    noisy = " (shared machine: wall times are noisy, prefer the cpu ratio)" if max(load_before, load_after) > 2 else ""
    print(f"  load average {load_before:.1f} -> {load_after:.1f}{noisy}")
    print(
        f"RESULT frames={args.frames} size={args.size} threads={args.threads} baseline_frames_timed={k} "
        f"repeats={len(runs['once'])} "
        f"once_wall_s={once['wall_s']:.2f} per_frame_wall_s={base_wall:.2f} speedup_wall={speed_wall:.2f} "
        f"once_cpu_s={once['cpu_s']:.2f} per_frame_cpu_s={base_cpu:.2f} speedup_cpu={speed_cpu:.2f} "
        f"once_peak_mb={once['peak_mb']:.0f} per_frame_peak_mb={base['peak_mb']:.0f} max_abs_diff={diff:.2e} "
        f"load_avg={max(load_before, load_after):.1f}"
    )


if __name__ == "__main__":
    main()
