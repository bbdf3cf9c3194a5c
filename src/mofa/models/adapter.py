"""MOFA-Adapter (trajectory variant): a ControlNet copy of the SVD encoder fed with forward-warped reference features.

The adapter is the trainable half of MOFA-Video (Niu et al., ECCV 2024). It copies the SVD UNet's ``conv_in``, time
embeddings, four down blocks and mid block, and adds

- ``controlnet_cond_embedding``: the first frame ``[B, 3, H, W]`` in ``[-1, 1]`` → ``e`` ``[B, C0, H/8, W/8]``;
- ``flow_encoder``: three stride-2 convs on ``e`` whose zero-initialised 1×1 outputs give reference features at
  1/16, 1/32, 1/64 of the image;
- ``controlnet_down_blocks`` (one zero 1×1 conv per UNet skip) and ``controlnet_mid_block`` (zero 1×1 conv).

The reference pyramid ``[e, z1, z2, z3]`` is forward-warped (softmax splatting, ``"avg"``) to every frame with the
dense flow subsampled to each level (nearest, stride ``s``, divided by ``s``); frame 0 keeps the unwarped feature.
The warped pyramid ``W0..W3`` is added into the adapter's own encoder stream: ``W0`` after ``conv_in``, ``W1`` after
down block 0, ``W2`` after block 1, ``W3`` after blocks 2 and 3 and once more before the mid block (3×, as in the
released weights, spec §4 / §12.2). The encoder's skip tensors are taken before these additions.

Compatibility with the released checkpoint (``MyNiuuu/MOFA-Video-Traj`` ``controlnet/``): ``MofaAdapterModel()``
with default arguments has exactly the released state-dict keys and shapes (683 tensors, 694,314,017 parameters).
Unlike the reference class (``FlowControlNet``), whose constructor ignores every architecture argument (spec §12.3),
this constructor honours its config so that tiny test models are the same class. A ``config.json`` written by the
reference (``"_class_name": "FlowControlNet"``) is therefore read the reference's way: its architecture fields are
informational and only the conditioning-embedding fields are used (see :meth:`MofaAdapterModel.extract_init_dict`).
Note that the released adapter uses ``num_attention_heads=(5, 10, 10, 20)`` (the reference's class default) while
the SVD UNet uses ``(5, 10, 20, 20)``: head counts do not change weight shapes but do change the numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_3d_blocks import UNetMidBlockSpatioTemporal, get_down_block
from diffusers.utils import BaseOutput, logging
from torch import nn

from mofa.errors import MofaInputError
from mofa.flow.ops import subsample_flow
from mofa.flow.softsplat import softsplat
from mofa.models.svd_blocks import embed_and_flatten, run_down_block

__all__ = ["RELEASED_ATTENTION_HEADS", "REFERENCE_STRIDES", "MofaAdapterModel", "MofaAdapterOutput"]

logger = logging.get_logger(__name__)

#: Image-pixel strides of the four reference-feature levels ``W0..W3``.
REFERENCE_STRIDES: tuple[int, ...] = (8, 16, 32, 64)

# Config fields the reference's FlowControlNet actually used (everything else in its config.json is ignored).
_REFERENCE_USED_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels")
_REFERENCE_CLASS_NAMES = ("FlowControlNet",)

#: Heads of the released adapter (the reference class default; the SVD UNet itself uses (5, 10, 20, 20)).
RELEASED_ATTENTION_HEADS: tuple[int, ...] = (5, 10, 10, 20)


def _zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@dataclass
class MofaAdapterOutput(BaseOutput):
    """Adapter residuals, all already multiplied by ``conditioning_scale``.

    Args:
        down_block_res_samples: 12 tensors ``[B·T, C_i, h_i, w_i]`` (one per UNet skip, in UNet order: ``conv_in``,
            then each down block's resnets and downsampler).
        mid_block_res_sample: ``[B·T, C_mid, h/8, w/8]`` (latent ``h``), added to the UNet mid-block output.
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class FlowConditioningEmbedding(nn.Module):
    """First frame ``[B, C_in, H, W]`` → ``[B, C_out, H/8, W/8]`` (for 4 channel stages).

    ``conv_in`` (3×3) + SiLU, then per stage a 3×3 conv and a stride-2 3×3 conv, each + SiLU, then a zero-initialised
    3×3 ``conv_out`` without activation. Key names match the reference's ``FlowControlNetConditioningEmbeddingSVD``.
    """

    def __init__(
        self, out_channels: int, in_channels: int = 3, block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([])
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = _zero_module(nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class _EncoderLayer(nn.Module):
    """One stride-2 3×3 conv + SiLU (a module of its own so the key is ``encoders.{i}.conv_in``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv_in(x))


class ReferenceFeatureEncoder(nn.Module):
    """Deeper reference features: ``e [B, C_in, h, w]`` → ``[z1 (h/2), z2 (h/4), z3 (h/8)]``.

    The conv chain continues from the pre-zeroconv feature; each output passes through its own zero-initialised
    1×1 conv (``zeroconvs.{i}``), so a fresh adapter sees zero deep reference features.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.encoders = nn.ModuleList([])
        self.zeroconvs = nn.ModuleList([])
        for c in channels:
            self.encoders.append(_EncoderLayer(in_channels, c))
            self.zeroconvs.append(_zero_module(nn.Conv2d(c, c, kernel_size=1)))
            in_channels = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for encoder, zeroconv in zip(self.encoders, self.zeroconvs, strict=True):
            x = encoder(x)
            features.append(zeroconv(x))
        return features


def _as_tuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _add_feature(x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """``x [B·T, C, h, w] + feature``, where ``feature`` is ``[B·T, …]`` or ``[T, …]`` (one reference for all B)."""
    if feature.shape[0] == x.shape[0]:
        return x + feature
    t = feature.shape[0]
    return (x.unflatten(0, (-1, t)) + feature.unsqueeze(0)).flatten(0, 1)


class MofaAdapterModel(ModelMixin, ConfigMixin):
    """MOFA-Adapter: SVD-encoder ControlNet whose stream receives forward-warped reference features.

    Defaults build the released trajectory adapter. Tiny configs (e.g. ``block_out_channels=(32, 64, 64, 64)``,
    ``num_attention_heads=(2, 4, 4, 4)``, ``cross_attention_dim=32``, ``addition_time_embed_dim=8``,
    ``projection_class_embeddings_input_dim=24``, ``conditioning_embedding_out_channels=(8, 16, 16, 32)``) give
    the same architecture with small numbers. The flow encoder's channels are ``block_out_channels[:3]`` (released:
    320, 640, 1280) because ``W1``/``W2``/``W3`` are added after down blocks 0/1/2 (and 3).

    Args:
        sample_size: informational (latent size), as in the SVD UNet config.
        in_channels: latent channels of ``sample`` (noisy latents + image latents = 8).
        down_block_types: four SVD down blocks.
        block_out_channels: channels of the four down blocks; ``block_out_channels[2] == block_out_channels[3]``.
        addition_time_embed_dim: sinusoidal size per added time id.
        projection_class_embeddings_input_dim: ``3 · addition_time_embed_dim``.
        layers_per_block: resnets per down block.
        cross_attention_dim: CLIP image-embedding size ``D``.
        transformer_layers_per_block: transformer layers per attention block.
        num_attention_heads: heads per down block (the last one also for the mid block); released ``(5, 10, 10, 20)``.
        num_frames: informational (frames the model was trained with).
        conditioning_channels: channels of the reference image (3).
        conditioning_embedding_out_channels: channel stages of the reference-image embedding (4 stages = stride 8).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 768,
        layers_per_block: int | tuple[int, ...] = 2,
        cross_attention_dim: int | tuple[int, ...] = 1024,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        num_attention_heads: int | tuple[int, ...] = RELEASED_ATTENTION_HEADS,
        num_frames: int = 25,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ):
        super().__init__()
        n_blocks = len(down_block_types)
        if n_blocks != len(REFERENCE_STRIDES) or len(block_out_channels) != n_blocks:
            raise ValueError(
                "the adapter needs 4 down blocks and 4 block_out_channels, "
                f"got {n_blocks} and {len(block_out_channels)}"
            )
        if block_out_channels[2] != block_out_channels[3]:
            raise ValueError(
                f"block_out_channels[2] must equal [3] (W3 is injected after both), got {block_out_channels}"
            )
        if len(conditioning_embedding_out_channels) != 4:
            raise ValueError(
                "conditioning_embedding_out_channels needs 4 stages (stride 8 = latent grid), "
                f"got {conditioning_embedding_out_channels}"
            )
        heads = _as_tuple(num_attention_heads, n_blocks)
        cross = _as_tuple(cross_attention_dim, n_blocks)
        layers = _as_tuple(layers_per_block, n_blocks)
        tlayers = _as_tuple(transformer_layers_per_block, n_blocks)

        c0 = block_out_channels[0]
        time_embed_dim = c0 * 4
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim)
        self.add_time_proj = Timesteps(addition_time_embed_dim, True, downscale_freq_shift=0)
        self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        # Registration order follows the reference, so state-dict key order equals the released checkpoint's.
        self.down_blocks = nn.ModuleList([])
        self.controlnet_down_blocks = nn.ModuleList([_zero_module(nn.Conv2d(c0, c0, kernel_size=1))])
        self.controlnet_cond_embedding = FlowConditioningEmbedding(
            c0, in_channels=conditioning_channels, block_out_channels=tuple(conditioning_embedding_out_channels)
        )
        output_channel = c0
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == n_blocks - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers[i],
                    transformer_layers_per_block=tlayers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final,
                    resnet_eps=1e-5,
                    cross_attention_dim=cross[i],
                    num_attention_heads=heads[i],
                    resnet_act_fn="silu",
                )
            )
            for _ in range(layers[i] + (0 if is_final else 1)):
                self.controlnet_down_blocks.append(
                    _zero_module(nn.Conv2d(output_channel, output_channel, kernel_size=1))
                )

        self.controlnet_mid_block = _zero_module(nn.Conv2d(block_out_channels[-1], block_out_channels[-1], 1))
        self.mid_block = UNetMidBlockSpatioTemporal(
            block_out_channels[-1],
            temb_channels=time_embed_dim,
            transformer_layers_per_block=tlayers[-1],
            cross_attention_dim=cross[-1],
            num_attention_heads=heads[-1],
        )
        self.flow_encoder = ReferenceFeatureEncoder(c0, tuple(block_out_channels[:3]))

    # ------------------------------------------------------------------ config compatibility
    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> tuple[dict, dict, dict]:
        """Read a reference ``FlowControlNet`` config.json the way the reference did (spec §4, §12.3).

        The reference class ignores every architecture field of its config (it always builds the released SVD
        encoder with ``num_attention_heads=(5, 10, 10, 20)``), while its saved config.json carries the UNet's values
        (e.g. heads ``(5, 10, 20, 20)``) and extra keys (``up_block_types``, ``out_channels``). For such a config
        only ``conditioning_channels`` / ``conditioning_embedding_out_channels`` are kept, so the released
        checkpoint builds the released architecture. Our own configs are used as written.
        """
        if config_dict.get("_class_name") in _REFERENCE_CLASS_NAMES:
            ignored = sorted(k for k in config_dict if not k.startswith("_") and k not in _REFERENCE_USED_KEYS)
            logger.info(f"reference FlowControlNet config: architecture fields {ignored} are informational, ignored")
            config_dict = {k: v for k, v in config_dict.items() if k in _REFERENCE_USED_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        num_attention_heads: int | tuple[int, ...] | None = None,
        load_weights_from_unet: bool = True,
        reference_mode: bool = False,
    ) -> MofaAdapterModel:
        """Build an adapter from an SVD ``UNetSpatioTemporalConditionModel`` (training start).

        Copies ``conv_in``, ``time_proj``, ``time_embedding``, ``down_blocks``, ``mid_block`` and ``add_embedding``
        from ``unet``; the conditioning embedding, flow encoder and zero convs are fresh (zero outputs).

        Args:
            unet: the SVD UNet (any size; its config gives the architecture).
            conditioning_channels: reference-image channels.
            conditioning_embedding_out_channels: reference-embedding stages.
            num_attention_heads: heads per down block; None = the UNet's (fixed behaviour) or, with
                ``reference_mode``, the class default ``(5, 10, 10, 20)`` the reference always used.
            load_weights_from_unet: copy the UNet weights (else random init).
            reference_mode: reproduce the reference's ``from_unet``: ``add_embedding`` is NOT copied (stays randomly
                initialised, spec §12.18) and the heads default to ``(5, 10, 10, 20)``.
        """
        cfg = unet.config
        if num_attention_heads is None:
            num_attention_heads = RELEASED_ATTENTION_HEADS if reference_mode else cfg.num_attention_heads
        model = cls(
            sample_size=cfg.sample_size,
            in_channels=cfg.in_channels,
            down_block_types=tuple(cfg.down_block_types),
            block_out_channels=tuple(cfg.block_out_channels),
            addition_time_embed_dim=cfg.addition_time_embed_dim,
            projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim,
            transformer_layers_per_block=cfg.transformer_layers_per_block,
            num_attention_heads=num_attention_heads,
            num_frames=cfg.num_frames,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )
        if load_weights_from_unet:
            names = ["conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"]
            if not reference_mode:
                names.append("add_embedding")
            for name in names:
                getattr(model, name).load_state_dict(getattr(unet, name).state_dict())
        if model.device != unet.device:
            model = model.to(unet.device)
        return model  # float32 parameters (training master weights) whatever the UNet's dtype

    # ------------------------------------------------------------------ reference features
    def encode_reference(
        self,
        controlnet_cond: torch.Tensor,
        controlnet_flow: torch.Tensor,
        num_frames: int | None = None,
    ) -> list[torch.Tensor]:
        """Warped reference-feature pyramid ``[W0, W1, W2, W3]`` (cacheable across denoising steps).

        Args:
            controlnet_cond: first frame ``[B, 3, H, W]`` in ``[-1, 1]``; ``H``, ``W`` multiples of 64.
            controlnet_flow: dense forward flow ``[B, T-1, 2, H, W]`` in image pixels (channel 0 = x), frame 0 → t.
            num_frames: ``T`` (optional check; it is ``controlnet_flow.shape[1] + 1``).

        Returns:
            4 tensors ``[B·T, C_k, H/s, W/s]`` for ``s = 8, 16, 32, 64`` (frame-major within each batch element),
            channels ``(C0, C0, C1, C2)`` of ``block_out_channels``. Frame 0 holds the unwarped feature; frames
            ``t ≥ 1`` the feature forward-warped (softsplat ``"avg"``, float32) by the flow subsampled to that level
            (nearest at stride ``s`` from index 0, divided by ``s``).
        """
        self._check_reference_inputs(controlnet_cond, controlnet_flow, num_frames)
        batch, n_flows = controlnet_flow.shape[:2]
        cond = controlnet_cond.to(dtype=self.controlnet_cond_embedding.conv_in.weight.dtype)
        embedding = self.controlnet_cond_embedding(cond)
        features = [embedding, *self.flow_encoder(embedding)]
        warped_levels = []
        for feature, stride in zip(features, REFERENCE_STRIDES, strict=True):
            _, channels, h, w = feature.shape
            if n_flows == 0:
                warped_levels.append(feature)
                continue
            flow = subsample_flow(controlnet_flow, stride)  # [B, T-1, 2, h, w]
            src = feature.unsqueeze(1).expand(batch, n_flows, channels, h, w).reshape(batch * n_flows, channels, h, w)
            warped = softsplat(src.float(), flow.reshape(batch * n_flows, 2, h, w).float(), mode="avg")
            warped = warped.to(feature.dtype).view(batch, n_flows, channels, h, w)
            warped_levels.append(torch.cat([feature.unsqueeze(1), warped], dim=1).flatten(0, 1))
        return warped_levels

    def _check_reference_inputs(self, cond: torch.Tensor, flow: torch.Tensor, num_frames: int | None) -> None:
        if cond.dim() != 4 or cond.shape[1] != self.config.conditioning_channels:
            raise MofaInputError(
                f"controlnet_cond must be [B, {self.config.conditioning_channels}, H, W], got {tuple(cond.shape)}"
            )
        height, width = cond.shape[-2:]
        if height % 64 or width % 64:
            raise MofaInputError(f"image size {height}x{width} (HxW) must be multiples of 64; resize or crop it")
        bad_layout = flow.dim() != 5 or flow.shape[2] != 2
        if bad_layout or flow.shape[-2:] != cond.shape[-2:] or flow.shape[0] != cond.shape[0]:
            raise MofaInputError(
                f"controlnet_flow must be [B, T-1, 2, H, W] = [{cond.shape[0]}, T-1, 2, {height}, {width}], "
                f"got {tuple(flow.shape)}"
            )
        if num_frames is not None and flow.shape[1] + 1 != num_frames:
            raise MofaInputError(f"controlnet_flow has {flow.shape[1]} flows but num_frames={num_frames} needs T-1")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        controlnet_cond: torch.Tensor | None = None,
        controlnet_flow: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        reference_features: list[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> MofaAdapterOutput | tuple:
        """Adapter residuals for one denoising step.

        Args:
            sample: ``[B, T, 8, h, w]`` = cat(scaled noisy latents, image latents); ``h = H/8``.
            timestep: scalar or ``[B]`` (the scheduler's conditioning timestep).
            encoder_hidden_states: CLIP image embeddings ``[B, 1, D]``.
            added_time_ids: ``[B, 3]`` (fps-1, motion bucket, noise aug).
            controlnet_cond: first frame ``[B, 3, H, W]`` in ``[-1, 1]`` (unused if ``reference_features`` is given).
            controlnet_flow: ``[B, T-1, 2, H, W]`` dense flow in image pixels (unused with ``reference_features``).
            conditioning_scale: multiplies every residual.
            reference_features: output of :meth:`encode_reference`, with batch ``B`` (``[B·T, …]``) or batch 1
                (``[T, …]``, broadcast to all ``B``, e.g. both CFG halves).
            return_dict: return :class:`MofaAdapterOutput` instead of a tuple.

        Returns:
            :class:`MofaAdapterOutput` (12 down residuals, mid residual; all ``[B·T, …]``) or
            ``(down_block_res_samples, mid_block_res_sample)``.
        """
        batch_size, num_frames = sample.shape[:2]
        if reference_features is None:
            if controlnet_cond is None or controlnet_flow is None:
                raise MofaInputError("pass controlnet_cond and controlnet_flow, or precomputed reference_features")
            reference_features = self.encode_reference(controlnet_cond, controlnet_flow, num_frames)
        self._check_reference_features(reference_features, batch_size, num_frames, sample.shape[-2:])

        # 1. time (as in the SVD UNet), frames folded into the batch
        sample, emb, encoder_hidden_states, image_only_indicator = embed_and_flatten(
            self, sample, timestep, encoder_hidden_states, added_time_ids
        )

        # 2. encoder stream with injected reference features (skips taken before each injection)
        w0, w1, w2, w3 = reference_features
        injections = (w1, w2, w3, w3)
        sample = _add_feature(self.conv_in(sample), w0)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block, feature in zip(self.down_blocks, injections, strict=True):
            sample, res = run_down_block(block, sample, emb, encoder_hidden_states, image_only_indicator)
            sample = _add_feature(sample, feature)
            skips += res
        sample = _add_feature(sample, w3)
        sample = self.mid_block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            image_only_indicator=image_only_indicator,
        )

        # 3. zero convs and scaling
        down = tuple(conv(s) * conditioning_scale for s, conv in zip(skips, self.controlnet_down_blocks, strict=True))
        mid = self.controlnet_mid_block(sample) * conditioning_scale
        if not return_dict:
            return (down, mid)
        return MofaAdapterOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    def _check_reference_features(
        self, features: list[torch.Tensor], batch_size: int, num_frames: int, latent_size: torch.Size
    ) -> None:
        if len(features) != len(REFERENCE_STRIDES):
            raise MofaInputError(f"reference_features must hold 4 levels, got {len(features)}")
        h, w = latent_size
        for level, (feature, stride) in enumerate(zip(features, REFERENCE_STRIDES, strict=True)):
            size = (h * 8 // stride, w * 8 // stride)
            if feature.shape[0] not in (num_frames, batch_size * num_frames) or tuple(feature.shape[-2:]) != size:
                raise MofaInputError(
                    f"reference_features[{level}] has shape {tuple(feature.shape)}; expected [B·T or T, C, "
                    f"{size[0]}, {size[1]}] for B={batch_size}, T={num_frames}, latents {h}x{w}"
                )
