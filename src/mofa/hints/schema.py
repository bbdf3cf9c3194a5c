"""HintSet: every hint for one image, and its versioned JSON file format (documented in docs/formats.md).

Minimal file (the reference app's list of click tracks, input-image pixels)::

    {"tracks": [[[x, y], [x, y], ...], ...]}

Full file::

    {
      "version": 1,
      "image_size": [H, W],
      "num_frames": 25,
      "tracks": [[[x, y], ...], {"points": [[x, y], ...]}],
      "brushes": [{"kind": "move", "path": "brush.png"},
                  {"kind": "static", "circles": [[x, y, radius], ...]},
                  {"kind": "move", "rle": [n0, n1, ...]}]
    }

Every validation failure raises :class:`~mofa.errors.MofaInputError` with a one-line message naming the bad value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mofa.errors import MofaInputError
from mofa.hints.brush import MotionBrush, brush_from_circles
from mofa.hints.drag import DragHint

__all__ = ["FORMAT_VERSION", "HintSet", "load_hints", "save_hints"]

FORMAT_VERSION = 1
DEFAULT_NUM_FRAMES = 25
_TOP_KEYS = ("version", "image_size", "num_frames", "tracks", "brushes")
_TRACK_KEYS = ("points",)
_BRUSH_KEYS = ("kind", "path", "circles", "rle")


def _fmt(v: float) -> str:
    return f"{v:g}"


def _check_size(size: Any, what: str) -> tuple[int, int]:
    if (
        not isinstance(size, Sequence)
        or isinstance(size, str)
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise MofaInputError(f"{what} must be [height, width] positive integers, got {size!r}")
    return (int(size[0]), int(size[1]))


def _check_num_frames(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MofaInputError(f"{where} num_frames must be an integer >= 2, got {value!r}")
    if value < 2:
        raise MofaInputError(f"{where} num_frames must be >= 2 (frame 0 is the input image), got {value}")
    return int(value)


@dataclass(eq=False)
class HintSet:
    """All hints for one input image.

    Args:
        image_size: (H, W) of the input image; every coordinate and brush lives on this grid.
        drags: drag trajectories (``DragHint`` or raw ``[[x, y], ...]`` point lists), control points in image pixels.
        brushes: ``MotionBrush`` masks of exactly ``image_size``.
        num_frames: T, number of generated frames including frame 0 (>= 2).
    """

    image_size: tuple[int, int]
    drags: list[DragHint] = field(default_factory=list)
    brushes: list[MotionBrush] = field(default_factory=list)
    num_frames: int = DEFAULT_NUM_FRAMES

    def __post_init__(self) -> None:
        self.image_size = _check_size(self.image_size, "image_size")
        self.num_frames = _check_num_frames(self.num_frames, "hints")
        self.drags = [d if isinstance(d, DragHint) else DragHint(d) for d in self.drags]
        for b in self.brushes:
            if not isinstance(b, MotionBrush):
                raise MofaInputError(f"brushes must be MotionBrush objects, got {type(b).__name__}")
        self.brushes = list(self.brushes)
        for i, b in enumerate(self.brushes):
            b.check_size(self.image_size, source=f"{b.kind} brush {i}")
        h, w = self.image_size
        for i, d in enumerate(self.drags):
            pts = d.points
            outside = (pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)
            if outside.any():
                x, y = pts[int(np.flatnonzero(outside)[0])]
                raise MofaInputError(
                    f"track {i} point ({_fmt(x)}, {_fmt(y)}) is outside the {w}x{h} image "
                    f"(x must be in [0, {w}), y in [0, {h}) input-image pixels)"
                )

    # ------------------------------------------------------------------ derived views
    @property
    def move_brushes(self) -> list[MotionBrush]:
        return [b for b in self.brushes if b.kind == "move"]

    @property
    def static_brushes(self) -> list[MotionBrush]:
        return [b for b in self.brushes if b.kind == "static"]

    def union_mask(self, kind: str) -> np.ndarray | None:
        """Union ``[H, W]`` bool of all brushes of ``kind`` ("move" | "static"), or None if there are none."""
        masks = [b.mask for b in self.brushes if b.kind == kind]
        if not masks:
            return None
        return np.logical_or.reduce(masks)

    def tracks(self, num_frames: int | None = None) -> np.ndarray:
        """All drags resampled to ``[N, T, 2]`` float64 input-image pixels (T defaults to ``self.num_frames``)."""
        t = self.num_frames if num_frames is None else num_frames
        if not self.drags:
            return np.zeros((0, t, 2), dtype=np.float64)
        return np.stack([d.resample(t) for d in self.drags])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, HintSet)
            and self.image_size == other.image_size
            and self.num_frames == other.num_frames
            and self.drags == other.drags
            and self.brushes == other.brushes
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (format version 1). Brushes are stored run-length encoded so the round trip is exact."""
        out: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "image_size": list(self.image_size),
            "num_frames": self.num_frames,
            "tracks": [[[_num(x), _num(y)] for x, y in d.points] for d in self.drags],
        }
        if self.brushes:
            out["brushes"] = [{"kind": b.kind, "rle": _rle_encode(b.mask)} for b in self.brushes]
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=None, separators=(", ", ": "))
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(
        cls, source: str | Path | Mapping[str, Any] | list[Any], image_size: tuple[int, int] | None = None
    ) -> HintSet:
        """Parse a hints file, JSON text, or an already-decoded dict / bare list of tracks.

        Args:
            source: a path to a ``.json`` file, JSON text (starting with ``{`` or ``[``), a dict, or a list of tracks.
            image_size: (H, W) of the actual input image. If the file records ``image_size`` too, they must agree.
                If None, the file's ``image_size`` is used (and must be present).
        """
        base_dir: Path | None = None
        name = "hints"
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
            path = Path(source)
            name = str(path)
            if not path.is_file():
                raise MofaInputError(f"hints file {name!r} does not exist; pass a JSON file like docs/formats.md")
            base_dir = path.parent
            text = path.read_text(encoding="utf-8")
            data = _parse_json(text, name)
        elif isinstance(source, str):
            data = _parse_json(source, name)
        else:
            data = source
        return _from_data(data, image_size, name, base_dir)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _parse_json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MofaInputError(
            f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix the syntax"
        ) from None


def _from_data(data: Any, image_size: tuple[int, int] | None, name: str, base_dir: Path | None) -> HintSet:
    if isinstance(data, list):
        data = {"tracks": data}
    if not isinstance(data, Mapping):
        raise MofaInputError(f'{name}: expected a JSON object {{"tracks": [...]}}, got {type(data).__name__}')
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise MofaInputError(f"{name}: unknown key {unknown[0]!r}; allowed keys are {', '.join(_TOP_KEYS)}")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise MofaInputError(f"{name}: unsupported version {version!r}; this mofa reads version {FORMAT_VERSION}")
    file_size = _check_size(data["image_size"], f"{name}: image_size") if "image_size" in data else None
    if image_size is None:
        if file_size is None:
            raise MofaInputError(f'{name}: no image size known; pass the image or add "image_size": [H, W]')
        image_size = file_size
    image_size = _check_size(image_size, "image_size")
    if file_size is not None and file_size != image_size:
        raise MofaInputError(
            f"{name}: hints were made for a {file_size[1]}x{file_size[0]} image but the image is "
            f"{image_size[1]}x{image_size[0]} (WxH); use the matching image or redraw the hints"
        )
    num_frames = _check_num_frames(data.get("num_frames", DEFAULT_NUM_FRAMES), f"{name}:")
    if "tracks" not in data:
        raise MofaInputError(f'{name}: missing "tracks"; expected {{"tracks": [[[x, y], [x, y], ...], ...]}}')
    tracks = data["tracks"]
    if not isinstance(tracks, list):
        raise MofaInputError(f'{name}: "tracks" must be a list of tracks, got {type(tracks).__name__}')
    if not tracks:
        raise MofaInputError(f'{name}: "tracks" is empty; add at least one track [[x, y], ...]')
    drags = [DragHint(_parse_track(t, i, name)) for i, t in enumerate(tracks)]
    brushes_raw = data.get("brushes", [])
    if not isinstance(brushes_raw, list):
        raise MofaInputError(f'{name}: "brushes" must be a list, got {type(brushes_raw).__name__}')
    brushes = [_parse_brush(b, i, name, image_size, base_dir) for i, b in enumerate(brushes_raw)]
    try:
        return HintSet(image_size=image_size, drags=drags, brushes=brushes, num_frames=num_frames)
    except MofaInputError as exc:
        raise MofaInputError(f"{name}: {exc}") from None


def _parse_track(track: Any, i: int, name: str) -> np.ndarray:
    if isinstance(track, Mapping):
        unknown = sorted(set(track) - set(_TRACK_KEYS))
        if unknown:
            raise MofaInputError(
                f"{name}: track {i} has unknown key {unknown[0]!r}; allowed: {', '.join(_TRACK_KEYS)}"
            )
        if "points" not in track:
            raise MofaInputError(f'{name}: track {i} object has no "points"; use {{"points": [[x, y], ...]}}')
        track = track["points"]
    if not isinstance(track, list):
        raise MofaInputError(f"{name}: track {i} must be a list of [x, y] points, got {type(track).__name__}")
    if not track:
        raise MofaInputError(f"{name}: track {i} has no points; give at least one [x, y] (one point = static anchor)")
    pts = np.empty((len(track), 2), dtype=np.float64)
    for j, p in enumerate(track):
        if (
            not isinstance(p, list)
            or len(p) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)
        ):
            raise MofaInputError(f"{name}: track {i} point {j} must be [x, y] numbers, got {json.dumps(p)[:60]}")
        if not all(math.isfinite(c) for c in p):
            raise MofaInputError(f"{name}: track {i} point {j} ({p[0]}, {p[1]}) is not finite; use pixel coordinates")
        pts[j] = p
    return pts


def _parse_brush(entry: Any, i: int, name: str, image_size: tuple[int, int], base_dir: Path | None) -> MotionBrush:
    if not isinstance(entry, Mapping):
        raise MofaInputError(f'{name}: brush {i} must be an object like {{"kind": "move", "path": "brush.png"}}')
    unknown = sorted(set(entry) - set(_BRUSH_KEYS))
    if unknown:
        raise MofaInputError(f"{name}: brush {i} has unknown key {unknown[0]!r}; allowed: {', '.join(_BRUSH_KEYS)}")
    kind = entry.get("kind", "move")
    if kind not in ("move", "static"):
        raise MofaInputError(f"{name}: brush {i} kind must be 'move' or 'static', got {kind!r}")
    sources = [k for k in ("path", "circles", "rle") if k in entry]
    if len(sources) != 1:
        raise MofaInputError(f'{name}: brush {i} needs exactly one of "path", "circles", "rle", got {sources}')
    if "path" in entry:
        p = Path(str(entry["path"]))
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return MotionBrush.from_file(p, image_size, kind=kind)
    if "circles" in entry:
        circles = entry["circles"]
        ok = isinstance(circles, list) and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c)
            for c in circles
        )
        if not ok:
            raise MofaInputError(f"{name}: brush {i} circles must be [[x, y, radius], ...] finite numbers")
        return brush_from_circles(image_size, [tuple(c) for c in circles], kind=kind)
    return MotionBrush(_rle_decode(entry["rle"], image_size, f"{name}: brush {i}"), kind=kind)


def _rle_encode(mask: np.ndarray) -> list[int]:
    """Row-major run lengths, alternating unpainted/painted, starting with an unpainted run (possibly 0)."""
    flat = mask.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return [int(r) for r in runs]


def _rle_decode(runs: Any, image_size: tuple[int, int], what: str) -> np.ndarray:
    total = image_size[0] * image_size[1]
    if not isinstance(runs, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in runs):
        raise MofaInputError(f"{what} rle must be a list of non-negative integers")
    if sum(runs) != total:
        raise MofaInputError(
            f"{what} rle covers {sum(runs)} pixels but the {image_size[1]}x{image_size[0]} image has {total}"
        )
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(image_size)


def load_hints(
    path: str | Path | Mapping[str, Any],
    image_size: tuple[int, int] | None = None,
    brush: str | Path | Iterable[str | Path] | None = None,
    static: str | Path | Iterable[str | Path] | None = None,
) -> HintSet:
    """Load a hints JSON file and optionally add motion-brush (``brush``) and static-brush (``static``) mask files.

    Args:
        path: hints JSON (see docs/formats.md) or an already-decoded dict.
        image_size: (H, W) of the input image; coordinates must lie inside it and brushes must match it exactly.
        brush, static: PNG / NPY mask path(s) of the image size (nonzero or alpha = painted).
    """
    hints = HintSet.from_json(path, image_size)
    extra: list[MotionBrush] = []
    for paths, kind in ((brush, "move"), (static, "static")):
        if paths is None:
            continue
        for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
            extra.append(MotionBrush.from_file(p, hints.image_size, kind=kind))  # type: ignore[arg-type]
    if extra:
        hints = HintSet(hints.image_size, hints.drags, [*hints.brushes, *extra], hints.num_frames)
    return hints


def save_hints(hints: HintSet, path: str | Path) -> Path:
    """Write ``hints`` as JSON (format version 1) to ``path`` and return the path."""
    path = Path(path)
    hints.to_json(path)
    return path
