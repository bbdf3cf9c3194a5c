"""Tests of the weight-free sparse-to-dense densifier (mofa.flow.classic)."""

from __future__ import annotations

import pytest
import torch

from mofa.flow.classic import ClassicDensifier

GRID = 384


def square_scene(size: int = GRID) -> torch.Tensor:
    """Blue background with a red, textured square over rows/cols 140..239."""
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(3, size, size)
    img[1], img[2] = 0.3, 0.7
    img += 0.03 * torch.rand(3, size, size, generator=gen)
    img[:, 140:240, 140:240] = torch.tensor([0.85, 0.2, 0.1]).view(3, 1, 1) + 0.08 * torch.rand(
        3, 100, 100, generator=gen
    )
    return img.clamp(0, 1)


def sparse(points, vectors, frames: int, size: int = GRID):
    """Sparse flow/mask with hints at xy ``points``; frame n carries ``vectors * (n + 1) / frames``."""
    flow = torch.zeros(frames, 2, size, size)
    mask = torch.zeros(frames, 1, size, size)
    for (x, y), (vx, vy) in zip(points, vectors, strict=True):
        for n in range(frames):
            scale = (n + 1) / frames
            flow[n, 0, y, x] = vx * scale
            flow[n, 1, y, x] = vy * scale
            mask[n, 0, y, x] = 1.0
    return flow, mask


def test_reproduces_vectors_at_hint_pixels():
    gen = torch.Generator().manual_seed(1)
    points = [(50, 60), (200, 190), (300, 90), (120, 330), (121, 330)]
    vectors = (torch.rand(len(points), 2, generator=gen) * 40 - 20).tolist()
    flow, mask = sparse(points, vectors, frames=6)
    dense = ClassicDensifier()(square_scene(), flow, mask)
    assert dense.shape == flow.shape and dense.dtype == flow.dtype
    for x, y in points:
        torch.testing.assert_close(dense[:, :, y, x], flow[:, :, y, x], rtol=0, atol=1e-5)


def test_dragged_textured_square_moves_and_background_stays():
    flow, mask = sparse([(190, 190)], [(20.0, 0.0)], frames=4)
    dense = ClassicDensifier()(square_scene(), flow, mask)[-1]
    interior = dense[0, 150:230, 150:230]
    assert interior.min() > 18.0
    assert abs(interior.mean().item() - 20.0) < 1.0
    assert dense[1, 150:230, 150:230].abs().max() < 0.5
    # Background bands right next to the square (within 10 px) move much less.
    next_to = torch.cat([dense[0, 140:240, 242:252].flatten(), dense[0, 242:252, 140:240].flatten()])
    assert next_to.abs().mean() < 2.0


def test_flow_vanishes_far_from_the_only_drag():
    gen = torch.Generator().manual_seed(2)
    img = (0.5 + 0.02 * torch.rand(3, GRID, GRID, generator=gen)).expand(3, GRID, GRID).clone()
    flow, mask = sparse([(192, 192)], [(15.0, -10.0)], frames=3)
    dense = ClassicDensifier()(img, flow, mask)[-1]
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    far = ((xs - 192) ** 2 + (ys - 192) ** 2).float().sqrt() > 150
    assert dense.norm(dim=0)[far].max() < 0.05 * 18.0
    near = ((xs - 192) ** 2 + (ys - 192) ** 2).float().sqrt() < 10
    assert dense[0][near].min() > 0.5 * 15.0  # the drag itself does spread in a flat region


def test_zero_anchor_holds_its_region():
    img = square_scene()
    # Drag the left half of the square, pin its right half with a zero-motion anchor.
    flow, mask = sparse([(160, 190), (225, 190)], [(20.0, 0.0), (0.0, 0.0)], frames=2)
    dense = ClassicDensifier()(img, flow, mask)[-1]
    assert torch.all(dense[:, 190, 225] == 0)
    assert dense[0, 185:195, 220:230].abs().mean() < 5.0
    assert dense[0, 185:195, 155:165].mean() > 15.0


def test_deterministic_linear_and_batched_equals_per_frame():
    gen = torch.Generator().manual_seed(3)
    points = [(100, 100), (190, 190), (280, 60)]
    vectors = (torch.rand(3, 2, generator=gen) * 30 - 15).tolist()
    flow, mask = sparse(points, vectors, frames=5)
    flow[2] = flow[2] * -0.7  # frames are not all proportional
    img = square_scene()
    densifier = ClassicDensifier()
    dense = densifier(img, flow, mask)
    assert torch.equal(dense, densifier(img, flow, mask))
    torch.testing.assert_close(densifier(img, 2 * flow, mask), 2 * dense, rtol=1e-4, atol=1e-4)
    per_frame = torch.cat([densifier(img, flow[n : n + 1], mask[n : n + 1]) for n in range(5)])
    torch.testing.assert_close(per_frame, dense, rtol=1e-4, atol=1e-4)


def test_frames_with_different_hint_pixels_and_fractional_masks():
    img = square_scene()
    flow, mask = sparse([(100, 100), (190, 190)], [(10.0, 0.0), (0.0, 10.0)], frames=3)
    mask[1, 0, 100, 100] = 0.0  # frame 1 lacks the first hint
    flow[1, :, 100, 100] = 0.0
    mask[2] *= 0.4  # bilinear brush values (reference mode) still mark hints
    densifier = ClassicDensifier()
    dense = densifier(img, flow, mask)
    for n in range(3):
        torch.testing.assert_close(dense[n : n + 1], densifier(img, flow[n : n + 1], mask[n : n + 1]))
    torch.testing.assert_close(dense[2, :, 100, 100], flow[2, :, 100, 100])
    assert dense[1, 0].abs().max() < 1e-6  # only the vertical hint is left in frame 1


def test_no_hints_gives_zero_flow():
    flow = torch.zeros(2, 2, 32, 48)
    dense = ClassicDensifier()(torch.rand(3, 32, 48), flow, torch.zeros(2, 1, 32, 48))
    assert torch.equal(dense, flow)


def test_preferred_grid_caps_long_side_and_keeps_aspect():
    densifier = ClassicDensifier()
    assert densifier.preferred_grid((512, 512)) == (384, 384)
    assert densifier.preferred_grid((512, 768)) == (256, 384)
    assert densifier.preferred_grid((320, 256)) == (320, 256)
    assert ClassicDensifier(max_size=256).preferred_grid((576, 1024)) == (144, 256)


def test_bad_shapes_raise():
    densifier = ClassicDensifier()
    with pytest.raises(ValueError, match="image"):
        densifier(torch.rand(1, 8, 8), torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="flow"):
        densifier(torch.rand(3, 8, 8), torch.zeros(1, 2, 8, 9), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="mask"):
        densifier(torch.rand(3, 8, 8), torch.zeros(2, 2, 8, 8), torch.zeros(1, 1, 8, 8))
