"""Tiny random-init SVD parts + MOFA-Adapter (+ CMP) and savers for the released folder layouts (spec §10).

Sizes follow ENVIRONMENT.md's tiny-SVD recipe, adapted to what the adapter needs: the UNet keeps SVD's four down
blocks with two layers each (12 skips, the adapter's 12 residuals) and the VAE keeps four blocks (latents at 1/8 of
the image, where the adapter's reference pyramid starts). All sizes run a 6-frame 64×64 video on CPU in about a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from mofa.io.weights import CMP_CHECKPOINT_RELPATH
from mofa.models.adapter import MofaAdapterModel
from mofa.pipelines import runtime
from mofa.pipelines.runtime import chunked_feed_forward, onednn_linears, single_key_cross_attention

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "num_attention_heads": (2, 4, 4, 4),
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "num_frames": 6,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
}
TINY_CLIP = {
    "hidden_size": 32,
    "projection_dim": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
}
SVD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "timestep_type": "continuous",
}
TINY_ADAPTER_EMBEDDING = (8, 16, 16, 32)


def build_tiny_svd(seed: int = 0) -> dict[str, Any]:
    """Random-init stock SVD components (diffusers classes), deterministic in ``seed``."""
    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(**TINY_UNET)
    vae = AutoencoderKLTemporalDecoder(**TINY_VAE)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "image_encoder": image_encoder.eval(),
        "scheduler": scheduler,
        "feature_extractor": feature_extractor,
    }


def build_tiny_adapter(unet: torch.nn.Module, seed: int = 1, zero_init: bool = True) -> MofaAdapterModel:
    """Adapter copied from ``unet`` (training start). ``zero_init=False`` randomises the zero convs and the
    conditioning embedding's output so the adapter actually changes the video."""
    torch.manual_seed(seed)
    adapter = MofaAdapterModel.from_unet(unet, conditioning_embedding_out_channels=TINY_ADAPTER_EMBEDDING)
    if not zero_init:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if name.startswith(("controlnet_", "flow_encoder.zeroconvs")) or "conv_out" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return adapter.eval()


def build_tiny_cmp(seed: int = 2) -> torch.nn.Module:
    """CMP with one bottleneck per ResNet stage (channel widths are fixed by the architecture)."""
    from mofa.models.cmp import CMPModel

    torch.manual_seed(seed)
    return CMPModel(layers=(1, 1, 1, 1)).eval()


def save_svd_folder(parts: dict[str, Any], folder: Path, fp16_variant_only: bool = False) -> Path:
    """Write a standard SVD folder (model_index.json + components), like the hub's SVD-XT 1.1.

    ``fp16_variant_only=True`` writes only ``*.fp16.safetensors`` weight files (fp16 tensors), as the reference loads.
    """
    pipe = StableVideoDiffusionPipeline(**parts)
    if fp16_variant_only:
        for name in ("unet", "vae", "image_encoder"):
            getattr(pipe, name).to(torch.float16)
        pipe.save_pretrained(folder, variant="fp16")
        for name in ("unet", "vae", "image_encoder"):
            getattr(pipe, name).to(torch.float32)
    else:
        pipe.save_pretrained(folder)
    return Path(folder)


def save_adapter_folder(adapter: MofaAdapterModel, folder: Path) -> Path:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (the released adapter folder's files)."""
    adapter.save_pretrained(folder)
    return Path(folder)


def save_cmp_checkpoint(cmp: torch.nn.Module, path: Path, step: int = 42000) -> Path:
    """The released CMP checkpoint format: ``{"step", "state_dict" ("module." keys)}`` in a ``.pth.tar`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v for k, v in cmp.state_dict().items()}
    torch.save({"step": step, "state_dict": state}, path)
    return path


def save_traj_tree(root: Path, parts: dict[str, Any], adapter: MofaAdapterModel, cmp: torch.nn.Module | None) -> Path:
    """The ``MOFA-Video-Traj`` app tree: ``ckpts/controlnet``, ``ckpts/stable-video-diffusion-img2vid-xt-1-1`` (fp16
    variant files only) and ``models/cmp/.../ckpt_iter_42000.pth.tar``."""
    save_svd_folder(parts, root / "ckpts" / "stable-video-diffusion-img2vid-xt-1-1", fp16_variant_only=True)
    save_adapter_folder(adapter, root / "ckpts" / "controlnet")
    if cmp is not None:
        save_cmp_checkpoint(cmp, root / CMP_CHECKPOINT_RELPATH)
    return root


def save_hybrid_tree(root: Path, parts: dict[str, Any], adapter: MofaAdapterModel) -> Path:
    """The ``MOFA-Video-Hybrid`` tree: ``ckpts/mofa/traj_controlnet`` + ``ckpts/mofa/stable-video-diffusion-...``."""
    save_svd_folder(parts, root / "ckpts" / "mofa" / "stable-video-diffusion-img2vid-xt-1-1")
    save_adapter_folder(adapter, root / "ckpts" / "mofa" / "traj_controlnet")
    return root


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def build_tiny_pipeline(parts: dict[str, Any] | None = None, zero_adapter: bool = True, flow_model: Any = None):
    """A :class:`~mofa.pipelines.pipeline_mofa.MofaVideoPipeline` on the tiny SVD parts (progress bar off)."""
    from mofa.models.unet_injection import MofaUNetSpatioTemporalConditionModel
    from mofa.pipelines.pipeline_mofa import MofaVideoPipeline

    parts = parts or build_tiny_svd()
    unet = MofaUNetSpatioTemporalConditionModel.from_config(parts["unet"].config)
    unet.load_state_dict(parts["unet"].state_dict())
    adapter = build_tiny_adapter(unet.eval(), zero_init=zero_adapter)
    pipe = MofaVideoPipeline(
        vae=parts["vae"],
        image_encoder=parts["image_encoder"],
        unet=unet,
        adapter=adapter,
        scheduler=parts["scheduler"],
        feature_extractor=parts["feature_extractor"],
        flow_model=flow_model,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def pipeline_runtime(svd: StableVideoDiffusionPipeline, enabled: bool = True) -> Iterator[None]:
    """A stock SVD pipeline under the runtime scopes our pipeline applies by default on a CPU (feed-forward chunking
    and single-key cross-attention in the UNet, oneDNN linear layers in the UNet, VAE and image encoder), so a
    comparison with ours has the same arithmetic on both sides: otherwise float32 rounding apart, which the random
    tiny UNet amplifies to ~1e-4..1e-3."""
    with (
        chunked_feed_forward([svd.unet], enabled=enabled),
        single_key_cross_attention([svd.unet], enabled=enabled),
        onednn_linears([svd.unet, svd.vae, svd.image_encoder], enabled=enabled),
    ):
        yield


def record_onednn_linears(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(input shape, weight shape)`` of every oneDNN linear call made from now on (``runtime._mkldnn_linear``
    wrapped for the test)."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = runtime._mkldnn_linear

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, bias)

    monkeypatch.setattr(runtime, "_mkldnn_linear", recording)
    return calls


class FakeLibc:
    """Stands in for glibc: records the allocator calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


class FakeGlibc233(FakeLibc):
    """:class:`FakeLibc` with ``mallinfo2`` (glibc 2.33+): the heap size it reports is the ``heap`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.heap = 0

    def mallinfo2(self) -> runtime._MallInfo2:
        return runtime._MallInfo2(arena=self.heap)
