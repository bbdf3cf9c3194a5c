"""Small pure helpers of the MOFA sampling loop: SVD micro-conditioning, CLIP input, guidance ramp, CFG combine.

Each helper has a ``reference_mode`` switch where the original MOFA-Video pipeline (spec §7) differs from the fixed
behaviour (spec §12 items 4, 5, 7). The fixed behaviour is the one of diffusers' ``StableVideoDiffusionPipeline``:

==========================  =====================================  =========================================
aspect                      fixed (default)                        reference_mode=True (MOFA-Video Traj app)
==========================  =====================================  =========================================
added time ids              ``[fps - 1, motion_bucket_id, aug]``    always ``[6, 128, 0.02]``
time ids under no CFG       not doubled                            not doubled (the reference doubles them and
                                                                   then crashes; nothing to reproduce)
CLIP input                  [-1,1] blur-resize to 224, CLIP         [0,1] blur-resize to 224, no normalisation
                            mean/std normalisation
==========================  =====================================  =========================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

REFERENCE_TIME_IDS: tuple[float, float, float] = (6.0, 128.0, 0.02)
"""(fps, motion bucket, noise augmentation) micro-conditioning hard-coded by the reference pipeline (spec §7.1.4)."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE: tuple[int, int] = (224, 224)


def svd_time_ids(
    fps: float,
    motion_bucket_id: float,
    noise_aug_strength: float,
    batch_size: int = 1,
    do_classifier_free_guidance: bool = True,
    reference_mode: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SVD's added time ids (micro-conditioning), ``[B', 3]`` in the order (fps, motion bucket, noise augmentation).

    Default: ``[fps - 1, motion_bucket_id, noise_aug_strength]`` — SVD was trained on ``fps - 1`` (the same
    convention as diffusers' ``StableVideoDiffusionPipeline``), repeated ``batch_size`` times and doubled only under
    classifier-free guidance (``B' = 2B`` then, unconditional half first). ``reference_mode=True`` ignores the three
    arguments and uses ``[6, 128, 0.02]`` (spec §7.1.4, §12.4). The reference also doubles the ids without CFG, which
    makes its UNet fail on a shape mismatch (§12.7); that crash is not reproduced: without CFG both modes return
    ``B`` rows.
    """
    values = list(REFERENCE_TIME_IDS) if reference_mode else [fps - 1, motion_bucket_id, noise_aug_strength]
    ids = torch.tensor([values], dtype=dtype, device=device)
    ids = ids.repeat(batch_size, 1)
    return torch.cat([ids, ids]) if do_classifier_free_guidance else ids


def clip_input(
    image: torch.Tensor,
    reference_mode: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    size: tuple[int, int] = CLIP_SIZE,
) -> torch.Tensor:
    """The CLIP image encoder's input for a conditioning image.

    Args:
        image: ``[B, 3, H, W]`` float RGB in [0, 1] (the un-resized input image).
        reference_mode: ``False`` = stock SVD preprocessing (map to [-1, 1], Gaussian-blur + bicubic resize to 224,
            back to [0, 1], CLIP mean/std normalisation); ``True`` = the reference's un-normalised [0, 1] resize
            (spec §7.1.2, §12.5).
        mean, std: the CLIP normalisation (the feature extractor's ``image_mean`` / ``image_std``).

    Returns:
        ``[B, 3, 224, 224]`` float tensor ready for ``CLIPVisionModelWithProjection``.
    """
    image = image.float()
    if reference_mode:
        return _resize_with_antialiasing(image, size)
    resized = (_resize_with_antialiasing(image * 2.0 - 1.0, size) + 1.0) / 2.0
    mean_t = torch.tensor(list(mean), dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    return (resized - mean_t) / std_t


def guidance_ramp(
    min_guidance_scale: float,
    max_guidance_scale: float,
    num_frames: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-frame classifier-free guidance weights ``[B, T, 1, 1, 1]`` = ``linspace(min, max, T)`` (frame 0 gets min).

    Same in both modes (spec §7.1.7); a long video uses the ramp of one window (spec §7.4).
    """
    ramp = torch.linspace(min_guidance_scale, max_guidance_scale, num_frames, device=device).to(dtype)
    return ramp.view(1, num_frames, 1, 1, 1).repeat(batch_size, 1, 1, 1, 1)


def combine_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale · (cond − uncond)``; ``[B, T, C, h, w]``, scale broadcastable."""
    return uncond + scale * (cond - uncond)


def do_cfg(max_guidance_scale: float) -> bool:
    """CFG runs when the largest per-frame weight exceeds 1 (diffusers' and the reference's rule)."""
    return max_guidance_scale > 1.0
