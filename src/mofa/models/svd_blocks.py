"""Pieces of the SVD UNet encoder's forward shared by the adapter and the residual-injecting UNet.

A leaf module of plain functions (not a model): both ``MofaAdapterModel`` and
``MofaUNetSpatioTemporalConditionModel`` carry the SVD encoder's modules under the same names (``time_proj``,
``time_embedding``, ``add_time_proj``, ``add_embedding``, ``down_blocks``), so they embed time and call down blocks
the same way. Keeping that here lets the two models stay independent of each other.
"""

from __future__ import annotations

import torch
from torch import nn


def embed_and_flatten(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    added_time_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD time conditioning, then the frame axis folded into the batch.

    Args:
        model: has ``time_proj``, ``time_embedding``, ``add_time_proj`` and ``add_embedding`` as in the SVD UNet.
        sample: ``[B, T, C, h, w]`` latents (latent grid).
        timestep: scalar or ``[B]`` / ``[]`` tensor (SVD: ``0.25·ln σ``).
        encoder_hidden_states: ``[B, 1, D]`` CLIP image embeddings.
        added_time_ids: ``[B, 3]`` (fps − 1, motion bucket, noise augmentation).

    Returns:
        ``(sample [B·T, C, h, w], emb [B·T, E], encoder_hidden_states [B·T, 1, D], image_only_indicator [B, T])``.
    """
    batch_size, num_frames = sample.shape[:2]
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if sample.device.type == "mps":  # mps has no 64-bit types
            dtype = torch.float32 if dtype == torch.float64 else torch.int32
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(batch_size)
    emb = model.time_embedding(model.time_proj(timesteps).to(dtype=sample.dtype))
    time_embeds = model.add_time_proj(added_time_ids.flatten()).reshape((batch_size, -1)).to(emb.dtype)
    emb = emb + model.add_embedding(time_embeds)

    flat = sample.flatten(0, 1)
    emb = emb.repeat_interleave(num_frames, dim=0)
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
    image_only_indicator = torch.zeros(batch_size, num_frames, dtype=flat.dtype, device=flat.device)
    return flat, emb, encoder_hidden_states, image_only_indicator


def run_down_block(
    block: nn.Module,
    sample: torch.Tensor,
    emb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    image_only_indicator: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One SVD down block on ``[B·T, C, h, w]``; returns ``(output, skip tensors)``.

    Cross-attention blocks also take the CLIP context; plain resnet blocks do not accept it.
    """
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            image_only_indicator=image_only_indicator,
        )
    return block(hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator)
