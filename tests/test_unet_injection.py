"""MofaUNetSpatioTemporalConditionModel: parent equality, SVD folder loading, residual multiplicities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from mofa.models.unet_injection import MofaUNetSpatioTemporalConditionModel, residual_multiplicities

TINY_UNET = {
    "block_out_channels": (32, 64, 64, 64),
    "num_attention_heads": (2, 4, 4, 4),
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "num_frames": 3,
}
B, T, h, w = 2, 2, 8, 16  # latent grid (smallest that keeps 4 levels, non-square)
SVD_MULTIPLICITIES = [4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1]


def _inputs(generator: torch.Generator) -> tuple:
    return (
        torch.randn(B, T, 8, h, w, generator=generator),
        torch.tensor(0.7),
        torch.randn(B, 1, 32, generator=generator),
        torch.tensor([[6.0, 127.0, 0.02]] * B),
    )


@pytest.fixture(scope="module")
def unet() -> MofaUNetSpatioTemporalConditionModel:
    torch.manual_seed(1)
    return MofaUNetSpatioTemporalConditionModel(**TINY_UNET).eval()


def _skip_shapes(model: UNetSpatioTemporalConditionModel) -> list[tuple[int, ...]]:
    """conv_in, then per down block ``layers_per_block`` resnet outputs and (not the last) one downsampled output."""
    channels = model.config.block_out_channels
    shapes = [(B * T, channels[0], h, w)]
    size = (h, w)
    for k, c in enumerate(channels):
        shapes += [(B * T, c, *size)] * model.config.layers_per_block
        if k < len(channels) - 1:
            size = (size[0] // 2, size[1] // 2)
            shapes.append((B * T, c, *size))
    return shapes


def _record_skips_and_mid(model: torch.nn.Module, *args, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the UNet and return the 12 skips as the up blocks received them (UNet order) and the up-path input."""
    per_block: dict[int, tuple] = {}
    up_input: dict[str, torch.Tensor] = {}

    def pre(i):
        def hook(module, a, kw):
            per_block[i] = kw["res_hidden_states_tuple"]
            if i == 0:
                up_input["x"] = kw["hidden_states"]

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(model.up_blocks)]
    with torch.no_grad():
        out = model(*args, **kwargs).sample
    for handle in handles:
        handle.remove()
    skips = [s for i in reversed(range(len(model.up_blocks))) for s in per_block[i]]
    return skips, up_input["x"], out


def test_multiplicities_known_answer() -> None:
    assert residual_multiplicities([1, 3, 3, 3, 2]) == SVD_MULTIPLICITIES
    assert residual_multiplicities([1, 3, 3, 3, 2], "single") == [1] * 12
    assert residual_multiplicities([1, 2, 1]) == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="residual_mode"):
        residual_multiplicities([1, 3], "twice")


def test_no_residuals_equals_parent_forward(unet: MofaUNetSpatioTemporalConditionModel, generator) -> None:
    parent = UNetSpatioTemporalConditionModel(**TINY_UNET).eval()
    parent.load_state_dict(unet.state_dict())
    args = _inputs(generator)
    with torch.no_grad():
        ours = unet(*args).sample
        theirs = parent(*args).sample
        ours_tuple = unet(*args, return_dict=False)
    assert ours.shape == (B, T, 4, h, w)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_tuple[0], ours, rtol=0, atol=0)


def test_loads_stock_svd_unet_folder(tmp_path: Path) -> None:
    torch.manual_seed(2)
    stock = UNetSpatioTemporalConditionModel(**TINY_UNET).eval()
    stock.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNetSpatioTemporalConditionModel"
    ours = MofaUNetSpatioTemporalConditionModel.from_pretrained(tmp_path)
    assert type(ours) is MofaUNetSpatioTemporalConditionModel

    def public(config) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert public(ours.config) == public(stock.config)
    a, b = ours.state_dict(), stock.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("mode", "expected"), [("accumulate", SVD_MULTIPLICITIES), ("single", [1] * 12)])
def test_residual_multiplicity(unet, generator, mode: str, expected: list[int]) -> None:
    args = _inputs(generator)
    shapes = _skip_shapes(unet)
    residuals = [torch.randn(s, generator=generator) for s in shapes]
    mid = torch.randn(B * T, 64, h // 8, w // 8, generator=generator)
    base_skips, base_up, base_out = _record_skips_and_mid(unet, *args)
    skips, up, out = _record_skips_and_mid(
        unet,
        *args,
        down_block_additional_residuals=residuals,
        mid_block_additional_residual=mid,
        residual_mode=mode,
    )
    assert [tuple(s.shape) for s in base_skips] == shapes
    for i, (s0, s1, r) in enumerate(zip(base_skips, skips, residuals, strict=True)):
        torch.testing.assert_close(s1 - s0, expected[i] * r, rtol=1e-5, atol=1e-5, msg=f"skip {i}")
    torch.testing.assert_close(up - base_up, mid, rtol=1e-5, atol=1e-5)  # mid residual added once
    assert (out - base_out).abs().amax() > 1e-3


def test_single_residual_marks_only_its_skip(unet, generator) -> None:
    """One-hot residual (skip 5 only): in accumulate mode exactly that skip moves, by 3x the marker."""
    args = _inputs(generator)
    shapes = _skip_shapes(unet)
    residuals = [torch.zeros(s) for s in shapes]
    residuals[5] = torch.ones(shapes[5])
    base_skips, _, _ = _record_skips_and_mid(unet, *args)
    skips, _, _ = _record_skips_and_mid(unet, *args, down_block_additional_residuals=residuals)
    diffs = [(a - b).abs().amax().item() for a, b in zip(skips, base_skips, strict=True)]
    assert [i for i, d in enumerate(diffs) if d > 0] == [5]
    torch.testing.assert_close(skips[5] - base_skips[5], torch.full(shapes[5], 3.0), rtol=0, atol=1e-5)


def test_bad_residuals_raise(unet, generator) -> None:
    args = _inputs(generator)
    residuals = [torch.zeros(s) for s in _skip_shapes(unet)]
    with pytest.raises(ValueError, match="12 down_block_additional_residuals"):
        unet(*args, down_block_additional_residuals=residuals[:11])
    with pytest.raises(ValueError, match="residual_mode"):
        unet(*args, down_block_additional_residuals=residuals, residual_mode="twice")


def test_fresh_adapter_leaves_unet_output_unchanged(unet, generator) -> None:
    from mofa.models.adapter import MofaAdapterModel

    adapter = MofaAdapterModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32)).eval()
    sample, timestep, ehs, ids = _inputs(generator)
    cond = torch.rand(B, 3, h * 8, w * 8, generator=generator) * 2 - 1
    flow = torch.randn(B, T - 1, 2, h * 8, w * 8, generator=generator) * 4
    with torch.no_grad():
        res = adapter(sample, timestep, ehs, ids, controlnet_cond=cond, controlnet_flow=flow)
        plain = unet(sample, timestep, ehs, ids).sample
        injected = unet(
            sample,
            timestep,
            ehs,
            ids,
            down_block_additional_residuals=res.down_block_res_samples,
            mid_block_additional_residual=res.mid_block_res_sample,
        ).sample
    torch.testing.assert_close(injected, plain, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["accumulate", "single"])
def test_released_residuals_are_freed_before_the_up_pass(unet, generator, mode: str) -> None:
    """``release_residuals=True`` with a list: same output, the list is emptied and its tensors are gone (no other
    reference) by the time the first up block runs; a tuple, or the default, is left alone."""
    import weakref

    args = _inputs(generator)
    shapes = _skip_shapes(unet)
    alive_at_up_pass: list[bool] = []
    refs: list[weakref.ref] = []
    handle = unet.up_blocks[0].register_forward_pre_hook(
        lambda *_: alive_at_up_pass.append(any(r() is not None for r in refs))
    )
    with torch.no_grad():
        kept = tuple(torch.randn(s, generator=generator) for s in shapes)
        expected = unet(*args, down_block_additional_residuals=kept, residual_mode=mode, release_residuals=True)
        assert len(kept) == 12 and alive_at_up_pass == [False]  # no refs registered yet
        residuals = [r.clone() for r in kept]
        refs.extend(weakref.ref(r) for r in residuals)
        got = unet(*args, down_block_additional_residuals=residuals, residual_mode=mode, release_residuals=True)
        listed = list(kept)
        unet(*args, down_block_additional_residuals=listed, residual_mode=mode)  # default: not released
    handle.remove()
    assert residuals == [] and alive_at_up_pass[:2] == [False, False]
    assert all(r() is None for r in refs)
    assert len(listed) == 12
    torch.testing.assert_close(got.sample, expected.sample, rtol=0, atol=0)
