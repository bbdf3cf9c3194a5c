"""MofaAdapterModel: released key table, residual shapes, zero-init invariants, warping, injection pattern, IO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mofa.errors import MofaInputError
from mofa.flow.softsplat import softsplat
from mofa.models.adapter import MofaAdapterModel, MofaAdapterOutput

KEYS_TSV = Path(__file__).parent / "data" / "keys" / "traj_controlnet.tsv"

TINY = {
    "block_out_channels": (32, 64, 64, 64),
    "num_attention_heads": (2, 4, 4, 4),
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "conditioning_embedding_out_channels": (8, 16, 16, 32),
    "num_frames": 3,
}
B, T, H, W = 2, 3, 128, 64  # image pixels; latents 16 x 8
CROSS = 32


def _randomize(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Give every parameter (also the zero-initialised convs) small random values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def _tiny(generator: torch.Generator | None = None) -> MofaAdapterModel:
    model = MofaAdapterModel(**TINY).eval()
    if generator is not None:
        _randomize(model, generator)
    return model


def _inputs(generator: torch.Generator, batch: int = B, frames: int = T, flow_scale: float = 6.0) -> dict:
    return {
        "sample": torch.randn(batch, frames, 8, H // 8, W // 8, generator=generator),
        "timestep": torch.tensor(1.5),
        "encoder_hidden_states": torch.randn(batch, 1, CROSS, generator=generator),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * batch),
        "controlnet_cond": torch.rand(batch, 3, H, W, generator=generator) * 2 - 1,
        "controlnet_flow": torch.randn(batch, frames - 1, 2, H, W, generator=generator) * flow_scale,
    }


def _released_table() -> list[tuple[str, tuple[int, ...], str]]:
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    return [(k, tuple(json.loads(s)), d) for k, s, d in rows]


# ---------------------------------------------------------------------------------------------- released layout


@pytest.fixture(scope="module")
def meta_adapter() -> MofaAdapterModel:
    with torch.device("meta"):
        return MofaAdapterModel()


def test_default_adapter_matches_released_key_table(meta_adapter: MofaAdapterModel) -> None:
    table = _released_table()
    assert len(table) == 683
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in meta_adapter.state_dict().items()]
    assert ours == table  # names, shapes, dtypes and order
    assert sum(v.numel() for v in meta_adapter.state_dict().values()) == 694_314_017


def test_default_adapter_uses_released_heads(meta_adapter: MofaAdapterModel) -> None:
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in meta_adapter.down_blocks[:3]]
    assert heads == [5, 10, 10]
    assert meta_adapter.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 20


def test_reference_config_builds_released_architecture(tmp_path: Path) -> None:
    # What the reference's save_pretrained wrote from a from_unet instance: the SVD UNet's values (heads
    # (5, 10, 20, 20)!), keys we do not have, and the reference class name. The reference ignored all of it.
    config = {
        "_class_name": "FlowControlNet",
        "_diffusers_version": "0.24.0",
        "addition_time_embed_dim": 256,
        "block_out_channels": [320, 640, 1280, 1280],
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
        "in_channels": 8,
        "layers_per_block": 2,
        "num_attention_heads": [5, 10, 20, 20],
        "num_frames": 25,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 768,
        "sample_size": 96,
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded_config = MofaAdapterModel.load_config(tmp_path)  # the first step of from_pretrained
    with torch.device("meta"):
        model = MofaAdapterModel.from_config(loaded_config)
    assert tuple(model.config.num_attention_heads) == (5, 10, 10, 20)
    assert model.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 10
    assert "up_block_types" not in model.config
    table = _released_table()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s, _ in table]


def test_constructor_honours_config() -> None:
    model = _tiny()
    assert model.conv_in.out_channels == 32
    assert [m.out_channels for m in model.flow_encoder.zeroconvs] == [32, 64, 64]
    assert model.controlnet_cond_embedding.conv_out.out_channels == 32
    assert len(model.controlnet_down_blocks) == 12
    with pytest.raises(ValueError, match="block_out_channels"):
        MofaAdapterModel(**{**TINY, "block_out_channels": (32, 64, 96, 64)})


# ---------------------------------------------------------------------------------------------- forward


def test_residual_shapes(generator: torch.Generator) -> None:
    model = _tiny(generator)
    with torch.no_grad():
        out = model(**_inputs(generator))
    assert isinstance(out, MofaAdapterOutput)
    h, w = H // 8, W // 8
    channels = [32] * 4 + [64] * 3 + [64] * 5
    sizes = [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3
    expected = [(B * T, c, h // s, w // s) for c, s in zip(channels, sizes, strict=True)]
    assert [tuple(r.shape) for r in out.down_block_res_samples] == expected
    assert tuple(out.mid_block_res_sample.shape) == (B * T, 64, h // 8, w // 8)
    down, mid = model(**_inputs(torch.Generator().manual_seed(0)), return_dict=False)
    assert len(down) == 12 and mid.shape == out.mid_block_res_sample.shape


def test_fresh_adapter_gives_zero_residuals(generator: torch.Generator) -> None:
    model = _tiny()
    with torch.no_grad():
        out = model(**_inputs(generator))
    assert all(torch.count_nonzero(r) == 0 for r in out.down_block_res_samples)
    assert torch.count_nonzero(out.mid_block_res_sample) == 0
    # and the deep reference features are zero (zero 1x1 convs) as is the embedding (zero conv_out)
    inputs = _inputs(generator)
    feats = model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"])
    assert all(torch.count_nonzero(f) == 0 for f in feats)


def test_conditioning_scale_multiplies_residuals(generator: torch.Generator) -> None:
    model = _tiny(generator)
    inputs = _inputs(generator)
    with torch.no_grad():
        one = model(**inputs)
        half = model(**inputs, conditioning_scale=0.5)
    for a, b in zip(one.down_block_res_samples, half.down_block_res_samples, strict=True):
        torch.testing.assert_close(b, a * 0.5)
    torch.testing.assert_close(half.mid_block_res_sample, one.mid_block_res_sample * 0.5)


def test_zero_flow_leaves_reference_features_unwarped(generator: torch.Generator) -> None:
    model = _tiny(generator)
    inputs = _inputs(generator)
    with torch.no_grad():
        feats = model.encode_reference(inputs["controlnet_cond"], torch.zeros_like(inputs["controlnet_flow"]))
        emb = model.controlnet_cond_embedding(inputs["controlnet_cond"])
    torch.testing.assert_close(feats[0].unflatten(0, (B, T))[:, 0], emb, rtol=0, atol=0)
    for level in feats:
        per_frame = level.unflatten(0, (B, T))
        assert per_frame[:, 0].abs().amax() > 0
        for t in range(1, T):
            torch.testing.assert_close(per_frame[:, t], per_frame[:, 0] / (1 + 1e-7), rtol=1e-6, atol=1e-7)


def test_warped_pyramid_matches_per_frame_loop(generator: torch.Generator) -> None:
    """Batched warping == the reference's loop: one softsplat per frame on F.interpolate(nearest)-subsampled flow."""
    model = _tiny(generator)
    inputs = _inputs(generator)
    cond, flow = inputs["controlnet_cond"], inputs["controlnet_flow"]
    with torch.no_grad():
        feats = model.encode_reference(cond, flow, num_frames=T)
        emb = model.controlnet_cond_embedding(cond)
        raw = [emb, *model.flow_encoder(emb)]
    channels = [32, 32, 64, 64]
    for level, (feature, stride) in enumerate(zip(raw, (8, 16, 32, 64), strict=True)):
        assert tuple(feats[level].shape) == (B * T, channels[level], H // stride, W // stride)
        got = feats[level].unflatten(0, (B, T))
        for b in range(B):
            torch.testing.assert_close(got[b, 0], feature[b], rtol=0, atol=0)
            for t in range(1, T):
                small = F.interpolate(flow[b : b + 1, t - 1], scale_factor=1 / stride) / stride
                expected = softsplat(feature[b : b + 1].float(), small.float(), mode="avg")[0]
                torch.testing.assert_close(got[b, t], expected, rtol=1e-5, atol=1e-6)
    # the warp really moved something at the finest level
    assert (feats[0].unflatten(0, (B, T))[:, 1] - feats[0].unflatten(0, (B, T))[:, 0]).abs().amax() > 1e-3


def _kwarg_or_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[0]


def test_feature_injection_pattern(generator: torch.Generator) -> None:
    """W0 after conv_in, W1/W2/W3/W3 after blocks 0..3, W3 before mid; skips are taken before the additions."""
    model = _tiny(generator)
    inputs = _inputs(generator)
    with torch.no_grad():
        w = model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"])
    record: dict[str, object] = {}

    def save_out(name):
        return lambda module, args, kwargs, out: record.__setitem__(name, out)

    def save_in(name):
        return lambda module, args, kwargs: record.__setitem__(name, _kwarg_or_arg(args, kwargs, "hidden_states"))

    handles = [model.conv_in.register_forward_hook(save_out("conv_in"), with_kwargs=True)]
    for k, block in enumerate(model.down_blocks):
        handles.append(block.register_forward_pre_hook(save_in(f"in{k}"), with_kwargs=True))
        handles.append(block.register_forward_hook(save_out(f"out{k}"), with_kwargs=True))
    handles.append(model.mid_block.register_forward_pre_hook(save_in("mid"), with_kwargs=True))
    for i, conv in enumerate(model.controlnet_down_blocks):
        handles.append(conv.register_forward_pre_hook(lambda m, a, i=i: record.__setitem__(f"skip{i}", a[0])))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()

    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(record["in0"], record["conv_in"] + w[0], **exact)
    for k, feature in enumerate([w[1], w[2]]):
        torch.testing.assert_close(record[f"in{k + 1}"], record[f"out{k}"][0] + feature, **exact)
    torch.testing.assert_close(record["in3"], record["out2"][0] + w[3], **exact)
    torch.testing.assert_close(record["mid"], record["out3"][0] + w[3] + w[3], **exact)  # W3: 3x in total
    # skips: conv_in output incl. W0, then each block's res samples (before the W addition)
    torch.testing.assert_close(record["skip0"], record["in0"], **exact)
    res = [r for k in range(4) for r in record[f"out{k}"][1]]
    for i, r in enumerate(res, start=1):
        torch.testing.assert_close(record[f"skip{i}"], r, **exact)
    torch.testing.assert_close(record["skip3"], record["out0"][0], **exact)  # downsampler output, pre-W1
    assert all(f.abs().amax() > 0 for f in w)


def test_cached_reference_features_and_batch_broadcast(generator: torch.Generator) -> None:
    model = _tiny(generator)
    inputs = _inputs(generator)
    with torch.no_grad():
        plain = model(**inputs)
        feats = model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"])
        cached = model(**{**inputs, "controlnet_cond": None, "controlnet_flow": None}, reference_features=feats)
    for a, b in zip(plain.down_block_res_samples, cached.down_block_res_samples, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(plain.mid_block_res_sample, cached.mid_block_res_sample, rtol=0, atol=0)

    # CFG: a batch-1 reference encoded once serves both halves of a batch-2 call
    cond1, flow1 = inputs["controlnet_cond"][:1], inputs["controlnet_flow"][:1]
    with torch.no_grad():
        feats1 = model.encode_reference(cond1, flow1)
        assert feats1[0].shape[0] == T
        shared = model(**{**inputs, "controlnet_cond": None, "controlnet_flow": None}, reference_features=feats1)
        doubled = model(
            **{**inputs, "controlnet_cond": cond1.repeat(2, 1, 1, 1), "controlnet_flow": flow1.repeat(2, 1, 1, 1, 1)}
        )
    for a, b in zip(doubled.down_block_res_samples, shared.down_block_res_samples, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_mofa_input_error(generator: torch.Generator) -> None:
    model = _tiny()
    inputs = _inputs(generator)
    with pytest.raises(MofaInputError, match="controlnet_cond"):
        model(**{**inputs, "controlnet_cond": None})
    with pytest.raises(MofaInputError, match="multiples of 64"):
        model.encode_reference(inputs["controlnet_cond"][..., :96, :], inputs["controlnet_flow"][..., :96, :])
    with pytest.raises(MofaInputError, match="controlnet_flow"):
        model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"][:, :, :1])
    with pytest.raises(MofaInputError, match="num_frames"):
        model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"], num_frames=T + 1)
    feats = model.encode_reference(inputs["controlnet_cond"], inputs["controlnet_flow"])
    with pytest.raises(MofaInputError, match="reference_features"):
        model(**inputs, reference_features=feats[:3])


# ---------------------------------------------------------------------------------------------- IO and from_unet


def test_save_and_load_round_trip(tmp_path: Path, generator: torch.Generator) -> None:
    model = _tiny(generator)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "MofaAdapterModel"
    assert config["block_out_channels"] == [32, 64, 64, 64]
    loaded = MofaAdapterModel.from_pretrained(tmp_path).eval()
    inputs = _inputs(generator)
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    for x, y in zip(a.down_block_res_samples, b.down_block_res_samples, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a.mid_block_res_sample, b.mid_block_res_sample, rtol=0, atol=0)


def test_config_with_reference_extra_keys_loads(tmp_path: Path, generator: torch.Generator) -> None:
    model = _tiny(generator)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(
        {
            "out_channels": 4,
            "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
            "_diffusers_version": "0.24.0",
        }
    )
    path.write_text(json.dumps(config))
    loaded = MofaAdapterModel.from_pretrained(tmp_path)  # unknown keys: a warning, not an error
    assert tuple(loaded.config.block_out_channels) == (32, 64, 64, 64)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def _tiny_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64, 64, 64),
        num_attention_heads=(2, 4, 4, 4),
        cross_attention_dim=CROSS,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        num_frames=3,
    ).eval()


@pytest.mark.parametrize("reference_mode", [False, True])
def test_from_unet_copies_encoder(reference_mode: bool) -> None:
    unet = _tiny_unet()
    heads = (2, 4, 4, 4) if reference_mode else None
    model = MofaAdapterModel.from_unet(
        unet,
        conditioning_embedding_out_channels=(8, 16, 16, 32),
        num_attention_heads=heads,
        reference_mode=reference_mode,
    )
    assert tuple(model.config.block_out_channels) == (32, 64, 64, 64)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(model, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    same_add = all(
        torch.equal(a, b)
        for a, b in zip(
            model.add_embedding.state_dict().values(), unet.add_embedding.state_dict().values(), strict=True
        )
    )
    assert same_add is (not reference_mode)  # spec §12.18: the reference forgot add_embedding


def test_from_unet_heads_follow_unet_or_reference() -> None:
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()  # SVD defaults: heads (5, 10, 20, 20)
        fixed = MofaAdapterModel.from_unet(unet, load_weights_from_unet=False)
        reference = MofaAdapterModel.from_unet(unet, load_weights_from_unet=False, reference_mode=True)
    assert tuple(fixed.config.num_attention_heads) == (5, 10, 20, 20)
    assert tuple(reference.config.num_attention_heads) == (5, 10, 10, 20)  # what the released adapter used
    assert reference.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 10


def test_from_unet_fresh_adapter_encoder_equals_unet_encoder(generator: torch.Generator) -> None:
    """A fresh adapter sees zero reference features, so its pre-zero-conv skips equal the UNet's skips."""
    unet = _tiny_unet()
    model = MofaAdapterModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32)).eval()
    inputs = _inputs(generator)
    skips: dict[int, torch.Tensor] = {}
    handles = [
        conv.register_forward_pre_hook(lambda m, a, i=i: skips.__setitem__(i, a[0]))
        for i, conv in enumerate(model.controlnet_down_blocks)
    ]
    unet_skips: list[torch.Tensor] = []

    def grab(module, args, kwargs, out):
        unet_skips.extend(out[1])

    handles += [b.register_forward_hook(grab, with_kwargs=True) for b in unet.down_blocks]
    handles.append(unet.conv_in.register_forward_hook(lambda m, a, out: unet_skips.insert(0, out)))
    with torch.no_grad():
        model(**inputs)
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["added_time_ids"])
    for h in handles:
        h.remove()
    assert len(unet_skips) == 12
    for i in range(12):
        torch.testing.assert_close(skips[i], unet_skips[i], rtol=1e-5, atol=1e-5)
