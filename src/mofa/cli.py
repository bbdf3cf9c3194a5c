"""The ``mofa`` command line. Commands are thin: they parse, call the library, print.

Heavy imports stay inside commands so ``mofa --help`` is instant. A :class:`~mofa.errors.MofaInputError` becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes the app to the network."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="TCP port."),
    svd: str | None = typer.Option(
        None, "--svd", help="SVD-XT 1.1 folder, released tree or hub id (enables Generate)."
    ),
    adapter: str | None = typer.Option(
        None, "--adapter", help="MOFA-Adapter folder, released MOFA-Video-Traj tree or hub id (enables Generate)."
    ),
    cmp: str | None = typer.Option(
        None, "--cmp", help="CMP checkpoint (.pth.tar / .safetensors / tree / hub id); default: weight-free densifier."
    ),
    share: bool = typer.Option(False, "--share/--no-share", help="Also open a public gradio.live link."),
    device: str = typer.Option("cpu", "--device", help="Device of the models, e.g. cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, float16 or bfloat16."),
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
    demo = build_demo(pipeline=pipeline, cmp=densifier)
    try:
        launch(demo, host=host, port=port, share=share)
    except OSError as err:
        raise MofaInputError(f"cannot serve on {host}:{port} ({err}); pass another --port") from None


# ---------------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app, turning bad user input into one line and exit code 2."""
    try:
        app(args=argv)
    except MofaInputError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
