"""The app's event handlers as pure functions of (state, event) → (state, outputs, notice).

Nothing here imports gradio: :mod:`mofa.app.layout` wires these functions to components and turns a
:class:`Notice` into a toast. No model logic lives here either — handlers build a :class:`~mofa.hints.HintSet` from the
clicks and call the library (:func:`mofa.pipelines.preview.preview`, :class:`mofa.MofaVideoPipeline`), which the
command line reaches the same way. User mistakes (a bad upload, a preview with nothing drawn) never raise: they come
back as a warning :class:`Notice` and the state is unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mofa.app.state import AppState
from mofa.errors import MofaInputError

__all__ = [
    "MODES",
    "Limits",
    "Notice",
    "RunOutputs",
    "RunSettings",
    "click",
    "clear",
    "describe",
    "hints_from_state",
    "load_image",
    "new_track",
    "render",
    "run_generate",
    "run_preview",
    "tracks_json",
    "undo",
    "weights_help",
]

MODES = ("Trajectory", "Motion brush", "Static brush")
"""What a click on the image does: add a trajectory point, or stamp a motion-brush / static-brush circle."""

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Notice:
    """A message for the user. ``level="warning"`` means nothing was done (the state is unchanged)."""

    level: Literal["info", "warning"]
    text: str

    @classmethod
    def info(cls, text: str) -> Notice:
        return cls("info", text)

    @classmethod
    def warning(cls, text: str) -> Notice:
        return cls("warning", text)


@dataclass(frozen=True)
class Limits:
    """Upload limits. Both are checked before the image is decoded."""

    max_side: int = 4096
    max_file_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class RunSettings:
    """The knobs of a preview / generation (reference app defaults, spec §2.1 and §7.3)."""

    num_frames: int = 25
    seed: int = 42
    control_scale: float = 0.6
    num_inference_steps: int = 25
    fps: int = 20

    @classmethod
    def from_inputs(cls, num_frames: Any, control_scale: Any, seed: Any, num_inference_steps: Any) -> RunSettings:
        """From raw UI values (floats, or None / NaN when a box was cleared: the default is used then)."""
        d = cls()

        def num(value: Any, default: float) -> float:
            try:
                out = float(value)
            except (TypeError, ValueError):
                return default
            return out if math.isfinite(out) else default

        return cls(
            num_frames=int(round(num(num_frames, d.num_frames))),
            seed=int(num(seed, d.seed)),
            control_scale=num(control_scale, d.control_scale),
            num_inference_steps=int(round(num(num_inference_steps, d.num_inference_steps))),
        )


@dataclass(frozen=True)
class RunOutputs:
    """Files written by a preview or a generation.

    Attributes:
        video: the animation (mp4). flow_video: the dense flow in colour (mp4, frame 0 white), preview only.
        downloads: mp4, gif, the hints JSON (``mofa preview IMAGE --tracks`` format) and the prepared input PNG.
        seconds: wall time of the model call.
    """

    video: Path
    flow_video: Path | None
    downloads: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------- upload
def load_image(
    state: AppState, path: str | Path | None, limits: Limits | None = None, short_side: int = 512
) -> tuple[AppState, Notice]:
    """Read, check and prepare an uploaded image (short side ``short_side``, sides multiples of 64, spec §2.1).

    Returns a fresh state (hints dropped) on success, or the unchanged ``state`` and a warning naming the problem.
    """
    limits = limits or Limits()
    if path is None or str(path) == "":
        return state, Notice.warning("No file received; choose a PNG or JPEG image.")
    path = Path(path)
    name = path.name
    if not path.is_file():
        return state, Notice.warning(f"Upload {name!r} did not arrive; try again.")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return state, Notice.warning(
            f"{name} is {size / 2**20:.1f} MB; the limit is {limits.max_file_bytes / 2**20:.0f} MB. "
            "Save a smaller JPEG/PNG and upload again."
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # lazy: reads the header only, so the size check below costs nothing
            width, height = img.size
            if max(width, height) > limits.max_side:
                return state, Notice.warning(
                    f"{name} is {width}x{height} px; the largest side allowed is {limits.max_side} px. "
                    f"Downscale it (it is resized to a {short_side} px short side anyway) and upload again."
                )
            img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({first_line})"
        return state, Notice.warning(f"{name} is {reason}; upload a PNG, JPEG or WebP image.")
    from mofa.io.image import prepare_image

    try:
        prepared = prepare_image(path, short_side=short_side)
    except MofaInputError as exc:
        return state, Notice.warning(str(exc))
    new = state.with_image(prepared, source_name=path.stem or "image")
    h, w = new.image_size or (0, 0)
    return new, Notice.info(
        f"Loaded {name} ({width}x{height}) → prepared to {w}x{h}. Click on the image to draw a trajectory."
    )


# ---------------------------------------------------------------------------------------------------------- drawing
def click(
    state: AppState, mode: str, xy: tuple[float, float] | list[float] | None, radius: float = 10
) -> tuple[AppState, Notice | None]:
    """A click at pixel ``xy`` = (x, y) of the prepared image: add a point (``mode="Trajectory"``) or stamp a
    brush circle of ``radius`` pixels (``"Motion brush"`` / ``"Static brush"``)."""
    if state.image is None:
        return state, Notice.warning("Upload an image first, then click on it.")
    if xy is None or len(xy) != 2:
        return state, Notice.warning("That click carried no position; click on the image itself.")
    h, w = state.image_size or (0, 0)
    try:
        x, y = int(round(float(xy[0]))), int(round(float(xy[1])))
    except (TypeError, ValueError):
        return state, Notice.warning(f"Click position {xy!r} is not a pair of numbers.")
    if not (0 <= x < w and 0 <= y < h):
        return state, Notice.warning(f"Click ({x}, {y}) is outside the {w}x{h} image.")
    if mode == "Trajectory":
        return state.add_point((x, y)), None
    if mode in ("Motion brush", "Static brush"):
        r = int(round(float(radius)))
        if r < 1:
            return state, Notice.warning(f"Brush radius must be at least 1 px, got {radius}.")
        return state.add_stamp("move" if mode == "Motion brush" else "static", (x, y, r)), None
    return state, Notice.warning(f"Unknown drawing mode {mode!r}; choose one of {', '.join(MODES)}.")


def new_track(state: AppState) -> tuple[AppState, Notice | None]:
    """Start a new trajectory with the next click."""
    if state.image is None:
        return state, Notice.warning("Upload an image first.")
    if not state.tracks[-1]:
        return state, Notice.info("The next click starts a new track.")
    return state.new_track(), None


def undo(state: AppState) -> tuple[AppState, Notice | None]:
    """Remove the last point or brush stamp."""
    if state.is_empty:
        return state, Notice.info("Nothing to undo.")
    return state.undo(), None


def clear(state: AppState) -> tuple[AppState, Notice | None]:
    """Remove every track and brush stamp (the image stays)."""
    return state.clear(), None


def _brush_masks(state: AppState) -> dict[str, np.ndarray]:
    """Rasterised brush masks ``[H, W]`` bool by kind ("move" / "static"), only for kinds with stamps."""
    from mofa.hints import brush_from_circles

    size = state.image_size
    out: dict[str, np.ndarray] = {}
    if size is None:
        return out
    for kind, stamps in (("move", state.move_stamps), ("static", state.static_stamps)):
        if stamps:
            out[kind] = brush_from_circles(size, [(float(x), float(y), float(r)) for x, y, r in stamps], kind).mask
    return out


def render(state: AppState) -> np.ndarray | None:
    """The image with brushes tinted and each track drawn in its own colour, uint8 ``[H, W, 3]`` (None: no image)."""
    if state.image is None:
        return None
    from mofa import viz

    canvas = np.array(state.image)
    for kind, mask in _brush_masks(state).items():
        canvas = viz.overlay_mask(canvas, mask, color=(0, 200, 255) if kind == "move" else (255, 60, 60))
    tracks = [np.asarray(t, dtype=np.float64) for t in state.tracks if t]
    if tracks:
        canvas = viz.draw_tracks(canvas, tracks)
    return np.asarray(canvas, dtype=np.uint8)


def describe(state: AppState) -> str:
    """One-line summary of what is drawn (markdown)."""
    if state.image is None:
        return "No image yet: upload one."
    h, w = state.image_size or (0, 0)
    tracks = state.drawn_tracks
    parts = [f"{w}x{h} image", f"{len(tracks)} track(s)"]
    if tracks:
        parts[-1] += " (" + ", ".join(f"#{i + 1}: {len(t)} pt" for i, t in enumerate(tracks)) + ")"
    if state.move_stamps:
        parts.append(f"motion brush: {len(state.move_stamps)} stamp(s)")
    if state.static_stamps:
        parts.append(f"static brush: {len(state.static_stamps)} stamp(s)")
    if state.history and state.history[-1] == "point":
        x, y = next(t for t in reversed(state.tracks) if t)[-1]
        parts.append(f"last point ({x}, {y})")
    if tracks and not state.tracks[-1]:
        parts.append("next click starts a new track")
    return " · ".join(parts)


def tracks_json(state: AppState) -> dict[str, Any]:
    """The drawn clicks as a small JSON-ready dict (shown in the UI; also what tests look at)."""
    return {
        "image_size": list(state.image_size) if state.image_size else None,
        "tracks": [[list(p) for p in t] for t in state.drawn_tracks],
        "move_brush": [list(s) for s in state.move_stamps],
        "static_brush": [list(s) for s in state.static_stamps],
    }


# ---------------------------------------------------------------------------------------------------------- hints
def hints_from_state(state: AppState, num_frames: int) -> tuple[Any, list[str]]:
    """The :class:`~mofa.hints.HintSet` of the drawn clicks and brushes, plus notes for the user.

    Raises :class:`MofaInputError` (a readable message) when there is nothing to animate.
    """
    from mofa.hints import DragHint, HintSet, MotionBrush

    if state.image is None:
        raise MofaInputError("Upload an image first.")
    tracks = state.drawn_tracks
    if not tracks:
        hint = " (brushes only restrict where trajectories act)" if (state.move_stamps or state.static_stamps) else ""
        raise MofaInputError(f"Draw at least one trajectory: click two points on the image{hint}.")
    notes = []
    anchors = [i + 1 for i, t in enumerate(tracks) if len(t) == 1]
    if anchors:
        notes.append(f"track(s) {anchors} have one point and act as static anchors; click a second point to move")
    if len(anchors) == len(tracks):
        notes.append("nothing will move")
    masks = _brush_masks(state)
    starts = [t[0] for t in tracks]
    if "move" in masks and not any(masks["move"][y, x] for x, y in starts):
        notes.append("no track starts inside the motion brush, so the brush changes nothing")
    if "static" in masks:
        pinned = [i + 1 for i, (x, y) in enumerate(starts) if masks["static"][y, x] and len(tracks[i]) > 1]
        if pinned:
            notes.append(f"track(s) {pinned} start inside the static brush, which keeps that region still")
    brushes = [MotionBrush(mask, kind=kind) for kind, mask in masks.items()]  # type: ignore[arg-type]
    hints = HintSet(
        image_size=state.image_size,  # type: ignore[arg-type]
        drags=[DragHint.from_points(t) for t in tracks],
        brushes=brushes,
        num_frames=int(num_frames),
    )
    return hints, notes


def _check_settings(settings: RunSettings) -> None:
    if not 2 <= int(settings.num_frames) <= 200:
        raise MofaInputError(f"Frame count must be between 2 and 200, got {settings.num_frames}.")
    if not 0.0 <= float(settings.control_scale) <= 10.0:
        raise MofaInputError(f"Control scale must be in [0, 10], got {settings.control_scale}.")
    if int(settings.num_inference_steps) < 1:
        raise MofaInputError(f"Sampling steps must be >= 1, got {settings.num_inference_steps}.")
    if not 0 <= int(settings.seed) < 2**63:
        raise MofaInputError(f"Seed must be an integer in [0, 2^63), got {settings.seed}.")


def _fresh_dir(root: Path, stem: str) -> Path:
    """A new output folder under ``root``; folders older than an hour are removed (sessions leave them behind)."""
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        if old.is_dir() and now - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=root))


def _write_downloads(state: AppState, hints: Any, frames: Any, out: Path, stem: str, fps: int) -> list[Path]:
    """mp4 + gif of ``frames``, the hints JSON and the prepared input PNG (so the CLI can re-run the same thing)."""
    from PIL import Image

    from mofa.io.video import export_video

    mp4 = export_video(frames, out / f"{stem}.mp4", fps=fps)
    gif = export_video(frames, out / f"{stem}.gif", fps=fps)
    json_path = out / f"{state.source_name}_hints.json"
    hints.to_json(json_path)
    png = out / f"{state.source_name}_prepared.png"
    Image.fromarray(np.asarray(state.image)).save(png)
    return [Path(mp4), Path(gif), json_path, png]


# ---------------------------------------------------------------------------------------------------------- preview
def run_preview(
    state: AppState, settings: RunSettings, out_root: str | Path, densifier: Any = None
) -> tuple[RunOutputs | None, Notice]:
    """Weight-free preview (classic densifier, or the CMP model if the app was started with ``--cmp``).

    Writes the warped preview video, the colour flow video and the downloads under ``out_root``.
    """
    try:
        _check_settings(settings)
        hints, notes = hints_from_state(state, settings.num_frames)
    except MofaInputError as exc:
        return None, Notice.warning(str(exc))
    from mofa.io.video import export_video
    from mofa.pipelines.preview import preview
    from mofa.viz import flow_video

    start = time.perf_counter()
    try:
        result = preview(
            np.array(state.image), hints, densifier=densifier, num_frames=settings.num_frames, progress=False
        )
    except MofaInputError as exc:
        return None, Notice.warning(str(exc))
    seconds = time.perf_counter() - start
    out = _fresh_dir(Path(out_root), "preview")
    stem = f"{state.source_name}_preview"
    downloads = _write_downloads(state, hints, result.frames, out, stem, settings.fps)
    flow_path = Path(export_video(flow_video(result.flow), out / f"{stem}_flow.mp4", fps=settings.fps))
    text = f"Preview: {settings.num_frames} frames in {seconds:.1f} s."
    if notes:
        text += " Note: " + "; ".join(notes) + "."
    outputs = RunOutputs(video=downloads[0], flow_video=flow_path, downloads=downloads, seconds=seconds)
    return outputs, Notice.info(text)


# ---------------------------------------------------------------------------------------------------------- generate
def weights_help() -> str:
    """How to get the model weights and start the app with them (shown when Generate has no pipeline)."""
    from mofa.io.weights import SVD_HUB_ID, TRAJ_HUB_ID

    return (
        "Generate needs the diffusion weights and this app was started without them (Preview works without "
        f"weights). Restart with hub ids, which download on first use (accept the `{SVD_HUB_ID}` licence on "
        f"huggingface.co first): `mofa app --svd {SVD_HUB_ID} --adapter {TRAJ_HUB_ID} --cmp {TRAJ_HUB_ID}`. "
        f"Offline, download them elsewhere (`hf download {SVD_HUB_ID} --local-dir ckpts/svd`, "
        f"`hf download {TRAJ_HUB_ID} --local-dir ckpts/mofa-traj`), copy them here and run "
        "`mofa app --svd ckpts/svd --adapter ckpts/mofa-traj --cmp ckpts/mofa-traj`. --svd takes a diffusers SVD "
        "folder (model_index.json, unet/, vae/, image_encoder/, scheduler/, feature_extractor/); --adapter a folder "
        "with config.json + diffusion_pytorch_model.safetensors (or the released tree holding ckpts/controlnet); "
        "--cmp the ckpt_iter_42000.pth.tar file or the released tree."
    )


def run_generate(
    state: AppState,
    settings: RunSettings,
    out_root: str | Path,
    pipeline: Any = None,
    progress: ProgressFn | None = None,
) -> tuple[RunOutputs | None, Notice]:
    """Animate with the diffusion pipeline (:class:`mofa.MofaVideoPipeline`, loaded once by ``mofa app``).

    ``progress(step, total)`` is called after each denoising step.
    """
    if pipeline is None:
        return None, Notice.warning(weights_help())
    try:
        _check_settings(settings)
        hints, notes = hints_from_state(state, settings.num_frames)
    except MofaInputError as exc:
        return None, Notice.warning(str(exc))
    import torch
    from PIL import Image

    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    total = int(settings.num_inference_steps)

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if progress is not None:
            progress(step + 1, total)
        return {}

    start = time.perf_counter()
    try:
        result = pipeline(
            image=Image.fromarray(np.asarray(state.image)),
            hints=hints,
            num_frames=settings.num_frames,
            num_inference_steps=total,
            conditioning_scale=float(settings.control_scale),
            generator=generator,
            output_type="pt",
            callback_on_step_end=on_step,
        )
    except MofaInputError as exc:
        return None, Notice.warning(str(exc))
    seconds = time.perf_counter() - start
    frames = result.frames[0] if isinstance(result.frames, (list, tuple)) or result.frames.ndim == 5 else result.frames
    flow = result.flow[0] if result.flow.ndim == 5 else result.flow
    from mofa.io.video import export_video
    from mofa.viz import flow_video

    out = _fresh_dir(Path(out_root), "generate")
    stem = f"{state.source_name}_mofa"
    downloads = _write_downloads(state, hints, frames, out, stem, settings.fps)
    flow_path = Path(export_video(flow_video(flow), out / f"{stem}_flow.mp4", fps=settings.fps))
    text = f"Generated {settings.num_frames} frames in {seconds:.0f} s (seed {settings.seed})."
    if notes:
        text += " Note: " + "; ".join(notes) + "."
    meta = {"seed": settings.seed, "control_scale": settings.control_scale, "steps": total, "seconds": seconds}
    settings_path = out / f"{stem}_settings.json"
    settings_path.write_text(json.dumps(meta) + "\n")
    downloads.append(settings_path)
    outputs = RunOutputs(video=downloads[0], flow_video=flow_path, downloads=downloads, seconds=seconds)
    return outputs, Notice.info(text)
