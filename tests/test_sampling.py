"""Sampling helpers: micro-conditioning, CLIP input, guidance ramp (spec §7.1, §11.13, §12.4-7)."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from mofa.pipelines import sampling
from tiny_models import SVD_SCHEDULER


def test_time_ids_default_follow_arguments_with_fps_minus_one():
    ids = sampling.svd_time_ids(fps=7, motion_bucket_id=128, noise_aug_strength=0.02, batch_size=1)
    assert ids.shape == (2, 3)
    torch.testing.assert_close(ids, torch.tensor([[6.0, 128.0, 0.02]] * 2))
    ids = sampling.svd_time_ids(fps=11, motion_bucket_id=40, noise_aug_strength=0.1, batch_size=2)
    torch.testing.assert_close(ids, torch.tensor([[10.0, 40.0, 0.1]] * 4))


def test_time_ids_doubled_only_under_cfg():
    ids = sampling.svd_time_ids(7, 128, 0.02, batch_size=1, do_classifier_free_guidance=False)
    assert ids.shape == (1, 3)


def test_time_ids_reference_mode_ignores_arguments():
    ids = sampling.svd_time_ids(fps=25, motion_bucket_id=3, noise_aug_strength=0.5, reference_mode=True)
    torch.testing.assert_close(ids, torch.tensor([[6.0, 128.0, 0.02]] * 2))


def test_clip_input_reference_mode_is_unnormalised_resize():
    image = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    ref = sampling.clip_input(image, reference_mode=True)
    torch.testing.assert_close(ref, _resize_with_antialiasing(image, (224, 224)))
    assert ref.shape == (1, 3, 224, 224)


def test_clip_input_default_is_normalised_by_clip_statistics():
    image = torch.full((1, 3, 64, 64), 0.5)
    out = sampling.clip_input(image)
    expected = (0.5 - torch.tensor(sampling.CLIP_MEAN)) / torch.tensor(sampling.CLIP_STD)
    torch.testing.assert_close(out[0, :, 100, 100], expected, atol=1e-5, rtol=0)
    # Linear resize: the [-1, 1] round trip of stock SVD equals resizing in [0, 1] up to rounding.
    rand = torch.rand(1, 3, 80, 48, generator=torch.Generator().manual_seed(1))
    unnorm = sampling.clip_input(rand) * torch.tensor(sampling.CLIP_STD).view(1, 3, 1, 1)
    unnorm = unnorm + torch.tensor(sampling.CLIP_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(unnorm, sampling.clip_input(rand, reference_mode=True), atol=1e-5, rtol=0)


def test_guidance_ramp_linear_over_frames():
    ramp = sampling.guidance_ramp(1.0, 3.0, 25, batch_size=2)
    assert ramp.shape == (2, 25, 1, 1, 1)
    torch.testing.assert_close(ramp[0, :, 0, 0, 0], torch.linspace(1, 3, 25))
    assert float(ramp[1, 12]) == 2.0


def test_combine_guidance_known_answer():
    uncond, cond = torch.zeros(1, 3, 1, 1, 1), torch.ones(1, 3, 1, 1, 1)
    out = sampling.combine_guidance(uncond, cond, torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1))
    assert out.flatten().tolist() == [1.0, 2.0, 3.0]
    assert sampling.do_cfg(3.0) and not sampling.do_cfg(1.0)


def test_svd_scheduler_init_noise_sigma():
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    scheduler.set_timesteps(25)
    assert abs(float(scheduler.init_noise_sigma) - (700.0**2 + 1) ** 0.5) < 1e-2
    assert abs(float(scheduler.sigmas[0]) - 700.0) < 1e-2 and float(scheduler.sigmas[-1]) == 0.0
