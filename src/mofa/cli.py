"""The ``mofa`` command line. Commands are thin: they parse, call the library, print.

Heavy imports stay inside commands so ``mofa --help`` is instant. A :class:`~mofa.errors.MofaInputError` becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mofa.errors import MofaInputError

app = typer.Typer(
    name="mofa",
    help="Controllable image animation (MOFA-Video): hints → flow → Stable Video Diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---------------------------------------------------------------------------------------------------------------------
# preview, demo (weight-free; the logic lives in mofa.pipelines.preview)
# ---------------------------------------------------------------------------------------------------------------------

PREVIEW_EPILOG = (
    "Examples:\n\n"
    "  mofa preview photo.jpg --tracks drags.json --out out/photo.mp4\n\n"
    "  mofa preview photo.jpg -t drags.json --brush hair.png --static face.png -o hair.mp4\n\n"
    "  mofa preview photo.jpg -t drags.json --s2d cmp --cmp ckpt_iter_42000.pth.tar -o cmp.mp4\n\n"
    "Writes OUT.mp4, OUT.gif, OUT_flow.mp4 (flow colours), OUT_hints.png (the drags drawn on the image) and OUT.json "
    "(inputs, parameters, timings). Hint coordinates are pixels of the prepared image (short side --size, centre "
    "crop to multiples of 64), or of the original image if the JSON's image_size says so; see docs/formats.md."
)


# Options shared by `preview` and `animate`, declared once.
TracksOption = Annotated[Path, typer.Option("--tracks", "-t", help="Hints JSON: drag tracks (docs/formats.md).")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output video OUT.mp4 (siblings are written beside).")]
FpsOption = Annotated[float, typer.Option("--fps", min=0.1, max=120.0, help="Frames per second of the outputs.")]
SizeOption = Annotated[int, typer.Option("--size", min=64, max=2048, help="Short side of the prepared image.")]
S2dOption = Annotated[str, typer.Option("--s2d", help="Sparse-to-dense: classic (no weights) or cmp.")]


def _resolve_s2d(s2d: str, cmp: object | None) -> str:
    """The sparse-to-dense choice of --s2d / --cmp ("classic" or "cmp"; a given --cmp means cmp); validates both."""
    if s2d not in ("classic", "cmp"):
        raise MofaInputError(f"--s2d {s2d!r} is not one of classic, cmp")
    if cmp is not None:
        return "cmp"
    if s2d == "cmp":
        raise MofaInputError(
            "--s2d cmp needs the checkpoint: add --cmp PATH (ckpt_iter_42000.pth.tar, a folder or a released tree)"
        )
    return "classic"


def _load_densifier(s2d: str, cmp: Path | None) -> tuple[object | None, str]:
    """(densifier or None for the classic default, label for the metadata); validates the flags."""
    if _resolve_s2d(s2d, cmp) == "classic":
        return None, "classic"
    from mofa.io.weights import load_cmp_checkpoint, resolve_cmp_checkpoint

    return load_cmp_checkpoint(resolve_cmp_checkpoint(cmp)), f"cmp:{cmp}"


def _image_metadata(inputs: Any) -> dict[str, Any]:
    """The sidecar's description of the image preparation (shared by preview, demo and animate)."""
    h, w = inputs.hints.image_size
    return {
        "raw_size": list(inputs.transform.raw_size),
        "prepared_size": [h, w],
        "crop_top_left": [inputs.transform.crop_top, inputs.transform.crop_left],
        "hints_grid": inputs.hints_grid,
    }


def _run_preview(
    image: object,
    tracks: object,
    out: Path,
    *,
    brush: list[Path] | None = None,
    static: list[Path] | None = None,
    frames: int | None = None,
    fps: float = 20.0,
    size: int = 512,
    s2d: str = "classic",
    cmp: Path | None = None,
    reference_mode: bool = False,
    command: str = "preview",
    sources: dict[str, object] | None = None,
) -> dict[str, Path]:
    """Validate everything, compute the preview, then write all outputs at once (shared by preview and demo)."""
    import time

    start = time.perf_counter()
    if not (fps > 0):
        raise MofaInputError(f"--fps must be > 0, got {fps}")
    from mofa import __version__
    from mofa.pipelines.preview import prepare_inputs, preview, preview_output_paths, write_preview_outputs

    paths = preview_output_paths(out)
    inputs = prepare_inputs(
        image, tracks, brush=brush or None, static=static or None, size=size, num_frames=frames,
        reference_mode=reference_mode,
    )  # fmt: skip
    densifier, s2d_label = _load_densifier(s2d, cmp)
    result = preview(inputs.image, inputs.hints, densifier=densifier, reference_mode=reference_mode)
    metadata = {
        "command": command,
        "mofa_version": __version__,
        "inputs": {**inputs.sources, **(sources or {})},
        "image": _image_metadata(inputs),
        "params": {
            "num_frames": inputs.hints.num_frames,
            "fps": fps,
            "size": size,
            "s2d": s2d_label,
            "reference_mode": reference_mode,
        },
        "hints": {"tracks": [d.points.tolist() for d in inputs.hints.drags], "brushes": len(inputs.hints.brushes)},
        "seed": None,
        "timing": {**result.timings, "total_compute": time.perf_counter() - start},
    }
    return write_preview_outputs(paths["video"], result, inputs, fps, metadata)


def _print_outputs(paths: dict[str, Path]) -> None:
    labels = {"video": "video", "gif": "gif", "flow": "flow colours", "hints": "hints overlay", "metadata": "metadata"}
    for key, p in paths.items():
        typer.echo(f"{labels.get(key, key):>14}: {p}")


@app.command("preview", epilog=PREVIEW_EPILOG)
def preview_command(
    image: Annotated[Path, typer.Argument(help="Input image (PNG/JPEG/WebP); prepared to --size short side.")],
    tracks: TracksOption,
    out: OutOption,
    brush: Annotated[
        list[Path] | None, typer.Option("--brush", help="Motion-brush mask PNG/NPY (repeatable).")
    ] = None,
    static: Annotated[
        list[Path] | None, typer.Option("--static", help="Static-brush mask PNG/NPY: keep this region still.")
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option("--frames", min=2, max=200, help="Frames incl. frame 0 (default: the JSON's num_frames, 25)."),
    ] = None,
    fps: FpsOption = 20.0,
    size: SizeOption = 512,
    s2d: S2dOption = "classic",
    cmp: Annotated[Path | None, typer.Option("--cmp", help="CMP checkpoint for --s2d cmp.")] = None,
    reference_mode: Annotated[
        bool, typer.Option("--reference-mode", help="Reference (MOFA-Video) numerics for resizing and hints.")
    ] = False,
) -> None:
    """Animate an image from drag hints without diffusion weights (forward warping; seconds on a CPU)."""
    paths = _run_preview(
        image, tracks, out, brush=brush, static=static, frames=frames, fps=fps, size=size, s2d=s2d, cmp=cmp,
        reference_mode=reference_mode,
    )  # fmt: skip
    _print_outputs(paths)


@app.command("demo", epilog="Example:\n\n  mofa demo --out-dir mofa_demo")
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the outputs.")] = Path("mofa_demo"),
    frames: Annotated[int | None, typer.Option("--frames", min=2, max=200, help="Frames incl. frame 0.")] = None,
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=120.0, help="Frames per second.")] = 20.0,
) -> None:
    """Animate scikit-image's astronaut photo with the bundled demo drags (no weights, no download)."""
    from importlib import resources

    from skimage.data import astronaut

    if out_dir.exists() and not out_dir.is_dir():
        raise MofaInputError(f"--out-dir {str(out_dir)!r} is a file; pass a folder name")
    tracks = resources.files("mofa") / "assets" / "demo_tracks.json"
    with resources.as_file(tracks) as tracks_path:
        paths = _run_preview(
            astronaut(), tracks_path, out_dir / "astronaut.mp4", frames=frames, fps=fps, command="demo",
            sources={"image": "skimage.data.astronaut()", "tracks": "mofa/assets/demo_tracks.json"},
        )  # fmt: skip
    typer.echo(f"mofa demo: animated the astronaut with {tracks.name}; outputs:")
    _print_outputs(paths)


# ---------------------------------------------------------------------------------------------------------------------
# animate (diffusion; the logic lives in mofa.pipelines.pipeline_mofa)
# ---------------------------------------------------------------------------------------------------------------------

ANIMATE_EPILOG = (
    "Examples:\n\n"
    "  mofa animate photo.jpg --tracks drags.json --svd stabilityai/stable-video-diffusion-img2vid-xt-1-1 "
    "--adapter MyNiuuu/MOFA-Video-Traj --out out/photo.mp4\n\n"
    "  mofa animate photo.jpg -t drags.json --svd MOFA-Video-Traj --adapter MOFA-Video-Traj --cmp MOFA-Video-Traj "
    "--dtype fp16 --device cuda -o photo.mp4\n\n"
    "  mofa animate photo.jpg -t drags.json --brush hair.png --svd svd/ --adapter adapter/ --frames 50 "
    "--low-memory -o long.mp4\n\n"
    "Writes OUT.mp4, OUT.gif, OUT_flow.mp4, OUT_hints.png and OUT.json (inputs, parameters, seed, timings). "
    "--svd/--adapter/--cmp take hub ids, released MOFA-Video trees or plain folders; offline, a hub id that is not "
    "cached fails with the list of files to place locally."
)


@app.command("animate", epilog=ANIMATE_EPILOG)
def animate_command(
    image: Annotated[Path, typer.Argument(help="Input image; prepared to --size short side, crop to x64.")],
    tracks: TracksOption,
    out: OutOption,
    svd: Annotated[
        str, typer.Option("--svd", help="SVD-XT 1.1: hub id, folder, or released tree.")
    ] = "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
    adapter: Annotated[
        str, typer.Option("--adapter", help="MOFA-Adapter: hub id, folder, or released tree.")
    ] = "MyNiuuu/MOFA-Video-Traj",
    cmp: Annotated[
        str | None, typer.Option("--cmp", help="CMP checkpoint / tree / hub id (sparse-to-dense network).")
    ] = None,
    s2d: S2dOption = "classic",
    brush: Annotated[list[Path] | None, typer.Option("--brush", help="Motion-brush mask PNG/NPY.")] = None,
    static: Annotated[list[Path] | None, typer.Option("--static", help="Static-brush mask PNG/NPY.")] = None,
    frames: Annotated[
        int | None, typer.Option("--frames", min=2, max=400, help="Frames incl. frame 0; > 25 uses sliding windows.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=200, help="Denoising steps.")] = 25,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (the reference app uses 42).")] = 42,
    scale: Annotated[
        float, typer.Option("--scale", min=0.0, max=2.0, help="Adapter conditioning scale (reference UI: 0.6).")
    ] = 0.6,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps ...")] = "auto",
    low_memory: Annotated[
        bool,
        typer.Option(
            "--low-memory", help="Guidance halves one after the other (always so on a CPU) and CPU offload on GPUs."
        ),
    ] = False,
    reference_mode: Annotated[
        bool, typer.Option("--reference-mode", help="Reproduce the original MOFA-Video numerics.")
    ] = False,
    fps: FpsOption = 20.0,
    size: SizeOption = 512,
) -> None:
    """Animate an image with Stable Video Diffusion + the MOFA-Adapter, following drag hints."""
    import time

    import torch

    from mofa import __version__
    from mofa.pipelines.preview import PreviewOutput, prepare_inputs, preview_output_paths, write_preview_outputs

    start = time.perf_counter()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise MofaInputError(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
    _resolve_s2d(s2d, cmp)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    paths = preview_output_paths(out)  # validates --out before any heavy work
    inputs = prepare_inputs(
        image, tracks, brush=brush or None, static=static or None, size=size, num_frames=frames,
        reference_mode=reference_mode,
    )  # fmt: skip
    from mofa import MofaVideoPipeline

    typer.echo(f"loading SVD ({svd}), adapter ({adapter}){f', CMP ({cmp})' if cmp else ''} ...", err=True)
    pipe = MofaVideoPipeline.from_released(svd=svd, adapter=adapter, cmp=cmp, torch_dtype=dtypes[dtype])
    if low_memory and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
        if pipe.flow_model is not None:  # excluded from offloading (small): keep it on the accelerator
            pipe.flow_model.to(device)
    else:
        pipe.to(device)
    loaded = time.perf_counter()
    result = pipe(
        torch.from_numpy(inputs.image).permute(2, 0, 1).float() / 255.0,
        hints=inputs.hints,
        num_frames=inputs.hints.num_frames,
        num_inference_steps=steps,
        conditioning_scale=scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
        reference_mode=reference_mode,
        low_memory=True if low_memory else None,  # None: the pipeline's per-device default (halves apart on a CPU)
    )
    generated = time.perf_counter()
    video = PreviewOutput(frames=result.frames[0].cpu(), flow=result.flow[0], holes=torch.zeros(0))
    metadata = {
        "command": "animate",
        "mofa_version": __version__,
        "inputs": {**inputs.sources, "svd": svd, "adapter": adapter, "cmp": cmp},
        "image": _image_metadata(inputs),
        "params": {
            "num_frames": inputs.hints.num_frames,
            "steps": steps,
            "conditioning_scale": scale,
            "s2d": "cmp" if pipe.flow_model is not None else "classic",
            "dtype": dtype,
            "device": device,
            "low_memory": low_memory,
            "reference_mode": reference_mode,
            "fps": fps,
            "size": size,
        },
        "hints": {"tracks": [d.points.tolist() for d in inputs.hints.drags], "brushes": len(inputs.hints.brushes)},
        "seed": seed,
        "timing": {"load": loaded - start, "generate": generated - loaded},
    }
    _print_outputs(write_preview_outputs(paths["video"], video, inputs, fps, metadata))


# ---------------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------------

convert_app = typer.Typer(
    help="Convert released checkpoints to safetensors / diffusers folders (safe loading only).",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("cmp")
def convert_cmp(
    in_path: Annotated[Path, typer.Argument(help="Released ckpt_iter_42000.pth.tar, .safetensors or CMP folder.")],
    out_path: Annotated[Path, typer.Argument(help="OUT.safetensors (one file) or a path without suffix (folder).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert the CMP sparse-to-dense checkpoint.

    Usage:
        mofa convert cmp ckpt_iter_42000.pth.tar cmp.safetensors
        mofa convert cmp ckpt_iter_42000.pth.tar flow_model/
    """
    from mofa.io.weights import convert_cmp_checkpoint

    report = convert_cmp_checkpoint(in_path, out_path, overwrite=overwrite)
    typer.echo(str(report))


# ---------------------------------------------------------------------------------------------------------------------
# app (owned by the app engineer; the logic lives in mofa.app)
# ---------------------------------------------------------------------------------------------------------------------


@app.command("app")
def app_command(
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind; 0.0.0.0 exposes the app to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 7860,
    svd: Annotated[
        str | None, typer.Option("--svd", help="SVD-XT 1.1 folder, released tree or hub id (enables Generate).")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="MOFA-Adapter folder, released MOFA-Video-Traj tree or hub id (for Generate)."),
    ] = None,
    cmp: Annotated[
        str | None,
        typer.Option("--cmp", help="CMP checkpoint (.pth.tar / .safetensors / tree / hub id); default: no weights."),
    ] = None,
    share: Annotated[bool, typer.Option("--share/--no-share", help="Also open a public gradio.live link.")] = False,
    size: Annotated[int, typer.Option("--size", min=64, max=2048, help="Short side of prepared uploads.")] = 512,
    device: Annotated[str, typer.Option("--device", help="Device of the models, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: float32, float16 or bfloat16.")] = "float32",
) -> None:
    """Open the web app: draw trajectories and brushes, preview the motion, generate, download.

    Without weights, Preview works and Generate explains how to get them. Models load once, here.

    Usage:
        mofa app
        mofa app --cmp ckpts/mofa-traj
        mofa app --svd ckpts/svd --adapter ckpts/mofa-traj --cmp ckpts/mofa-traj --port 7861
    """
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise MofaInputError(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
    try:
        from mofa.app import build_demo, launch
    except ImportError as err:
        raise MofaInputError(f"the app needs gradio ({err}); install it with: pip install 'mofa[app]'") from None

    pipeline, densifier = None, None
    if svd is not None or adapter is not None:
        from mofa import MofaVideoPipeline
        from mofa.io.weights import SVD_HUB_ID, TRAJ_HUB_ID

        typer.echo("loading the diffusion pipeline ...", err=True)
        pipeline = MofaVideoPipeline.from_released(
            svd=svd or SVD_HUB_ID, adapter=adapter or TRAJ_HUB_ID, cmp=cmp, torch_dtype=dtypes[dtype], device=device
        )
        densifier = getattr(pipeline, "flow_model", None)
    elif cmp is not None:
        from mofa.io.weights import load_cmp_checkpoint, resolve_cmp_checkpoint

        densifier = load_cmp_checkpoint(resolve_cmp_checkpoint(cmp), device=device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: binding {host}: anyone who can reach this machine can use the app", err=True)
    demo = build_demo(pipeline=pipeline, cmp=densifier, short_side=size)
    try:
        launch(demo, host=host, port=port, share=share)
    except OSError as err:
        raise MofaInputError(f"cannot serve on {host}:{port} ({err}); pass another --port") from None


# ---------------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app, turning bad user input into one line and exit code 2."""
    # Before torch loads: PyTorch's CPU allocator then backs large tensors with transparent huge pages. oneDNN
    # re-lays out every convolution weight into fresh buffers on each call, and first-touching them 4 KiB page by
    # page is what dominates a CPU denoising step at small sizes (~20 s → ~3 s per full-size SVD-XT UNet call at
    # 64x64 on this project's 2-core VMs; no speed change measured at 256x256, memory effect not isolated — see
    # docs/benchmarks.md). A user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        app(args=argv)
    except MofaInputError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a command (typer maps Ctrl-C inside one to exit 130 itself)
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
