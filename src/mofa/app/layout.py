"""The Gradio page: components and wiring only. Every decision lives in :mod:`mofa.app.handlers`.

``build_demo`` builds the Blocks and never launches; ``launch`` starts a server (``mofa app`` calls both). The models
are passed in already loaded — nothing is loaded at import or inside a click.

API endpoints (for ``gradio_client`` and tests; the page itself uses the image's select event):
``/upload(file)``, ``/click(mode, radius, x, y)``, ``/new_track()``, ``/undo()``, ``/clear()``,
``/preview(num_frames, control_scale, seed, steps)``, ``/generate(num_frames, control_scale, seed, steps)``.
The per-session :class:`~mofa.app.state.AppState` is kept server-side in a ``gr.State``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from mofa.app import handlers
from mofa.app.handlers import MODES, Limits, Notice, RunSettings
from mofa.app.state import AppState

__all__ = ["build_demo", "launch"]

_INTRO = """\
# MOFA-Video: animate an image with trajectories and brushes
1. **Upload** an image (resized to a {short_side} px short side, cropped to multiples of 64).
2. **Click** on it: each click adds a point to the current trajectory (first point = frame 0, last = last frame).
   *New track* starts another one; a one-point track pins its spot. Switch the click mode to paint a **motion brush**
   (trajectories starting inside it move only the painted region) or a **static brush** (painted region stays still).
3. **Preview** (seconds, no weights) shows the dense motion and a warped animation; **Generate** runs the diffusion
   model. Downloads include the hints JSON, so the command line re-runs the same animation (from the original or the
   prepared image): `mofa preview photo.jpg --tracks photo_hints.json --out photo.mp4{size_flag}`
"""


def _toast(notice: Notice | None) -> str:
    """Show a warning toast for warnings; return the text for the status line."""
    if notice is None:
        return ""
    if notice.level == "warning":
        gr.Warning(notice.text, duration=8)
    return notice.text


def _status(state: AppState, notice: Notice | None) -> str:
    text = _toast(notice)
    summary = handlers.describe(state)
    if notice is not None and notice.level == "warning":
        return f"⚠️ {text}\n\n{summary}"
    return f"{text}\n\n{summary}" if text else summary


def _drawing_outputs(state: AppState, notice: Notice | None) -> tuple[Any, ...]:
    """(state, canvas, status, hints JSON) after an edit."""
    return state, handlers.render(state), _status(state, notice), handlers.tracks_json(state)


def build_demo(
    pipeline: Any = None,
    cmp: Any = None,
    *,
    out_dir: str | Path | None = None,
    limits: Limits | None = None,
    max_frames: int = 25,
    short_side: int = 512,
) -> gr.Blocks:
    """Build the app (does not launch it).

    Args:
        pipeline: a loaded :class:`mofa.MofaVideoPipeline`, or None (Generate then explains how to get weights).
        cmp: a sparse-to-dense model for Preview (e.g. a loaded :class:`mofa.CMPModel`); None = the weight-free
            classic densifier.
        out_dir: where videos and downloads are written (default: a new temporary folder).
        limits: upload limits (largest image side, file size).
        max_frames: largest frame count offered by the slider (25 = the SVD-XT clip length).
        short_side: uploads are resized to this short side (512 = the reference; smaller is faster on CPU).
    """
    import mofa.pipelines.preview  # noqa: F401  (import torch & co. now, not during the first click)

    limits = limits or Limits()
    out_root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mofa-app-"))

    # ------------------------------------------------------------------ event functions (thin wrappers)
    def on_upload(state: AppState, file: Any) -> tuple[Any, ...]:
        path = getattr(file, "name", file)
        return _drawing_outputs(*handlers.load_image(state, path, limits, short_side))

    def on_select(state: AppState, mode: str, radius: float, evt: gr.SelectData) -> tuple[Any, ...]:
        return _drawing_outputs(*handlers.click(state, mode, evt.index, radius))

    def on_click(state: AppState, mode: str, radius: float, x: float, y: float) -> tuple[Any, ...]:
        return _drawing_outputs(*handlers.click(state, mode, (x, y), radius))

    def on_new_track(state: AppState) -> tuple[Any, ...]:
        return _drawing_outputs(*handlers.new_track(state))

    def on_undo(state: AppState) -> tuple[Any, ...]:
        return _drawing_outputs(*handlers.undo(state))

    def on_clear(state: AppState) -> tuple[Any, ...]:
        return _drawing_outputs(*handlers.clear(state))

    def on_preview(state: AppState, num_frames: float, scale: float, seed: float, steps: float) -> tuple[Any, ...]:
        run = RunSettings.from_inputs(num_frames, scale, seed, steps)
        result, notice = handlers.run_preview(state, run, out_root, densifier=cmp)
        status = _status(state, notice)
        if result is None:
            return gr.skip(), gr.skip(), gr.skip(), status
        return str(result.flow_video), str(result.video), [str(p) for p in result.downloads], status

    def on_generate(
        state: AppState,
        num_frames: float,
        scale: float,
        seed: float,
        steps: float,
        progress: Any = gr.Progress(),  # noqa: B008 (gradio injects it)
    ) -> tuple[Any, ...]:
        def report(step: int, total: int) -> None:
            progress((step, total), desc="Denoising", unit="steps")

        run = RunSettings.from_inputs(num_frames, scale, seed, steps)
        result, notice = handlers.run_generate(state, run, out_root, pipeline=pipeline, progress=report)
        status = _status(state, notice)
        if result is None:
            return gr.skip(), gr.skip(), gr.skip(), status
        return str(result.flow_video), str(result.video), [str(p) for p in result.downloads], status

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title="MOFA-Video", delete_cache=(3600, 3600)) as demo:
        state = gr.State(AppState(), time_to_live=6 * 3600)  # an image per session: free idle sessions
        gr.Markdown(
            _INTRO.format(short_side=short_side, size_flag="" if short_side == 512 else f" --size {short_side}")
        )
        with gr.Row():
            with gr.Column(scale=3):
                upload = gr.UploadButton("Upload image", file_types=["image"], type="filepath", elem_id="mofa-upload")
                canvas = gr.Image(
                    label="Click to draw",
                    type="numpy",
                    format="png",
                    interactive=False,
                    buttons=["fullscreen"],
                    elem_id="mofa-canvas",
                )
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=MODES[0], label="A click adds", elem_id="mofa-mode")
                    radius = gr.Slider(1, 100, value=10, step=1, label="Brush radius (px)")
                with gr.Row():
                    new_btn = gr.Button("New track", elem_id="mofa-new-track")
                    undo_btn = gr.Button("Undo last", elem_id="mofa-undo")
                    clear_btn = gr.Button("Clear all", variant="stop", elem_id="mofa-clear")
                status = gr.Markdown(handlers.describe(AppState()), elem_id="mofa-status")
                with gr.Accordion("Drawn hints", open=False):
                    hints_view = gr.JSON(handlers.tracks_json(AppState()), elem_id="mofa-hints")
            with gr.Column(scale=2):
                num_frames = gr.Slider(2, max_frames, value=max_frames, step=1, label="Frames")
                scale = gr.Slider(0.0, 1.0, value=0.6, step=0.01, label="Control scale (Generate)")
                with gr.Row():
                    seed = gr.Number(42, precision=0, label="Seed (Generate)")
                    steps = gr.Slider(1, 50, value=25, step=1, label="Sampling steps (Generate)")
                with gr.Row():
                    preview_btn = gr.Button("Preview", variant="primary", elem_id="mofa-preview")
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="mofa-generate")
                if pipeline is None:
                    gr.Markdown("*Generate is off: the app was started without weights (press it to see how).*")
                flow_video = gr.Video(label="Motion (dense flow)", autoplay=True, loop=True, elem_id="mofa-flow")
                video = gr.Video(label="Animation", autoplay=True, loop=True, elem_id="mofa-video")
                files = gr.File(label="Downloads (mp4, gif, hints JSON, prepared image)", file_count="multiple")
        # API-only click endpoint: the page uses the image's select event, scripts pass x/y directly.
        x_in = gr.Number(visible=False)
        y_in = gr.Number(visible=False)
        click_btn = gr.Button(visible=False)

        drawing = [state, canvas, status, hints_view]
        upload.upload(on_upload, [state, upload], drawing, api_name="upload")
        canvas.select(on_select, [state, mode, radius], drawing, api_visibility="private")
        click_btn.click(on_click, [state, mode, radius, x_in, y_in], drawing, api_name="click")
        new_btn.click(on_new_track, [state], drawing, api_name="new_track")
        undo_btn.click(on_undo, [state], drawing, api_name="undo")
        clear_btn.click(on_clear, [state], drawing, api_name="clear")
        run_inputs = [state, num_frames, scale, seed, steps]
        preview_btn.click(
            on_preview, run_inputs, [flow_video, video, files, status], api_name="preview", concurrency_limit=2
        )
        generate_btn.click(
            on_generate,
            run_inputs,
            [flow_video, video, files, status],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="diffusion",
        )
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    limits: Limits | None = None,
    block: bool = True,
) -> Any:
    """Queue and serve ``demo`` on ``host:port`` (``block=False`` returns at once, the server runs in a thread)."""
    limits = limits or Limits()
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=limits.max_file_bytes,
        show_error=True,
        state_session_capacity=256,  # each session holds an image (~1 MB); bound the memory
        prevent_thread_lock=not block,
        quiet=not block,
    )
