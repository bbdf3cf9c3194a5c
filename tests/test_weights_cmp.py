"""CMP weight loading: the released .pth.tar layout, safe loading only, strict key checks, conversion, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mofa.errors import MofaInputError
from mofa.io.weights import (
    LoadReport,
    check_state_dict,
    convert_cmp_checkpoint,
    load_cmp_checkpoint,
    read_cmp_state_dict,
)
from mofa.models.cmp import CMPModel


def _randomize_buffers(model: CMPModel, seed: int) -> CMPModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(42000)
        model.flow_decoder.head.weight.mul_(8.0)
    return model.eval()


def _released_layout(model: CMPModel) -> dict:
    """The released checkpoint dict: step, 'module.'-prefixed state dict, plain SGD optimizer state."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    params = [k for k, v in state.items() if v.is_floating_point()][:3]
    optimizer = {
        "state": {i: {"momentum_buffer": torch.randn_like(state[k])} for i, k in enumerate(params)},
        "param_groups": [
            {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False, "params": [0, 1, 2]}
        ],
    }
    return {"step": 42000, "state_dict": state, "optimizer": optimizer}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[CMPModel, Path]:
    torch.manual_seed(0)
    model = _randomize_buffers(CMPModel(), seed=1)
    path = tmp_path_factory.mktemp("cmp") / "ckpt_iter_42000.pth.tar"
    torch.save(_released_layout(model), path)
    return model, path


def _inputs(n: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(n, 1, size, size, generator=gen) < 0.03).float()
    return torch.rand(3, size, size, generator=gen), torch.randn(n, 2, size, size, generator=gen) * 9 * mask, mask


def test_released_layout_loads_and_reproduces_outputs(released: tuple[CMPModel, Path]) -> None:
    model, path = released
    loaded, report = load_cmp_checkpoint(path, return_report=True)
    assert isinstance(loaded, CMPModel) and not loaded.training
    assert isinstance(report, LoadReport)
    assert report.loaded == 455 and report.parameters == 28_516_422 and report.format == "pth.tar"
    assert "optimizer state" in report.ignored and "step=42000" in report.ignored
    assert "455 tensors" in str(report) and "optimizer state" in str(report)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image, flow, mask = _inputs()
    expected = model.densify(image, flow, mask)
    assert expected.abs().max() > 0.5
    assert torch.equal(loaded.densify(image, flow, mask), expected)


def test_legacy_serialization_also_loads(tmp_path: Path) -> None:
    # Checkpoints from 2019-era PyTorch use the pre-zip format; weights_only=True reads it too.
    torch.manual_seed(2)
    model = CMPModel()
    path = tmp_path / "legacy.pth.tar"
    torch.save(_released_layout(model), path, _use_new_zipfile_serialization=False)
    loaded = load_cmp_checkpoint(path)
    assert torch.equal(loaded.flow_decoder.head.weight, model.flow_decoder.head.weight)


class _ShellPayload:
    """Unpickling this runs a shell command (the attack a weights-only loader must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PlainObject:
    """Any class instance: not code by itself, but not a tensor container either."""


@pytest.mark.parametrize("payload", ["os_system", "class_instance"])
def test_pickled_code_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    bad = _ShellPayload(marker) if payload == "os_system" else _PlainObject()
    path = tmp_path / "tampered.pth.tar"
    torch.save({"step": 1, "state_dict": {"module.x": torch.zeros(1)}, "optimizer": bad}, path)
    with pytest.raises(MofaInputError, match="pickled code"):
        load_cmp_checkpoint(path)
    assert not marker.exists()


def test_missing_unexpected_and_wrong_shaped_keys_are_listed(tmp_path: Path) -> None:
    state = {
        "module.flow_decoder.head.weight": torch.zeros(10, 64, 1, 1),  # wrong shape
        "module.flow_decoder.head.bias": torch.zeros(198),
        "module.extra_head.weight": torch.zeros(3),  # unexpected
    }
    path = tmp_path / "partial.pth.tar"
    torch.save({"step": 1, "state_dict": state}, path)
    with pytest.raises(MofaInputError) as info:
        load_cmp_checkpoint(path)
    message = str(info.value)
    assert "453 missing: flow_decoder.decoder1.0.bias" in message and "(+448)" in message
    assert "1 unexpected: extra_head.weight" in message
    assert "1 wrong-shaped: flow_decoder.head.weight (10, 64, 1, 1) (expected (198, 64, 1, 1))" in message
    assert "\n" not in message


def test_check_state_dict_accepts_exact_match() -> None:
    with torch.device("meta"):
        state = CMPModel(layers=(1, 1, 1, 1)).state_dict()
    check_state_dict(state, dict(state), "x", "CMP")  # no error
    with pytest.raises(MofaInputError, match="1 missing"):
        check_state_dict(state, dict(list(state.items())[1:]), "x", "CMP")


def test_unreadable_and_non_dict_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MofaInputError, match="not a readable PyTorch checkpoint"):
        load_cmp_checkpoint(garbage)
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(MofaInputError, match="not a checkpoint dict"):
        load_cmp_checkpoint(listy)
    with pytest.raises(MofaInputError, match="does not exist"):
        load_cmp_checkpoint(tmp_path / "nope.pth.tar")
    with pytest.raises(MofaInputError, match="not a CMP folder"):
        load_cmp_checkpoint(tmp_path)


def test_convert_round_trip_safetensors_and_folder(released: tuple[CMPModel, Path], tmp_path: Path) -> None:
    model, path = released
    image, flow, mask = _inputs()
    expected = model.densify(image, flow, mask)

    single = tmp_path / "cmp.safetensors"
    report = convert_cmp_checkpoint(path, single)
    assert report.target == str(single) and report.loaded == 455
    state, config, _ = read_cmp_state_dict(single)
    assert config == {"layers": (3, 4, 6, 3), "img_enc_dim": 256, "sparse_enc_dim": 16, "nbins": 99, "fmax": 50.0}
    assert not any(k.startswith("module.") for k in state)
    assert torch.equal(load_cmp_checkpoint(single).densify(image, flow, mask), expected)

    folder = tmp_path / "flow_model"
    convert_cmp_checkpoint(single, folder)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "CMPModel"
    assert torch.equal(load_cmp_checkpoint(folder).densify(image, flow, mask), expected)
    via_diffusers = CMPModel.from_pretrained(folder)
    assert torch.equal(via_diffusers.densify(image, flow, mask), expected)

    with pytest.raises(MofaInputError, match="already exists"):
        convert_cmp_checkpoint(path, single)
    with pytest.raises(MofaInputError, match="must end in .safetensors"):
        convert_cmp_checkpoint(path, tmp_path / "cmp.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.safetensors", "flow_model"]  # no temp leftovers


def test_tiny_config_round_trips_through_safetensors_metadata(tmp_path: Path) -> None:
    torch.manual_seed(3)
    tiny = _randomize_buffers(CMPModel(layers=(1, 1, 1, 1), fmax=30.0), seed=3)
    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    out = tmp_path / "tiny.safetensors"
    convert_cmp_checkpoint(folder, out)
    loaded = load_cmp_checkpoint(out, dtype="bf16")
    assert loaded.config.layers in ((1, 1, 1, 1), [1, 1, 1, 1]) and loaded.config.fmax == 30.0
    assert loaded.dtype == torch.bfloat16
    assert loaded.image_encoder.bn1.num_batches_tracked.dtype == torch.int64
    with pytest.raises(MofaInputError, match="unknown dtype"):
        load_cmp_checkpoint(out, dtype="int3")


def test_cli_convert_prints_report_and_bad_input_exits_2(
    released: tuple[CMPModel, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mofa.cli import main

    _, path = released
    out = tmp_path / "cli.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["convert", "cmp", str(path), str(out)])
    assert info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "loaded 455 tensors" in printed and "ignored: step=42000, optimizer state" in printed
    assert out.is_file()

    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"junk")
    with pytest.raises(SystemExit) as info:
        main(["convert", "cmp", str(bad), str(tmp_path / "never.safetensors")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "never.safetensors").exists()


def test_weights_module_is_import_light() -> None:
    code = "import sys, mofa.io.weights; print([m for m in ('diffusers', 'mofa.models.cmp') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
