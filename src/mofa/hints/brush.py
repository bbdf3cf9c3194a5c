"""Motion brushes: painted regions of the input image.

- ``kind="move"``: the reference's motion brush (spec §2.1). Drags that *start* inside it drive only the painted
  region (their dense flow is cut to the brush); drags that start outside drive the rest of the image.
- ``kind="static"``: our extension. The painted region must not move: zero-flow anchors are sampled inside it and the
  final dense flow is zeroed there.

The mask lives on the input-image grid (``[H, W]`` bool). Sizes must match the image exactly — we never resize user
input silently. Resizing to the sparse-to-dense grid happens in :meth:`MotionBrush.resized`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mofa.errors import MofaInputError

__all__ = ["BrushKind", "MotionBrush", "brush_from_circles"]

BrushKind = Literal["move", "static"]
_KINDS = ("move", "static")


def _to_bool_mask(mask: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """bool masks as-is; integer masks: nonzero = painted; float masks in [0, 1]: >= 0.5 = painted."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise MofaInputError(f"{what} must be a 2-D [H, W] mask, got shape {arr.shape}; save a single-channel image")
    if arr.dtype == np.bool_:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise MofaInputError(f"{what} contains NaN/inf values; use 0 (unpainted) and 1 (painted)")
        if arr.min() < 0 or arr.max() > 1:
            raise MofaInputError(
                f"{what} float values must lie in [0, 1], got [{arr.min():g}, {arr.max():g}]; "
                "use 0/1 floats, bools, or integers (nonzero = painted)"
            )
        return arr >= 0.5
    raise MofaInputError(f"{what} has unsupported dtype {arr.dtype}; use bool, integer or float in [0, 1]")


@dataclass(frozen=True, eq=False)
class MotionBrush:
    """A painted region of the input image.

    Args:
        mask: ``[H, W]`` on the input-image grid; bool, integer (nonzero = painted) or float in [0, 1]
            (>= 0.5 = painted). Stored as a read-only bool array.
        kind: ``"move"`` (reference motion brush) or ``"static"`` (keep this region still).
    """

    mask: np.ndarray = field()
    kind: BrushKind = "move"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise MofaInputError(f"brush kind must be 'move' or 'static', got {self.kind!r}")
        arr = _to_bool_mask(self.mask, f"{self.kind} brush")
        arr.setflags(write=False)
        object.__setattr__(self, "mask", arr)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the mask = the input image size."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def check_size(self, image_size: tuple[int, int], source: str = "brush") -> None:
        """Raise :class:`MofaInputError` unless the mask is exactly ``image_size`` = (H, W)."""
        if self.size != tuple(image_size):
            h, w = self.size
            ih, iw = image_size
            raise MofaInputError(
                f"{source} is {w}x{h} (WxH) but the image is {iw}x{ih}; paint the brush on the same image "
                "(or resize the mask yourself with nearest interpolation)"
            )

    @classmethod
    def from_file(
        cls, path: str | Path, image_size: tuple[int, int] | None = None, kind: BrushKind = "move"
    ) -> MotionBrush:
        """Load a brush from a PNG/JPEG-like image (nonzero = painted; images with alpha use the alpha channel) or a
        ``.npy`` array ``[H, W]``. If ``image_size`` = (H, W) is given, the mask must have exactly that size."""
        path = Path(path)
        if not path.is_file():
            raise MofaInputError(f"brush file {str(path)!r} does not exist; pass a PNG or NPY mask of the image size")
        if path.suffix.lower() == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise MofaInputError(f"cannot read brush {str(path)!r} as a numpy array: {exc}") from None
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
        else:
            arr = _read_mask_image(path)
        brush = cls(_to_bool_mask(arr, f"brush {str(path)!r}"), kind=kind)
        if image_size is not None:
            brush.check_size(image_size, source=f"brush {str(path)!r}")
        return brush

    def resized(self, grid_size: tuple[int, int], reference_mode: bool = False) -> torch.Tensor:
        """The mask on another grid as float32 ``[h, w]`` in [0, 1].

        Default: nearest resize (``F.interpolate`` "nearest", same as ``mofa.flow.ops.resize_mask``), values {0, 1}.
        ``reference_mode``: the reference's accidental bilinear ``cv2.resize`` (spec §12.8) of the 0/255 uint8 canvas,
        divided by 255 — edge values are fractional and "inside" means exactly 1.0 (the reference's ``== 255``).
        """
        h, w = int(grid_size[0]), int(grid_size[1])
        if reference_mode:
            import cv2

            canvas = self.mask.astype(np.uint8) * 255
            if (h, w) != self.size:
                canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
            return torch.from_numpy(canvas.astype(np.float32) / np.float32(255.0))
        mask = torch.from_numpy(self.mask.astype(np.float32))
        if (h, w) == self.size:
            return mask
        return F.interpolate(mask[None, None], size=(h, w), mode="nearest")[0, 0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MotionBrush) and self.kind == other.kind and np.array_equal(self.mask, other.mask)

    def __hash__(self) -> int:
        return hash((self.kind, self.mask.shape, self.mask.tobytes()))


def _read_mask_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            bands = img.getbands()
            if "A" in bands:
                return np.asarray(img.getchannel("A"))
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise MofaInputError(f"cannot read brush image {str(path)!r}: {exc}") from None
    if arr.ndim == 3:
        arr = (arr != 0).any(axis=-1)
    return arr


def brush_from_circles(
    image_size: tuple[int, int], circles: list[tuple[float, float, float]], kind: BrushKind = "move"
) -> MotionBrush:
    """Rasterise filled circles ``(x, y, radius)`` (input-image pixels) like the reference's brush UI (cv2.circle)."""
    import cv2

    canvas = np.zeros(tuple(int(s) for s in image_size), dtype=np.uint8)
    for x, y, r in circles:
        cv2.circle(canvas, (int(round(x)), int(round(y))), max(int(round(r)), 0), 255, thickness=-1)
    return MotionBrush(canvas != 0, kind=kind)
