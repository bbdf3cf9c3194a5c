"""CMPModel: released-checkpoint key compatibility, bin decoding, once-per-image densify == per-frame network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mofa.errors import MofaInputError
from mofa.flow.densify import densify_hints
from mofa.hints import DragHint, HintSet, MotionBrush
from mofa.models.cmp import CMPModel, bin_centers, decode_flow_bins
from mofa.models.resized_conv import ResizedConv3x3

KEY_TABLE = Path(__file__).parent / "data" / "keys" / "cmp_resnet50_vip_mpii_liteflow.tsv"


def randomize(model: CMPModel, generator: torch.Generator, head_gain: float = 8.0) -> CMPModel:
    """Give every BatchNorm non-trivial running stats / affine params and make the head's logits peaky, so a
    wrongly-wired buffer or branch changes the output visibly."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(42000)
        model.flow_decoder.head.weight.mul_(head_gain)
    return model.eval()


def sparse_inputs(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.rand(n, 1, size, size, generator=generator) < 0.02).float()
    flow = torch.randn(n, 2, size, size, generator=generator) * 15 * mask
    return flow, mask


@pytest.fixture(scope="module")
def model() -> CMPModel:
    torch.manual_seed(0)
    return randomize(CMPModel(), torch.Generator().manual_seed(1))


def _key_table() -> dict[str, tuple[tuple[int, ...], str]]:
    rows = [line.split("\t") for line in KEY_TABLE.read_text().splitlines()[1:] if line.strip()]
    return {k: (tuple(int(x) for x in s.strip("[]").split(",") if x.strip()), d.strip()) for k, s, d in rows}


@pytest.mark.skipif(not KEY_TABLE.is_file(), reason="spec key table not available")
def test_state_dict_matches_released_key_table_on_meta() -> None:
    table = _key_table()
    assert len(table) == 455
    with torch.device("meta"):
        meta_model = CMPModel()
    state = meta_model.state_dict()
    expected = {k.removeprefix("module."): v for k, v in table.items()}
    assert set(state) == set(expected)
    for key, tensor in state.items():
        shape, dtype = expected[key]
        assert tuple(tensor.shape) == shape, key
        assert str(tensor.dtype).removeprefix("torch.") == dtype, key
    assert sum(p.numel() for p in meta_model.parameters()) == 28_516_422
    assert sum(t.numel() for t in state.values()) == 28_573_966


def test_resnet_is_dilated_to_output_stride_8() -> None:
    with torch.device("meta"):
        meta_model = CMPModel()
    enc = meta_model.image_encoder
    for layer, dilation in ((enc.layer3, 2), (enc.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    assert enc.layer2[0].conv2.stride == (2, 2) and enc.layer2[0].conv1.stride == (1, 1)  # stride in conv2 (v1.5)


def test_encoder_feature_sizes(model: CMPModel) -> None:
    with torch.inference_mode():
        feats = model.encode_image(torch.rand(3, 64, 96))
    assert feats.out.shape == (1, 256, 8, 12)
    assert feats.conv1.shape == (1, 64, 32, 48)
    assert feats.layer1.shape == (1, 256, 16, 24)


def test_bin_centres_and_one_hot_decoding() -> None:
    centres = bin_centers(99, 50.0, dtype=torch.float64)
    expected = torch.tensor([i * 100 / 99 - 50 + 50 / 99 for i in range(99)], dtype=torch.float64)
    assert torch.allclose(centres, expected, atol=1e-12)
    assert centres[49].abs() < 1e-12 and abs(centres[-1].item() - 49.494949) < 1e-5
    logits = torch.full((99, 198, 1, 1), -1e4)
    for i in range(99):
        logits[i, i] = 0.0  # x peak at bin i
        logits[i, 99 + (98 - i)] = 0.0  # y peak at the mirrored bin
    flow = decode_flow_bins(logits)
    assert torch.allclose(flow[:, 0, 0, 0].double(), expected, atol=1e-5)
    assert torch.allclose(flow[:, 1, 0, 0].double(), expected.flip(0), atol=1e-5)


def test_uniform_logits_decode_to_zero_and_range_is_bounded(generator: torch.Generator) -> None:
    uniform = torch.full((2, 198, 3, 3), 0.7)
    assert decode_flow_bins(uniform).abs().max() < 1e-5
    wild = torch.randn(4, 198, 5, 5, generator=generator) * 100
    flow = decode_flow_bins(wild)
    assert flow.abs().max() < 49.5
    # slow formulation: explicit expectation per pixel
    probs = torch.softmax(wild.double().view(4, 2, 99, 25), dim=2)
    slow = (probs * bin_centers(99, 50.0, dtype=torch.float64).view(1, 1, 99, 1)).sum(2).view(4, 2, 5, 5)
    assert torch.allclose(flow.double(), slow, atol=1e-4)


def test_forward_upsamples_half_res_logits_align_corners(model: CMPModel, generator: torch.Generator) -> None:
    image = torch.rand(1, 3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(1, 64, generator)
    with torch.inference_mode():
        logits = model.decode(model.encode_image(image), flow, mask, return_logits=True)
        dense = model(image, flow, mask)
    assert logits.shape == (1, 198, 32, 32)
    low = decode_flow_bins(logits)
    assert dense.shape == (1, 2, 64, 64)
    # align_corners=True: the four corners are copied exactly, and pixel y maps to y * 31/63 on the low-res grid
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert torch.allclose(dense[0, :, y, x], low[0, :, 0 if y == 0 else 31, 0 if x == 0 else 31], atol=1e-4)
    y, x = 21, 40
    sy, sx = y * 31 / 63, x * 31 / 63
    y0, x0 = int(sy), int(sx)
    wy, wx = sy - y0, sx - x0
    manual = (
        low[0, :, y0, x0] * (1 - wy) * (1 - wx)
        + low[0, :, y0, x0 + 1] * (1 - wy) * wx
        + low[0, :, y0 + 1, x0] * wy * (1 - wx)
        + low[0, :, y0 + 1, x0 + 1] * wy * wx
    )
    assert torch.allclose(dense[0, :, y, x], manual, atol=1e-4)


def test_image_normalisation_is_times_two_minus_one(model: CMPModel, generator: torch.Generator) -> None:
    seen = []
    handle = model.image_encoder.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    image = torch.rand(1, 3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(1, 64, generator)
    try:
        with torch.inference_mode():
            model(image, flow, mask)
    finally:
        handle.remove()
    assert torch.equal(seen[0], image * 2 - 1)


def test_densify_runs_resnet_once_and_equals_per_frame_network(model: CMPModel, generator: torch.Generator) -> None:
    n, size = 5, 64
    image = torch.rand(3, size, size, generator=generator)
    flow, mask = sparse_inputs(n, size, generator)
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        dense = model.densify(image, flow, mask, chunk_size=2)
        assert len(calls) == 1
        with torch.inference_mode():
            per_frame = torch.cat([model(image[None], flow[i : i + 1], mask[i : i + 1]) for i in range(n)])
        assert len(calls) == 1 + n
    finally:
        handle.remove()
    assert dense.shape == (n, 2, size, size) and dense.dtype == torch.float32
    scale = per_frame.abs().max().item()
    assert scale > 1  # a non-trivial flow, not the all-zero output of a dead network
    # 1e-5 per pixel of flow magnitude: float32 round-off of the regrouped sums (the algebra itself is exact, see the
    # float64 test below) grows with |flow|; absolute 1e-5 holds for sub-pixel flows.
    assert (dense - per_frame).abs().max() <= 1e-5 * max(1.0, scale)
    # frames differ (the sparse input matters) and a two-channel mask is the same as a one-channel one
    assert (dense[0] - dense[1]).abs().max() > 1e-3
    assert torch.allclose(model.densify(image, flow, mask.expand(-1, 2, -1, -1).contiguous()), dense, atol=1e-6)


def test_densify_matches_with_large_flows(generator: torch.Generator) -> None:
    torch.manual_seed(5)
    peaky = randomize(CMPModel(layers=(1, 1, 1, 1)), generator, head_gain=40.0)
    image = torch.rand(3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(3, 64, generator)
    dense = peaky.densify(image, flow, mask)
    with torch.inference_mode():
        ref = peaky(image[None].expand(3, -1, -1, -1), flow, mask)
    scale = ref.abs().max().item()
    assert 10 < scale < 49.5
    assert (dense - ref).abs().max() <= 1e-5 * scale  # float32 round-off grows with the flow magnitude


def test_decode_with_per_frame_features_and_chunking(model: CMPModel, generator: torch.Generator) -> None:
    images = torch.rand(3, 3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(3, 64, generator)
    with torch.inference_mode():
        feats = model.encode_image(images)
        batched = model.decode(feats, flow, mask, chunk_size=2)
        full = model(images, flow, mask)
    assert (batched - full).abs().max() < 1e-4


def test_densify_float64_matches_exactly(generator: torch.Generator) -> None:
    torch.manual_seed(3)
    model64 = randomize(CMPModel(layers=(1, 1, 1, 1)), generator).double()
    image = torch.rand(3, 64, 64, generator=generator, dtype=torch.float64)
    flow, mask = sparse_inputs(4, 64, generator)
    dense = model64.densify(image, flow.double(), mask.double())
    with torch.inference_mode():
        ref = model64(image[None].expand(4, -1, -1, -1), flow.double(), mask.double())
    assert dense.dtype == torch.float64
    assert (dense - ref).abs().max() < 1e-9


def test_bfloat16_model_runs_close_to_float32(generator: torch.Generator) -> None:
    torch.manual_seed(4)
    model32 = randomize(CMPModel(layers=(1, 1, 1, 1)), generator, head_gain=1.0)
    image = torch.rand(3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(2, 64, generator)
    ref = model32.densify(image, flow, mask)
    model16 = model32.to(torch.bfloat16)
    out = model16.densify(image, flow, mask)
    assert out.dtype == torch.float32  # follows the flow's dtype, computed in bf16 inside
    assert (out - ref).abs().max() < 0.1 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("size", [(60, 64), (64, 36), (48, 48)])
def test_bad_sizes_are_rejected(model: CMPModel, size: tuple[int, int]) -> None:
    flow = torch.zeros(1, 2, *size)
    with pytest.raises(MofaInputError, match="multiples of 8"):
        model.densify(torch.rand(3, *size), flow, torch.zeros(1, 1, *size))


def test_mismatched_inputs_are_rejected(model: CMPModel) -> None:
    with pytest.raises(MofaInputError):
        model.densify(torch.rand(3, 64, 64), torch.zeros(2, 2, 64, 64), torch.zeros(3, 1, 64, 64))
    with pytest.raises(MofaInputError):
        model.densify(torch.rand(3, 64, 64), torch.zeros(2, 2, 72, 64), torch.zeros(2, 1, 72, 64))
    with pytest.raises(MofaInputError):
        model(torch.rand(1, 3, 64, 64), torch.zeros(2, 2, 64, 64), torch.zeros(2, 1, 64, 64))


def test_preferred_grid_and_densifier_wrapper(model: CMPModel, generator: torch.Generator) -> None:
    assert model.preferred_grid((512, 768)) == (384, 384)
    wrapper = model.as_densifier(chunk_size=1)
    assert wrapper.preferred_grid((320, 512)) == (384, 384)
    image = torch.rand(3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(2, 64, generator)
    assert torch.equal(wrapper(image, flow, mask), model.densify(image, flow, mask, chunk_size=1))
    empty = model.densify(image, flow[:0], mask[:0])
    assert empty.shape == (0, 2, 64, 64)


def test_densify_does_not_modify_inputs(model: CMPModel, generator: torch.Generator) -> None:
    image = torch.rand(3, 64, 64, generator=generator)
    flow, mask = sparse_inputs(2, 64, generator)
    copies = [t.clone() for t in (image, flow, mask)]
    model.densify(image, flow, mask)
    assert all(torch.equal(a, b) for a, b in zip((image, flow, mask), copies, strict=True))


def test_densify_hints_brush_passes_share_one_image_encoding(model: CMPModel, generator: torch.Generator) -> None:
    """With a motion brush, the out- and in-pass frames go through one densify call: the ResNet runs once, and the
    result equals densifying every frame on its own."""
    brush = np.zeros((64, 64), bool)
    brush[:, :32] = True
    drags = [DragHint([[10, 12], [18, 20]]), DragHint([[50, 40], [44, 36]])]  # one starts inside, one outside
    hints = HintSet((64, 64), drags, [MotionBrush(brush)], num_frames=4)
    image = torch.rand(3, 64, 64, generator=generator)

    def per_frame(img: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.densify(img, flow[i : i + 1], mask[i : i + 1]) for i in range(flow.shape[0])])

    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for reference_mode in (False, True):
            calls.clear()
            dense = densify_hints(image, hints, model, grid_size=(64, 64), reference_mode=reference_mode)
            assert len(calls) == 1
            want = densify_hints(image, hints, per_frame, grid_size=(64, 64), reference_mode=reference_mode)
            assert len(calls) == 1 + 2 * 3  # the reference way: every frame of both passes encodes the image
            assert dense.shape == (3, 2, 64, 64) and dense.abs().max() > 0.1
            torch.testing.assert_close(dense, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize(("src", "dst"), [((6, 6), (12, 12)), ((3, 5), (12, 20)), ((1, 1), (8, 8)), ((7, 4), (7, 4))])
def test_resized_conv_equals_conv_of_interpolated_input(src, dst, generator: torch.Generator) -> None:
    """The per-frame fusion layers' rewrite: conv3x3(bilinear resize) without building the resized input."""
    weight = torch.randn(5, 3, 3, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(3, *src, generator=generator, dtype=torch.float64)
    up = F.interpolate(x[None], size=dst, mode="bilinear", align_corners=True)
    want = F.conv2d(up, weight, padding=1)[0]  # [5, A', B']
    acc = torch.randn(dst[1], dst[0], 5, generator=generator, dtype=torch.float64)
    plan = ResizedConv3x3(weight, src, dst, block=4)
    for _ in range(2):  # the second call reuses the plan's buffers
        got = plan.accumulate_(x.permute(1, 2, 0).contiguous(), acc.clone())
        torch.testing.assert_close(got - acc, want.permute(2, 1, 0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_densify_non_square_matches_per_frame_network(size, generator: torch.Generator) -> None:
    torch.manual_seed(6)
    tiny = randomize(CMPModel(layers=(1, 1, 1, 1)), generator, head_gain=20.0)
    image = torch.rand(3, *size, generator=generator)
    flow, mask = sparse_inputs(3, max(size), generator)
    flow, mask = flow[..., : size[0], : size[1]], mask[..., : size[0], : size[1]]
    dense = tiny.densify(image, flow, mask, chunk_size=2)
    with torch.inference_mode():
        ref = tiny(image[None].expand(3, -1, -1, -1), flow, mask)
    scale = ref.abs().max().item()
    assert scale > 5
    assert (dense - ref).abs().max() <= 1e-5 * scale
