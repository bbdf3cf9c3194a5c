"""Weight-free preview: hints → dense flow → the input image forward-warped to every frame, with hole filling.

No diffusion: the preview shows *where* things will move, in a few seconds on a CPU. For each frame t:

1. dense flow ``F_t`` (frame 0 → t) from :func:`mofa.flow.densify.densify_hints` (default densifier: the classic,
   weight-free :class:`mofa.flow.classic.ClassicDensifier`);
2. flow reversal (:func:`mofa.flow.reverse.reverse_flow`): ``F_t`` itself is softmax-splatted (spec §8) to where
   it points, with importance ``exp(k·|F_t|)``, giving a start for the backward flow ``B_t`` — where a moving region
   lands on a still one, the moving (dragged) content wins; ``B_t`` is then refined to the exact inverse
   ``B_t(p) = F_t(p − B_t(p))``, so stretched regions (everywhere behind a large drag) stay clean, not streaky;
3. disocclusions — the strip behind the straight edge of a moved object — show the background just behind that edge,
   shifted by the motion (what ``I_0(p − F_t(p))`` shows for a translating object), instead of the edge smeared;
4. the frame is the input sampled at ``p − B_t(p)`` (bilinear, reflection at the border): no black holes, no
   cracks, no smeared border pixels.

All frames go through batched tensor ops (one splat, a few vectorised refinement steps, one resampling call).
``warp_frames(method="splat")`` keeps the direct formulation (splat the colours, fill the rest) for comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mofa.errors import MofaInputError
from mofa.flow.ops import backward_warp
from mofa.flow.reverse import FOREGROUND_SHARPNESS, importance_splat, reverse_flow, splat_importance
from mofa.hints.schema import HintSet

__all__ = [
    "PreparedInputs",
    "PreviewOutput",
    "hints_overlay",
    "prepare_inputs",
    "preview",
    "preview_output_paths",
    "warp_frames",
    "write_preview_outputs",
]


@dataclass
class PreviewOutput:
    """Result of :func:`preview`.

    Attributes:
        frames: ``[T, 3, H, W]`` float in [0, 1]; frame 0 is the input image exactly.
        flow: ``[T-1, 2, H, W]`` dense flow in pixels of the image, entry ``t-1`` = frame 0 → frame t.
        holes: ``[T-1, 1, H, W]`` float in [0, 1], how much of each pixel was filled by backward warping (1 = nothing
            landed there).
        timings: seconds spent in ``"densify"`` and ``"warp"``.
    """

    frames: torch.Tensor
    flow: torch.Tensor
    holes: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def warp_frames(
    image: torch.Tensor,
    flow: torch.Tensor,
    sharpness: float = FOREGROUND_SHARPNESS,
    stride: int = 2,
    method: str = "reverse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-warp one image by N flows at once (batched), moving content on top, holes filled.

    Args:
        image: ``[C, H, W]`` float, the reference frame.
        flow: ``[N, 2, H, W]`` forward flow in pixels of the image grid, reference frame → frame t.
        sharpness: ``k`` of the splatting importance ``exp(k·|flow|)`` (0 = plain average splatting).
        stride: grid coarsening of the flow reversal (``method="reverse"`` only), see :func:`reverse_flow`.
        method: ``"reverse"`` (default): reverse the flow by splatting it, then sample the image backwards with
            bilinear interpolation — no cracks, one image resampling. ``"splat"``: softmax-splat the colours at full
            resolution and fill what is not fully covered by the backward sample ``I_0(p − F(p))`` (slower; kept as
            the straightforward formulation).

    Returns:
        ``(frames [N, C, H, W], holes [N, 1, H, W])``: warped frames and the share of each pixel that was filled
        (1 = nothing landed there). Outside the image the backward sample reflects at the border ('reflection'
        padding), so uncovered borders mirror the picture instead of smearing the edge pixels.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"flow must be [N, 2, H, W] with the image's H, W, got {tuple(flow.shape)}")
    if method not in ("reverse", "splat"):
        raise ValueError(f"unknown warp method {method!r}; use 'reverse' or 'splat'")
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = flow.shape[0]
    img = image.to(torch.float32)
    f = flow.to(device=img.device, dtype=torch.float32)
    src = img.unsqueeze(0).expand(n, -1, -1, -1)
    if method == "reverse":
        backward, holes = reverse_flow(f, sharpness=sharpness, stride=int(stride))
        out = backward_warp(src, -backward, padding_mode="reflection")
        return out.to(image.dtype), holes.to(image.dtype)

    forward, _, coverage = importance_splat(src, f, splat_importance(f, sharpness))
    holes = (1.0 - coverage).clamp(0.0, 1.0)
    if bool((holes > 0).any()):
        backward = backward_warp(src, -f, padding_mode="reflection")
        forward = forward * (1.0 - holes) + backward * holes
    return forward.to(image.dtype), holes.to(image.dtype)


def _image_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        img = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if img.dim() != 3 or img.shape[0] != 3:
            raise MofaInputError(f"image tensor must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        if not img.is_floating_point():
            raise MofaInputError(f"image tensor must be float in [0, 1], got {img.dtype}")
        return img
    from mofa.io.image import as_uint8_image

    arr = as_uint8_image(image)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def preview(
    image: Any,
    hints: HintSet,
    densifier: Any = None,
    num_frames: int | None = None,
    reference_mode: bool = False,
    progress: bool = True,
    sharpness: float = FOREGROUND_SHARPNESS,
    stride: int = 2,
    method: str = "reverse",
) -> PreviewOutput:
    """Animate ``image`` from ``hints`` without any diffusion weights.

    Args:
        image: the prepared input image (frame 0): float tensor ``[3, H, W]`` in [0, 1], uint8 ``[H, W, 3]`` array,
            PIL image or path. ``(H, W)`` must equal ``hints.image_size``.
        hints: drags and brushes in pixels of ``image``.
        densifier: sparse-to-dense flow model (:class:`mofa.types.SparseToDense`); None = the weight-free
            :class:`mofa.flow.classic.ClassicDensifier`. ``CMPModel`` works too.
        num_frames: T including frame 0; None = ``hints.num_frames``.
        reference_mode: reference numerics in the hints → flow step (spec §2.1, §12).
        progress: show a tqdm progress bar.
        sharpness, stride, method: warping options, see :func:`warp_frames`.

    Returns:
        :class:`PreviewOutput` with ``frames [T, 3, H, W]`` (frame 0 == ``image``) and ``flow [T-1, 2, H, W]``.

    Example::

        from mofa.hints import load_hints
        from mofa.io.image import prepare_image
        from mofa.pipelines.preview import preview

        image = prepare_image("photo.jpg")                        # uint8 [H, W, 3], short side 512
        hints = load_hints("drags.json", image_size=image.shape[:2])
        out = preview(image, hints)                               # out.frames: [25, 3, H, W]
    """
    from tqdm.auto import tqdm

    from mofa.flow.densify import densify_hints

    if not isinstance(hints, HintSet):
        raise MofaInputError(f"hints must be a mofa.hints.HintSet, got {type(hints).__name__}")
    img = _image_tensor(image)
    if tuple(img.shape[-2:]) != tuple(hints.image_size):
        h, w = img.shape[-2:]
        raise MofaInputError(
            f"image is {w}x{h} but the hints are for {hints.image_size[1]}x{hints.image_size[0]} (WxH); "
            "prepare the image first (mofa.io.image.prepare_image) and draw the hints on it"
        )
    if num_frames is not None and num_frames != hints.num_frames:
        hints = HintSet(hints.image_size, hints.drags, hints.brushes, num_frames)
    if densifier is None:
        from mofa.flow.classic import ClassicDensifier

        densifier = ClassicDensifier()

    timings: dict[str, float] = {}
    with tqdm(total=2, desc="mofa preview", unit="step", disable=not progress, leave=False) as bar:
        start = time.perf_counter()
        bar.set_postfix_str("densify")
        with torch.inference_mode():
            flow = densify_hints(img, hints, densifier, out_size=hints.image_size, reference_mode=reference_mode)
        flow = flow.to(device=img.device, dtype=torch.float32)
        timings["densify"] = time.perf_counter() - start
        bar.update(1)

        start = time.perf_counter()
        bar.set_postfix_str("warp")
        with torch.inference_mode():
            warped, holes = warp_frames(img.float(), flow, sharpness=sharpness, stride=stride, method=method)
        frames = torch.cat([img.float().unsqueeze(0), warped.clamp(0.0, 1.0)], dim=0)
        timings["warp"] = time.perf_counter() - start
        bar.update(1)
    return PreviewOutput(frames=frames, flow=flow, holes=holes, timings=timings)


# ------------------------------------------------------------------------------------------------ files (CLI, demo)
@dataclass
class PreparedInputs:
    """Everything :func:`preview` needs, validated, plus where it came from (for the metadata sidecar).

    Attributes:
        image: prepared RGB uint8 ``[H, W, 3]`` (short side resized, centre-cropped to multiples of 64).
        hints: hints in pixels of the prepared image.
        transform: the raw → prepared resize + crop.
        hints_grid: ``"prepared"`` (hint coordinates were given on the prepared image) or ``"raw"`` (the hints file's
            ``image_size`` was the raw image size; coordinates and masks were mapped through ``transform``).
        sources: file names and hashes of the inputs.
    """

    image: np.ndarray
    hints: HintSet
    transform: Any
    hints_grid: str
    sources: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_hints_source(tracks: Any) -> tuple[Any, str, Path | None]:
    """(decoded JSON, display name, folder of the file) for a path, JSON text or an already-decoded object."""
    if isinstance(tracks, (str, Path)) and not str(tracks).lstrip().startswith(("{", "[")):
        path = Path(tracks)
        if not path.is_file():
            raise MofaInputError(f"hints file {str(path)!r} does not exist; pass a JSON file (see docs/formats.md)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MofaInputError(f"cannot read hints file {str(path)!r} ({exc}); pass a UTF-8 JSON file") from None
        try:
            return json.loads(text), str(path), path.parent
        except json.JSONDecodeError as exc:
            raise MofaInputError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix the syntax"
            ) from None
    if isinstance(tracks, str):
        try:
            return json.loads(tracks), "hints", None
        except json.JSONDecodeError as exc:
            raise MofaInputError(f"hints: invalid JSON: {exc.msg}; fix the syntax") from None
    return tracks, "hints", None


def _map_hints(hints: HintSet, transform: Any, name: str) -> HintSet:
    """Hints on the raw image → the prepared image (points through the resize + crop, masks nearest-resized)."""
    from mofa.hints import DragHint, MotionBrush

    h, w = transform.out_size
    drags = []
    for i, drag in enumerate(hints.drags):
        pts = transform.map_points(drag.points)
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
        if outside.any():
            j = int(np.flatnonzero(outside)[0])
            x, y = drag.points[j]
            raise MofaInputError(
                f"{name}: track {i} point ({x:g}, {y:g}) of the raw {transform.raw_size[1]}x{transform.raw_size[0]} "
                f"image falls outside the centre crop to {w}x{h}; move it inward or crop the image yourself"
            )
        drags.append(DragHint(pts))
    brushes = [MotionBrush(transform.map_mask(b.mask), kind=b.kind) for b in hints.brushes]
    return HintSet(transform.out_size, drags, brushes, hints.num_frames)


def _load_mask(path: str | Path, kind: str, transform: Any) -> Any:
    """A ``--brush`` / ``--static`` mask file on the prepared grid (masks of the raw image size are mapped)."""
    from mofa.hints import MotionBrush

    brush = MotionBrush.from_file(path, None, kind=kind)  # type: ignore[arg-type]
    if brush.size == transform.out_size:
        return brush
    if brush.size == transform.raw_size:
        return MotionBrush(transform.map_mask(brush.mask), kind=kind)  # type: ignore[arg-type]
    (mh, mw), (ph, pw), (rh, rw) = brush.size, transform.out_size, transform.raw_size
    raise MofaInputError(
        f"{kind} mask {str(path)!r} is {mw}x{mh} (WxH) but the image is {rw}x{rh}, prepared to {pw}x{ph}; "
        "paint the mask on the prepared image (or the original) at its exact size"
    )


def prepare_inputs(
    image: Any,
    tracks: Any,
    brush: Any = None,
    static: Any = None,
    size: int = 512,
    num_frames: int | None = None,
    reference_mode: bool = False,
) -> PreparedInputs:
    """Load, validate and prepare an image and its hints, touching no output file.

    Args:
        image: image path, PIL image or uint8 ``[H, W, 3]`` array (the raw input).
        tracks: hints JSON path / text / decoded object (docs/formats.md). Coordinates are pixels of the **prepared**
            image, unless the file's ``image_size`` equals the raw image size (and differs from the prepared size):
            then points and brushes are mapped through the same resize + crop as the image.
        brush, static: optional move / static mask file(s) (PNG or NPY) of the prepared or the raw image size.
        size: short side of the prepared image (:func:`mofa.io.image.prepare_image`).
        num_frames: T including frame 0; None = the file's ``num_frames`` (default 25).
        reference_mode: prepare the image with the reference's PIL bilinear resize.

    Raises:
        MofaInputError: anything wrong with the inputs, with a one-line message.
    """
    from mofa.hints import HintSet as _HintSet
    from mofa.io.image import as_uint8_image, plan_prepare, prepare_image

    sources: dict[str, Any] = {}
    if isinstance(image, (str, Path)):
        sources["image"] = str(image)
    raw = as_uint8_image(image)
    if isinstance(image, (str, Path)):
        sources["image_sha256"] = _sha256(Path(image))
    transform = plan_prepare(raw.shape[:2], short_side=size)
    prepared = prepare_image(raw, short_side=size, reference_mode=reference_mode)

    data, name, base_dir = _read_hints_source(tracks)
    if name != "hints":
        sources["tracks"] = name
    if isinstance(data, dict) and base_dir is not None and isinstance(data.get("brushes"), list):
        # Relative brush paths are relative to the JSON file, also when we hand over the decoded dict.
        data = dict(data)
        data["brushes"] = [
            {**b, "path": str(base_dir / b["path"])}
            if isinstance(b, dict) and isinstance(b.get("path"), str) and not Path(b["path"]).is_absolute()
            else b
            for b in data["brushes"]
        ]
    file_size = data.get("image_size") if isinstance(data, dict) else None
    file_size = tuple(file_size) if isinstance(file_size, list) else file_size
    grid = "prepared"
    if file_size is not None and file_size not in (transform.out_size, transform.raw_size):
        try:
            fh, fw = (int(v) for v in file_size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            fh = fw = None
        if fh is not None:
            (rh, rw), (ph, pw) = transform.raw_size, transform.out_size
            raise MofaInputError(
                f"{name}: hints were made for a {fw}x{fh} image but the image is {rw}x{rh} (prepared to {pw}x{ph}, "
                "WxH); use the matching image or redraw the hints"
            )
    if file_size == transform.raw_size and transform.raw_size != transform.out_size:
        grid = "raw"
        hints = _map_hints(_HintSet.from_json(data, transform.raw_size), transform, name)
    else:
        hints = _HintSet.from_json(data, transform.out_size)

    extra = []
    for paths, kind in ((brush, "move"), (static, "static")):
        if paths is None:
            continue
        for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
            extra.append(_load_mask(p, kind, transform))
            sources.setdefault(kind, []).append(str(p))
    frames = hints.num_frames if num_frames is None else num_frames
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise MofaInputError(f"frames must be an integer >= 2 (frame 0 is the input image), got {frames!r}")
    hints = _HintSet(hints.image_size, hints.drags, [*hints.brushes, *extra], int(frames))
    return PreparedInputs(image=prepared, hints=hints, transform=transform, hints_grid=grid, sources=sources)


def hints_overlay(image: np.ndarray, hints: HintSet) -> np.ndarray:
    """The image with brushes tinted (move: cyan, static: red) and every drag's per-frame path drawn, uint8."""
    from mofa.viz import draw_tracks, overlay_mask

    canvas = np.asarray(image, dtype=np.uint8)
    for kind, color in (("move", (0, 200, 255)), ("static", (255, 60, 60))):
        mask = hints.union_mask(kind)
        if mask is not None:
            canvas = overlay_mask(canvas, mask, color=color)
    paths = [d.points if d.is_anchor else d.resample(max(hints.num_frames, 2)) for d in hints.drags]
    return draw_tracks(canvas, paths)


def preview_output_paths(out: str | Path) -> dict[str, Path]:
    """Where a preview written to ``out`` (``*.mp4``) puts its files: video, gif, flow video, hints overlay, JSON."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise MofaInputError(
            f"--out {str(out)!r} must end in .mp4 (the gif, flow video and JSON are written beside it)"
        )
    if out.is_dir():
        raise MofaInputError(f"--out {str(out)!r} is a folder; pass a file name like {out / 'preview.mp4'}")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise MofaInputError(f"--out {str(out)!r}: {str(ancestor)!r} is a file, not a folder; choose another --out")
    if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise MofaInputError(f"--out {str(out)!r}: folder {str(ancestor)!r} is not writable; choose another --out")
    stem = out.with_suffix("")
    return {
        "video": out,
        "gif": out.with_suffix(".gif"),
        "flow": stem.with_name(stem.name + "_flow.mp4"),
        "hints": stem.with_name(stem.name + "_hints.png"),
        "metadata": out.with_suffix(".json"),
    }


def write_preview_outputs(
    out: str | Path, result: PreviewOutput, inputs: PreparedInputs, fps: float, metadata: dict[str, Any]
) -> dict[str, Path]:
    """Write the video, gif, flow video, hints overlay and metadata sidecar of a preview — all or nothing.

    Everything is first written into a temporary folder beside ``out`` and then moved into place with
    ``os.replace``, so an error (or Ctrl-C) while encoding leaves no partial output behind.
    Returns :func:`preview_output_paths`.
    """
    from PIL import Image

    from mofa.io.video import export_video, write_metadata
    from mofa.viz import flow_video

    paths = preview_output_paths(out)
    parent = paths["video"].parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".mofa-preview-", dir=parent))
    except OSError as exc:
        reason = exc.strerror or exc
        raise MofaInputError(f"cannot write to {str(parent)!r} ({reason}); choose another --out") from None
    try:
        start = time.perf_counter()
        staged = {key: tmp / p.name for key, p in paths.items()}
        export_video(result.frames, staged["video"], fps=fps)
        export_video(result.frames, staged["gif"], fps=fps)
        export_video(flow_video(result.flow), staged["flow"], fps=fps)
        Image.fromarray(hints_overlay(inputs.image, inputs.hints)).save(staged["hints"], format="PNG")
        timings = dict(metadata.get("timing", {}))
        timings["encode"] = time.perf_counter() - start
        meta = {**metadata, "timing": timings, "outputs": {k: str(v) for k, v in paths.items()}}
        write_metadata(staged["metadata"], meta)
        for key, p in paths.items():
            os.replace(staged[key], p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
