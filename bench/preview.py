"""Wall time of the weight-free preview: 25 frames at 512², classic densifier, the demo drags on the astronaut.

Usage: python bench/preview.py [--repeats 1] [--frames 25] [--quick]

Measured in one run:
- ``compute``: densify + batched warp + hole filling (:func:`mofa.pipelines.preview.preview`), no encoding;
- ``total``: compute + writing every output of ``mofa preview`` (mp4, gif, flow mp4, hints png, json);
- ``mp4``: encoding the frames as H.264 alone;
- baseline: the same warp done frame by frame (one :func:`warp_frames` call per frame), against the batched warp;
- variants: the flow reversal at full resolution (``stride=1``) and direct colour splatting (``method="splat"``).
Target: compute < 5 s on 2 CPU cores. Timings are the best of ``--repeats`` runs after a small warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="256² and 9 frames (smoke run)")
    args = parser.parse_args()

    from skimage.data import astronaut

    from mofa.hints import HintSet
    from mofa.io.video import export_video
    from mofa.pipelines.preview import prepare_inputs, preview, warp_frames, write_preview_outputs

    frames = 9 if args.quick else args.frames
    size = 256 if args.quick else 512
    tracks = resources.files("mofa") / "assets" / "demo_tracks.json"
    with resources.as_file(tracks) as path:
        # The demo JSON is drawn on the 512² photo; at --quick the points are mapped onto the 256² prepared image.
        inputs = prepare_inputs(astronaut(), path, size=size, num_frames=frames)
    image, hints = inputs.image, inputs.hints
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, {frames} frames at {size}x{size}")
    small = HintSet(hints.image_size, hints.drags, hints.brushes, 3)
    preview(image, small, progress=False)  # warm-up (imports, OpenCV filters, allocator)

    t_compute, result = best_of(lambda: preview(image, hints, progress=False), args.repeats)
    print(f"compute (densify + warp + fill): {t_compute:6.2f} s   {result.timings}")

    img = result.frames[0]
    flow = result.flow
    t_batched, _ = best_of(lambda: warp_frames(img, flow), args.repeats)
    t_loop, _ = best_of(lambda: [warp_frames(img, flow[i : i + 1]) for i in range(flow.shape[0])], args.repeats)
    ratio = t_loop / t_batched
    print(f"warp: batched {t_batched:6.2f} s | per-frame loop {t_loop:6.2f} s | speedup {ratio:4.2f}x")
    t_full, _ = best_of(lambda: warp_frames(img, flow, stride=1), args.repeats)
    t_splat, _ = best_of(lambda: warp_frames(img, flow, method="splat"), args.repeats)
    print(f"warp variants: full-resolution reversal {t_full:6.2f} s | colour splatting + fill {t_splat:6.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        t_mp4, _ = best_of(lambda: export_video(result.frames, Path(tmp) / "v.mp4", fps=20), args.repeats)

        def everything() -> None:
            out = preview(inputs.image, inputs.hints, progress=False)
            write_preview_outputs(Path(tmp) / "clip.mp4", out, inputs, fps=20, metadata={"timing": out.timings})

        t_total, _ = best_of(everything, args.repeats)
    print(f"mp4 encode alone: {t_mp4:6.2f} s | preview + all outputs (mp4 gif flow png json): {t_total:6.2f} s")
    print(
        f"RESULT frames={frames} size={size} compute_s={t_compute:.2f} densify_s={result.timings['densify']:.2f} "
        f"warp_s={result.timings['warp']:.2f} total_with_encoding_s={t_total:.2f} mp4_encode_s={t_mp4:.2f} "
        f"warp_batched_s={t_batched:.2f} warp_loop_s={t_loop:.2f} batched_speedup={ratio:.2f} "
        f"warp_stride1_s={t_full:.2f} warp_colour_splat_s={t_splat:.2f} "
        f"target_5s_met={int(t_compute < 5.0)}"
    )


if __name__ == "__main__":
    main()
