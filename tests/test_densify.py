"""densify_hints with a trivial fake densifier: brush passes, merge rules, static brush, resize, grid choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mofa.errors import MofaInputError
from mofa.flow.densify import densify_hints, image_to_grid, resolve_densifier
from mofa.hints import DragHint, HintSet, MotionBrush
from mofa.types import SparseToDense


class NearestFill:
    """Fake densifier: every pixel copies the flow of the nearest hinted pixel (brute force). Records its inputs."""

    def __init__(self, grid: tuple[int, int] | None = None) -> None:
        self.grid = grid
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def preferred_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.grid or image_size

    def __call__(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls.append((image, flow, mask))
        n, _, h, w = flow.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pix = torch.stack([ys.flatten(), xs.flatten()], -1).float()
        out = torch.zeros_like(flow)
        for i in range(n):
            src = torch.nonzero(mask[i, 0] > 0).float()
            nearest = torch.cdist(pix, src).argmin(dim=1)
            r, c = src[nearest].long().T
            out[i] = flow[i][:, r, c].reshape(2, h, w)
        return out


def _image(h: int, w: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))


def test_protocol_and_resolution() -> None:
    fake = NearestFill((8, 8))
    assert isinstance(fake, SparseToDense)
    fn, pref = resolve_densifier(fake)
    assert fn is fake and pref((3, 4)) == (8, 8)

    class WithMethod:
        preferred_grid = (5, 6)

        def densify(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return flow

    fn, pref = resolve_densifier(WithMethod())
    assert pref((1, 1)) == (5, 6) and fn.__name__ == "densify"
    with pytest.raises(TypeError):
        resolve_densifier(3)


def test_single_track_fills_everything_and_grid_is_image_grid_by_default() -> None:
    hints = HintSet((12, 16), [DragHint([[2, 3], [6, 5]])], num_frames=3)
    fake = NearestFill()
    dense = densify_hints(_image(12, 16), hints, fake)
    assert dense.shape == (2, 2, 12, 16) and dense.dtype == torch.float32
    torch.testing.assert_close(dense[:, 0], torch.tensor([2.0, 4.0])[:, None, None].expand(2, 12, 16))
    torch.testing.assert_close(dense[:, 1], torch.tensor([1.0, 2.0])[:, None, None].expand(2, 12, 16))
    image, flow, mask = fake.calls[0]
    assert image.shape == (3, 12, 16) and flow.shape == (2, 2, 12, 16) and mask.shape == (2, 1, 12, 16)


def test_preferred_grid_used_and_reference_resize_is_nearest_scaled() -> None:
    img = _image(32, 48)
    hints = HintSet((32, 48), [DragHint([[0, 0], [24, 8]]), DragHint([[47, 31]])], num_frames=2)
    fake = NearestFill((16, 16))
    dense = densify_hints(img, hints, fake, reference_mode=True)
    image_grid, flow, mask = fake.calls[0]
    assert torch.equal(image_grid, F.interpolate(img[None], size=(16, 16), mode="nearest")[0])
    # grid flow: int(24*16/48)=8, int(8*16/32)=4 at (0, 0); anchor at (15, 15). Output: x*48/16, y*32/16.
    assert flow[0, :, 0, 0].tolist() == [8.0, 4.0] and mask[0, 0].sum() == 2
    left = dense[0, :, 0, 0].tolist()
    assert left == [24.0, 8.0]
    assert dense[0, :, 31, 47].tolist() == [0.0, 0.0]
    # nearest upsampling: every output value is one of the two grid values
    assert set(dense[0, 0].unique().tolist()) == {0.0, 24.0}


def test_default_image_resize_is_antialiased_and_flow_resize_bilinear() -> None:
    img = _image(32, 48)
    hints = HintSet((32, 48), [DragHint([[0, 0], [24, 8]]), DragHint([[47, 31]])], num_frames=2)
    fake = NearestFill((16, 16))
    dense = densify_hints(img, hints, fake, out_size=(64, 96))
    want_img = F.interpolate(img[None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(fake.calls[0][0], want_img)
    assert dense.shape == (1, 2, 64, 96)
    assert len(dense[0, 0].unique()) > 2  # bilinear blends the two regions
    torch.testing.assert_close(dense[0, :, 0, 0], torch.tensor([24.0 * 96 / 48, 8.0 * 64 / 32]))


def _brush_hints(in_track: list, out_track: list) -> HintSet:
    brush = np.zeros((20, 20), bool)
    brush[:, :10] = True  # left half
    return HintSet((20, 20), [DragHint(in_track), DragHint(out_track)], [MotionBrush(brush)], num_frames=2)


def test_move_brush_two_passes_default_merge_by_mask() -> None:
    hints = _brush_hints([[3, 3], [6, 7]], [[15, 15], [14, 15]])
    fake = NearestFill()
    dense = densify_hints(_image(20, 20), hints, fake)
    assert len(fake.calls) == 1  # out pass and in pass share one call (one image encoding)
    _, flow, mask = fake.calls[0]
    assert flow.shape[0] == 2 and mask.shape[0] == 2  # [out frame, in frame]
    assert mask[0, 0, 15, 15] > 0 and mask[0, 0, 3, 3] == 0  # out pass: the track starting outside the brush
    assert mask[1, 0, 3, 3] > 0 and mask[1, 0, 15, 15] == 0  # in pass
    assert (dense[0, :, :, :10] == torch.tensor([3.0, 4.0])[:, None, None]).all()
    assert (dense[0, :, :, 10:] == torch.tensor([-1.0, 0.0])[:, None, None]).all()


def test_reference_merge_needs_both_components_nonzero() -> None:
    # In-brush drag purely horizontal (dy = 0): the reference's `.all` rule drops it and uses the out flow.
    hints = _brush_hints([[3, 3], [8, 3]], [[15, 15], [14, 13]])
    ref = densify_hints(_image(20, 20), hints, NearestFill(), reference_mode=True)
    assert (ref[0] == torch.tensor([-1.0, -2.0])[:, None, None]).all()
    default = densify_hints(_image(20, 20), hints, NearestFill())
    assert (default[0, :, :, :10] == torch.tensor([5.0, 0.0])[:, None, None]).all()
    # with diagonal in-motion both modes agree inside the brush (brush mask is exactly 1 here: same grid)
    hints = _brush_hints([[3, 3], [8, 5]], [[15, 15], [14, 13]])
    ref = densify_hints(_image(20, 20), hints, NearestFill(), reference_mode=True)
    assert (ref[0, :, :, :10] == torch.tensor([5.0, 2.0])[:, None, None]).all()
    assert (ref[0, :, :, 10:] == torch.tensor([-1.0, -2.0])[:, None, None]).all()


def test_reference_in_flow_is_multiplied_by_soft_brush() -> None:
    brush = np.zeros((40, 40), bool)
    brush[:, :20] = True
    hints = HintSet((40, 40), [DragHint([[3, 3], [13, 13]])], [MotionBrush(brush)], num_frames=2)
    dense = densify_hints(_image(40, 40), hints, NearestFill((30, 30)), reference_mode=True)
    soft = MotionBrush(brush).resized((30, 30), reference_mode=True)
    grid_vals = 7.0 * soft  # int(13*30/40) - int(3*30/40) = 9 - 2 = 7 on the grid
    want = F.interpolate(grid_vals[None, None], size=(40, 40), mode="nearest")[0, 0] * 40 / 30
    torch.testing.assert_close(dense[0, 0], want)


def test_static_brush_zeroes_flow_and_empty_hints_give_zero() -> None:
    static = np.zeros((20, 20), bool)
    static[15:, :] = True
    hints = HintSet((20, 20), [DragHint([[3, 3], [6, 7]])], [MotionBrush(static, kind="static")], num_frames=3)
    for ref in (False, True):
        dense = densify_hints(_image(20, 20), hints, NearestFill(), reference_mode=ref)
        assert (dense[:, :, 15:] == 0).all()
        assert (dense[-1, :, :5, :5] == torch.tensor([3.0, 4.0])[:, None, None]).all()
    fake = NearestFill()
    empty = densify_hints(_image(20, 20), HintSet((20, 20), num_frames=4), fake, out_size=(10, 12))
    assert empty.shape == (3, 2, 10, 12) and not empty.any() and fake.calls == []


def test_image_checks() -> None:
    hints = HintSet((20, 20), [DragHint([[3, 3]])])
    with pytest.raises(MofaInputError, match="image is 21x20 but the hints were made for 20x20"):
        densify_hints(_image(20, 21), hints, NearestFill())
    with pytest.raises(MofaInputError, match=r"\[3, H, W\]"):
        densify_hints(torch.rand(1, 20, 20), hints, NearestFill())
    out = densify_hints(_image(20, 20)[None], hints, NearestFill())  # a batch of one is accepted
    assert out.shape == (24, 2, 20, 20) and not out.any()
    assert image_to_grid(_image(8, 8), (8, 8)) is not None
