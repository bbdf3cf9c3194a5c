"""Sliding windows for long videos: plan, blending weights, and equivalence with the reference's per-window stepping
(spec §7.4, §11.14, §12.14)."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from mofa.errors import MofaInputError
from mofa.pipelines.long_video import (
    blend_weights,
    blend_windows,
    merge_duplicate_windows,
    plan_windows,
    window_frame_indices,
)
from tiny_models import SVD_SCHEDULER


def reference_views(n: int, w: int, s: int) -> list[tuple[int, int]]:
    """The reference list comprehension, written independently (spec §7.4)."""
    return [(1 + i * s, i * s + w) for i in range((n - w) // s + 1)] + [(n - w + 1, n)]


def test_plan_single_window():
    assert plan_windows(25) == [(1, 25)]
    assert plan_windows(6, window=25) == [(1, 6)]
    assert plan_windows(2) == [(1, 2)]


def test_plan_reference_cases():
    assert plan_windows(25, dedupe=False) == [(1, 25), (1, 25)]
    assert plan_windows(49, dedupe=False) == [(1, 25), (13, 37), (25, 49), (25, 49)]
    assert plan_windows(49) == [(1, 25), (13, 37), (25, 49)]
    assert plan_windows(50) == [(1, 25), (13, 37), (25, 49), (26, 50)]


@pytest.mark.parametrize("n", [25, 26, 37, 49, 50, 61, 100, 125])
@pytest.mark.parametrize(("w", "s"), [(25, 12), (14, 7), (8, 3)])
def test_plan_matches_reference_and_covers_every_frame(n, w, s):
    if n < w:
        pytest.skip("the reference crashes for N < W")
    views = plan_windows(n, w, s)
    ref = reference_views(n, w, s)
    assert plan_windows(n, w, s, dedupe=False) == ref
    assert views == list(dict.fromkeys(ref))
    covered = set()
    for start, end in views:
        assert end - start + 1 == w  # every window is a full SVD window incl. frame 0
        covered.update(range(start, end))
    assert covered == set(range(1, n))


def test_plan_rejects_bad_arguments():
    with pytest.raises(MofaInputError):
        plan_windows(1)
    with pytest.raises(MofaInputError):
        plan_windows(50, window=25, stride=25)


def test_uniform_weights_are_reference_counts():
    views = plan_windows(49, dedupe=False)
    weights = blend_weights(views, 49, "uniform")
    counts = torch.zeros(49)
    for start, end in views:
        counts[start:end] += 1
    counts[0] = 1
    # frame f of window v gets 1 / count(f); frame 0 belongs to window 0 only.
    assert weights.shape == (4, 49)
    torch.testing.assert_close(weights.sum(0), torch.ones(49, dtype=torch.float64))
    assert float(weights[0, 0]) == 1.0 and float(weights[1:, 0].sum()) == 0.0
    for f in (1, 12, 13, 24, 25, 36, 37, 48):
        for v, (start, end) in enumerate(views):
            expected = (1.0 / float(counts[f])) if start <= f < end else 0.0
            assert abs(float(weights[v, f]) - expected) < 1e-12
    unique, merged = merge_duplicate_windows(views, weights)
    assert unique == [(1, 25), (13, 37), (25, 49)]
    assert abs(float(merged[2, 30]) - 2 / 3) < 1e-12  # the duplicated last view counts twice, as in the reference


def test_ramp_weights_fade_without_jumps():
    n, views = 49, plan_windows(49)
    uniform, ramp = blend_weights(views, n, "uniform"), blend_weights(views, n, "ramp")
    torch.testing.assert_close(ramp.sum(0), torch.ones(n, dtype=torch.float64))
    # Two windows disagreeing by a constant: the blended sequence jumps at window borders with uniform weights
    # (0 -> 0.5 at frame 13) but changes by at most 1/(overlap+1) per frame with the ramp.
    values = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    seq_u, seq_r = values @ uniform, values @ ramp
    assert float(seq_u[1:].diff().abs().max()) >= 0.33
    assert float(seq_r[1:].diff().abs().max()) <= 1 / 12 + 1e-9


def test_blend_windows_constant_prediction_is_identity():
    n, views = 20, plan_windows(20, 8, 3)
    weights = blend_weights(views, n, "ramp")
    truth = torch.randn(1, n, 4, 2, 2)
    preds = [truth[:, window_frame_indices(v)] for v in views]
    torch.testing.assert_close(blend_windows(preds, views, weights, n), truth)


def test_blend_then_step_equals_reference_step_then_average():
    """The reference steps every window with the scheduler (rewinding its step index) and averages the stepped latents;
    we average the model outputs and step once. For Euler (affine in the model output) both agree."""
    n, w, s = 10, 6, 3
    views = plan_windows(n, w, s, dedupe=False)
    weights = blend_weights(views, n, "uniform")
    g = torch.Generator().manual_seed(0)
    ref_sched, our_sched = EulerDiscreteScheduler(**SVD_SCHEDULER), EulerDiscreteScheduler(**SVD_SCHEDULER)
    ref_sched.set_timesteps(4)
    our_sched.set_timesteps(4)
    latents = torch.randn(1, n, 4, 2, 2, generator=g) * ref_sched.init_noise_sigma
    ref_lat, our_lat = latents.clone(), latents.clone()
    for t in ref_sched.timesteps:
        preds = [torch.randn(1, w, 4, 2, 2, generator=g) for _ in views]
        value, count = torch.zeros_like(ref_lat), torch.zeros_like(ref_lat)
        for k, ((a, b), pred) in enumerate(zip(views, preds, strict=True)):
            window = torch.cat([ref_lat[:, :1], ref_lat[:, a:b]], dim=1)
            stepped = ref_sched.step(pred, t, window).prev_sample
            if k < len(views) - 1:
                ref_sched._step_index -= 1
            if k == 0:
                value[:, :b] += stepped
                count[:, :b] += 1
            else:
                value[:, a:b] += stepped[:, 1:]
                count[:, a:b] += 1
        ref_lat = value / count
        blended = blend_windows(preds, views, weights, n)
        our_lat = our_sched.step(blended, t, our_lat).prev_sample
    torch.testing.assert_close(our_lat, ref_lat, atol=1e-4, rtol=1e-5)
