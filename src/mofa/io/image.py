"""Image loading and the input preprocessing rule (spec §2.1): short side to 512, centre crop to multiples of 64.

Everything downstream (hints, flow, preview, diffusion) works on the *prepared* image. Coordinates given for the raw
image are mapped with :class:`PrepareTransform` (the same resize + crop applied to points and masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mofa.errors import MofaInputError

__all__ = ["PrepareTransform", "as_uint8_image", "load_image", "plan_prepare", "prepare_image"]

MAX_PREPARED_SIDE = 4096
"""Largest side a prepared image may have (guards against extreme aspect ratios)."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]``.

    EXIF orientation is applied; alpha is dropped (composited over white); greyscale / palette images become RGB.

    Raises:
        MofaInputError: the file is missing, is a folder, or is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MofaInputError(f"image {str(path)!r} does not exist; pass a PNG, JPEG or WebP file")
    if not path.is_file():
        raise MofaInputError(f"image {str(path)!r} is not a file; pass a PNG, JPEG or WebP file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, rgba)
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise MofaInputError(f"{str(path)!r} is not an image; pass a PNG, JPEG or WebP file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MofaInputError(f"cannot read image {str(path)!r} ({reason}); re-save it as PNG or JPEG") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MofaInputError(f"image {str(path)!r} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def as_uint8_image(image: Any) -> np.ndarray:
    """Any supported image value → RGB uint8 ``[H, W, 3]`` (a copy).

    Accepts a path, a PIL image, a uint8 array ``[H, W, 3]`` / ``[H, W]``, a float array in [0, 1], or a float tensor
    ``[3, H, W]`` / ``[1, 3, H, W]`` in [0, 1].
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "size") and hasattr(image, "mode"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if hasattr(image, "detach"):  # torch tensor, channels first
        arr = image.detach().cpu().float().numpy()
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise MofaInputError(f"image tensor must be [3, H, W] in [0, 1], got shape {tuple(arr.shape)}")
        arr = np.moveaxis(arr, 0, -1)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise MofaInputError(f"image array must be [H, W, 3] RGB, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise MofaInputError("image contains NaN/inf values; pass RGB values in [0, 1]")
        return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    raise MofaInputError(f"image array has unsupported dtype {arr.dtype}; use uint8 or float in [0, 1]")


@dataclass(frozen=True)
class PrepareTransform:
    """The resize + centre crop of :func:`prepare_image`, as numbers.

    Attributes:
        raw_size: (H, W) of the input image.
        resized_size: (H, W) after the short-side resize.
        out_size: (H, W) after the centre crop (the prepared image).
        crop_top, crop_left: offset of the crop inside the resized image, pixels.
    """

    raw_size: tuple[int, int]
    resized_size: tuple[int, int]
    out_size: tuple[int, int]
    crop_top: int
    crop_left: int

    @property
    def is_identity(self) -> bool:
        return self.raw_size == self.out_size

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """xy pixel points ``[..., 2]`` of the raw image → the prepared image (pixel centres at integers).

        A resize by ``s`` maps pixel centre ``x`` to ``(x + 0.5)·s − 0.5``; the crop subtracts its offset.
        """
        pts = np.asarray(points, dtype=np.float64)
        sx = self.resized_size[1] / self.raw_size[1]
        sy = self.resized_size[0] / self.raw_size[0]
        out = np.empty_like(pts)
        out[..., 0] = (pts[..., 0] + 0.5) * sx - 0.5 - self.crop_left
        out[..., 1] = (pts[..., 1] + 0.5) * sy - 0.5 - self.crop_top
        return out

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """A raw-image mask ``[H, W]`` (bool) → the prepared grid (nearest resize, then the same crop)."""
        import cv2

        arr = np.asarray(mask).astype(np.uint8)
        if arr.shape != self.raw_size:
            raise MofaInputError(
                f"mask is {arr.shape[1]}x{arr.shape[0]} but the raw image is {self.raw_size[1]}x{self.raw_size[0]}"
            )
        h, w = self.resized_size
        if (h, w) != self.raw_size:
            arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_NEAREST)
        oh, ow = self.out_size
        return arr[self.crop_top : self.crop_top + oh, self.crop_left : self.crop_left + ow] != 0


def plan_prepare(raw_size: tuple[int, int], short_side: int = 512, multiple: int = 64) -> PrepareTransform:
    """Sizes and crop of :func:`prepare_image` for a raw image of ``raw_size`` = (H, W), without touching pixels.

    The reference rule (spec §2.1): ``ratio = short_side / min(H, W)``; resize to ``(round(W·ratio), round(H·ratio))``;
    centre-crop each side down to a multiple of ``multiple`` with torchvision's ``CenterCrop`` offsets
    ``round((size − crop) / 2)``.
    """
    if isinstance(short_side, bool) or int(short_side) != short_side or short_side < 1:
        raise MofaInputError(f"size (short side) must be a positive integer, got {short_side!r}")
    if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
        raise MofaInputError(f"multiple must be a positive integer, got {multiple!r}")
    if short_side < multiple:
        raise MofaInputError(
            f"size {short_side} is smaller than the crop multiple {multiple}; use --size >= {multiple}"
        )
    raw_h, raw_w = int(raw_size[0]), int(raw_size[1])
    if raw_h < 1 or raw_w < 1:
        raise MofaInputError(f"image is empty ({raw_w}x{raw_h})")
    ratio = short_side / min(raw_h, raw_w)
    new_w, new_h = round(raw_w * ratio), round(raw_h * ratio)
    out_h, out_w = new_h - new_h % multiple, new_w - new_w % multiple
    if max(out_h, out_w) > MAX_PREPARED_SIDE:
        raise MofaInputError(
            f"a {raw_w}x{raw_h} image becomes {out_w}x{out_h} at short side {short_side}; the largest side allowed "
            f"is {MAX_PREPARED_SIDE} px: crop it to a less extreme aspect ratio"
        )
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    return PrepareTransform((raw_h, raw_w), (new_h, new_w), (out_h, out_w), top, left)


def prepare_image(image: Any, short_side: int = 512, multiple: int = 64, reference_mode: bool = False) -> np.ndarray:
    """Resize the short side to ``short_side`` and centre-crop both sides to multiples of ``multiple`` (spec §2.1).

    Args:
        image: a path, PIL image, uint8 ``[H, W, 3]`` array, or float tensor ``[3, H, W]`` in [0, 1].
        short_side: target short side in pixels (the reference uses 512).
        multiple: both output sides are cropped down to multiples of this (64 for SVD).
        reference_mode: resize with PIL ``BILINEAR`` exactly like the reference app. Default: PIL ``LANCZOS`` when
            shrinking (sharper, still antialiased) and ``BICUBIC`` when enlarging. An image that already has the
            target size is returned unchanged in both modes.

    Returns:
        RGB uint8 ``[H', W', 3]``, ``H'`` and ``W'`` multiples of ``multiple``. See :func:`plan_prepare` for the sizes.
    """
    from PIL import Image

    arr = as_uint8_image(image)
    plan = plan_prepare(arr.shape[:2], short_side=short_side, multiple=multiple)
    if plan.resized_size != plan.raw_size:
        pil = Image.fromarray(arr)
        if reference_mode:
            resample = Image.Resampling.BILINEAR
        elif plan.resized_size[0] < plan.raw_size[0]:
            resample = Image.Resampling.LANCZOS
        else:
            resample = Image.Resampling.BICUBIC
        arr = np.asarray(pil.resize((plan.resized_size[1], plan.resized_size[0]), resample=resample), dtype=np.uint8)
    oh, ow = plan.out_size
    out = arr[plan.crop_top : plan.crop_top + oh, plan.crop_left : plan.crop_left + ow]
    return np.ascontiguousarray(out)
