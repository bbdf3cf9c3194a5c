"""MofaVideoPipeline: image + motion hints (or a dense flow) → video with a frozen SVD-XT and a MOFA-Adapter.

Behaviour follows diffusers' ``StableVideoDiffusionPipeline`` (same argument names and defaults where they exist) plus
the adapter conditioning of MOFA-Video (spec §7). ``reference_mode=True`` reproduces the original MOFA-Video Traj
pipeline's numerics (spec §7.1: hard-coded micro-conditioning ``[6, 128, 0.02]``, un-normalised CLIP input, uniform
window blend with the duplicated last window); the default fixes spec §12 items 4-7 and 14.

Differences from the reference that change speed/memory but not results:

- the adapter's reference features (first-frame encoding + forward warping, one pyramid per window) are computed
  ONCE per generation and reused for every step and both guidance halves (the reference recomputes them for every
  step on a doubled batch);
- the adapter's down residuals are released once the UNet's down pass has added them to its skips, before the up
  pass where a step's memory peaks (the reference holds them for the whole UNet call);
- the transformer feed-forwards run a few samples / frames at a time (``chunk_feed_forward``, chunks of at most
  64 MiB): their inner tensor is otherwise the largest activation of a denoising step;
- cross-attention to the single CLIP token is computed as that token's projected value (``shortcut_cross_attention``;
  a softmax over one key is exactly 1, so the per-token queries and the attention kernel are skipped);
- on a CPU the float32 linear layers run through oneDNN's matrix product with the bias fused in (``onednn_linear``)
  instead of MKL's ``addmm``: 1.14-1.26x faster steps here (AMD EPYC);
- ``low_memory=True`` runs the two classifier-free-guidance halves one after the other (batch 1 each) instead of as one
  batch of 2 (the default on a CPU, where it halves the working memory at the same step time); combine with
  ``enable_model_cpu_offload()`` on an accelerator;
- with glibc, freed host memory stays in the heap for reuse during the call (``retain_heap``): no page faults for
  each new large tensor; after a step that grew the heap its free pages go back to the OS, so it does not creep up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLTemporalDecoder, DiffusionPipeline, EulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import CLIPVisionModelWithProjection

from mofa.errors import MofaInputError
from mofa.pipelines import sampling
from mofa.pipelines.long_video import (
    Window,
    blend_weights,
    blend_windows,
    merge_duplicate_windows,
    plan_windows,
    window_frame_indices,
)
from mofa.pipelines.runtime import (
    channels_last_convs,
    chunked_feed_forward,
    onednn_linears,
    retained_heap,
    single_key_cross_attention,
    trim_retained_heap,
)

__all__ = ["MofaVideoPipeline", "MofaVideoPipelineOutput"]

DEFAULT_MOTION_BUCKET_ID = 128
"""Default ``motion_bucket_id``: 128 so that the default micro-conditioning equals the reference's hard-coded ids."""


@dataclass
class MofaVideoPipelineOutput(BaseOutput):
    """Output of :class:`MofaVideoPipeline`.

    Args:
        frames: ``output_type="pil"``: list (batch) of lists of T PIL images; ``"np"``: ``[B, T, H, W, 3]`` float in
            [0, 1]; ``"pt"``: ``[B, T, 3, H, W]`` float in [0, 1]; ``"latent"``: latents ``[B, T, 4, H/8, W/8]``.
            Frame 0 reconstructs the input image.
        flow: the dense conditioning flow ``[B, T-1, 2, H, W]`` float32, output pixels, frame 0 → frame t (CPU).
    """

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor
    flow: torch.Tensor


@dataclass
class _WindowCond:
    """Per-window conditioning computed once per generation."""

    view: Window
    index: torch.Tensor
    guidance: torch.Tensor  # [B, n, 1, 1, 1]
    flow: torch.Tensor  # [B, n-1, 2, H, W] (doubled under batched CFG when uncached)
    reference_features: list[torch.Tensor] | None  # cached warped pyramid (batch B, or 2B under batched CFG)


class MofaVideoPipeline(DiffusionPipeline):
    r"""Image animation with motion hints: SVD-XT + MOFA-Adapter (+ optional CMP sparse-to-dense network).

    Components:
        vae ([`AutoencoderKLTemporalDecoder`]), image_encoder ([`~transformers.CLIPVisionModelWithProjection`]),
        unet ([`~mofa.models.unet_injection.MofaUNetSpatioTemporalConditionModel`]), adapter
        ([`~mofa.models.adapter.MofaAdapterModel`]), scheduler ([`EulerDiscreteScheduler`]), feature_extractor
        (CLIP image processor; only its mean/std are read — optional), flow_model (``CMPModel`` or ``None`` → the
        weight-free classic sparse-to-dense densifier).

    Load the released weights with :meth:`from_released`; a folder written by ``save_pretrained`` loads with the
    usual ``MofaVideoPipeline.from_pretrained(dir)``.

    Example::

        >>> pipe = MofaVideoPipeline.from_released(
        ...     svd="stabilityai/stable-video-diffusion-img2vid-xt-1-1", adapter="MyNiuuu/MOFA-Video-Traj"
        ... )
        >>> hints = HintSet.from_json("tracks.json", image_size=(512, 512))
        >>> video = pipe(image, hints=hints, conditioning_scale=0.6, generator=torch.Generator().manual_seed(42))
    """

    model_cpu_offload_seq = "image_encoder->adapter->unet->vae"
    _optional_components = ["feature_extractor", "flow_model"]
    _exclude_from_cpu_offload = ["flow_model"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKLTemporalDecoder,
        image_encoder: CLIPVisionModelWithProjection,
        unet: torch.nn.Module,
        adapter: torch.nn.Module,
        scheduler: EulerDiscreteScheduler,
        feature_extractor: Any = None,
        flow_model: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            image_encoder=image_encoder,
            unet=unet,
            adapter=adapter,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            flow_model=flow_model,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(do_resize=True, vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_released(
        cls,
        svd: str | os.PathLike[str] = "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        adapter: str | os.PathLike[str] = "MyNiuuu/MOFA-Video-Traj",
        cmp: str | os.PathLike[str] | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: torch.device | str | None = None,
    ) -> MofaVideoPipeline:
        """Load SVD-XT 1.1 + the released MOFA-Adapter (+ CMP) from hub ids, released trees or plain folders.

        See :func:`mofa.io.weights.load_released_pipeline` for the accepted layouts (spec §10). Offline, a hub id
        that is not cached raises ``MofaInputError`` naming the files to place locally.
        """
        from mofa.io.weights import load_released_pipeline

        return load_released_pipeline(
            svd=svd,
            adapter=adapter,
            cmp=cmp,
            torch_dtype=torch_dtype,
            variant=variant,
            device=device,
            pipeline_cls=cls,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> MofaVideoPipeline:
        """Load a pipeline folder written by ``save_pretrained`` (``model_index.json`` + SVD components + ``adapter/``
        + optional ``flow_model/``); any other location (hub id, released tree, bare SVD folder) is treated as the
        ``svd`` argument of :meth:`from_released`, with ``adapter=`` / ``cmp=`` taken from ``kwargs``.

        Our own components are loaded by their classes directly (diffusers' generic loader cannot resolve classes
        that live in a sub-module of a third-party package).
        """
        from mofa.io.weights import is_pipeline_folder, load_pipeline_folder

        if not is_pipeline_folder(pretrained_model_name_or_path):
            released = {
                k: kwargs.pop(k) for k in ("adapter", "cmp", "torch_dtype", "variant", "device") if k in kwargs
            }
            if kwargs:
                raise TypeError(f"unexpected arguments for a released layout: {sorted(kwargs)}")
            return cls.from_released(svd=pretrained_model_name_or_path, **released)
        return load_pipeline_folder(pretrained_model_name_or_path, pipeline_cls=cls, **kwargs)

    # ------------------------------------------------------------------------------------------------ steps
    def check_inputs(
        self,
        image: Any,
        hints: Any,
        flow: torch.Tensor | None,
        height: int,
        width: int,
        num_frames: int,
        batch_size: int,
    ) -> None:
        """Validate sizes (multiples of 64), the frame count and the flow shape; raise ``MofaInputError`` otherwise."""
        if height % 64 or width % 64 or height <= 0 or width <= 0:
            raise MofaInputError(
                f"output size {width}x{height} must have both sides multiples of 64; prepare the image with "
                f"mofa.io.image.prepare_image (short side 512, centre crop to multiples of 64) or pass height/width"
            )
        if num_frames < 2:
            raise MofaInputError(f"num_frames={num_frames}: generate at least 2 frames (frame 0 is the input image)")
        if hints is not None and flow is not None:
            raise MofaInputError("pass either hints or a dense flow, not both")
        if hints is not None and batch_size != 1:
            raise MofaInputError(f"hints describe one image but {batch_size} images were given; pass a single image")
        if flow is not None:
            shape = tuple(flow.shape)
            if flow.ndim not in (4, 5) or shape[-3] != 2:
                raise MofaInputError(f"flow must be [T-1, 2, H, W] or [B, T-1, 2, H, W], got shape {shape}")
            if shape[-2:] != (height, width):
                raise MofaInputError(
                    f"flow is {shape[-1]}x{shape[-2]} but the video is {width}x{height}; resize it with "
                    f"mofa.flow.ops.resize_flow(flow, ({height}, {width}))"
                )
            if shape[-4] != num_frames - 1:
                raise MofaInputError(f"flow has {shape[-4]} steps but num_frames={num_frames} needs {num_frames - 1}")
            if flow.ndim == 5 and shape[0] not in (1, batch_size):
                raise MofaInputError(f"flow batch {shape[0]} does not match the {batch_size} input images")

    @staticmethod
    def _image_to_tensor(image: Any) -> torch.Tensor:
        """PIL / list of PIL / numpy ``[H,W,3]`` uint8 or float / tensor ``[3,H,W]`` or ``[B,3,H,W]`` in [0, 1]
        → float32 ``[B, 3, H, W]`` in [0, 1]."""
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list) and image and isinstance(image[0], PIL.Image.Image):
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in image]
            # Channels-last strides, exactly like diffusers' numpy_to_pt: convolutions then pick the same kernels as
            # StableVideoDiffusionPipeline and the outputs match it bit for bit.
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if isinstance(image, np.ndarray):
            arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise MofaInputError(f"numpy image must be [H, W, 3] or [B, H, W, 3], got shape {image.shape}")
            return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        if isinstance(image, torch.Tensor):
            tensor = image[None] if image.ndim == 3 else image
            if tensor.ndim != 4 or tensor.shape[1] != 3:
                raise MofaInputError(f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
            if not tensor.is_floating_point():
                tensor = tensor.float() / 255.0
            return tensor.float()
        raise MofaInputError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")

    def _encode_image(
        self, image: torch.Tensor, device: torch.device, cfg: bool, reference_mode: bool
    ) -> torch.Tensor:
        """CLIP image embedding ``[B, 1, D]`` (``[2B, 1, D]`` under CFG, zeros first) of ``[B, 3, H, W]`` in [0, 1]."""
        dtype = next(self.image_encoder.parameters()).dtype
        fe = self.feature_extractor
        mean = getattr(fe, "image_mean", None) or sampling.CLIP_MEAN
        std = getattr(fe, "image_std", None) or sampling.CLIP_STD
        pixels = sampling.clip_input(image.to(device), reference_mode=reference_mode, mean=mean, std=std)
        embeds = self.image_encoder(pixels.to(dtype)).image_embeds.unsqueeze(1)
        return torch.cat([torch.zeros_like(embeds), embeds]) if cfg else embeds

    def _encode_vae_image(
        self,
        image: torch.Tensor,
        noise_aug_strength: float,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
        cfg: bool,
    ) -> torch.Tensor:
        """Unscaled ``latent_dist.mode()`` of the noise-augmented image ``[B,3,H,W]`` in [-1,1] → ``[B', 4, h, w]``
        (zeros first under CFG), as SVD and the reference do."""
        noise = randn_tensor(image.shape, generator=generator, device=device, dtype=image.dtype)
        image = image + noise_aug_strength * noise
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        latents = self.vae.encode(image.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
        if upcast:
            self.vae.to(dtype=torch.float16)
        latents = latents.to(dtype)
        return torch.cat([torch.zeros_like(latents), latents]) if cfg else latents

    def prepare_flow(
        self,
        image: torch.Tensor,
        hints: Any,
        flow: torch.Tensor | None,
        height: int,
        width: int,
        num_frames: int,
        batch_size: int,
        reference_mode: bool,
    ) -> torch.Tensor:
        """Dense flow ``[B, T-1, 2, H, W]`` float32 in output pixels (frame 0 → frame t).

        Hints go through ``mofa.flow.densify.densify_hints`` with ``flow_model`` (CMP) or the classic densifier;
        a given flow is used as is; neither → zero flow (the adapter then only sees the unwarped first frame).
        """
        if flow is not None:
            dense = flow.float()
            dense = dense[None] if dense.ndim == 4 else dense
            return dense.expand(batch_size, *dense.shape[1:]).cpu()
        if hints is None:
            return torch.zeros(batch_size, num_frames - 1, 2, height, width)
        from mofa.flow.densify import densify_hints

        densifier = self.flow_model
        if densifier is None:
            from mofa.flow.classic import ClassicDensifier

            densifier = ClassicDensifier()
        model_device = next(densifier.parameters()).device if isinstance(densifier, torch.nn.Module) else "cpu"
        dense = densify_hints(
            image[0].to(model_device),
            hints,
            densifier=densifier,
            out_size=(height, width),
            reference_mode=reference_mode,
        )
        return dense.float().cpu()[None]

    def prepare_latents(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial latents ``[B, T, 4, h, w]`` = N(0, 1) (or the given ``latents``) × scheduler.init_noise_sigma."""
        if latents is None:
            latents = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != tuple(shape):
            raise MofaInputError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 8) -> torch.Tensor:
        """VAE temporal decoder in chunks of ``decode_chunk_size`` frames → float32 ``[B, 3, T, H, W]`` in [-1, 1]."""
        flat = latents.flatten(0, 1) / self.vae.config.scaling_factor
        chunks = []
        for i in range(0, flat.shape[0], decode_chunk_size):
            chunk = flat[i : i + decode_chunk_size]
            chunks.append(self.vae.decode(chunk.to(self.vae.dtype), num_frames=chunk.shape[0]).sample)
        frames = torch.cat(chunks)
        return frames.reshape(-1, num_frames, *frames.shape[1:]).permute(0, 2, 1, 3, 4).float()

    def _adapter_residuals(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        time_ids: torch.Tensor,
        cond_image: torch.Tensor,
        cond: _WindowCond,
        conditioning_scale: float,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The adapter's down residuals (a fresh list, see ``release_residuals``) and mid residual."""
        reps = sample.shape[0] // cond_image.shape[0]
        if cond.reference_features is not None:  # cached pyramid, already at the sample's batch size
            out = self.adapter(
                sample,
                t,
                encoder_hidden_states=embeds,
                added_time_ids=time_ids,
                conditioning_scale=conditioning_scale,
                reference_features=cond.reference_features,
                return_dict=True,
            )
        else:  # uncached: the adapter encodes and warps the first frame again (the reference's way)
            out = self.adapter(
                sample,
                t,
                encoder_hidden_states=embeds,
                added_time_ids=time_ids,
                controlnet_cond=cond_image.repeat(reps, 1, 1, 1),
                controlnet_flow=cond.flow.repeat(reps, 1, 1, 1, 1),
                conditioning_scale=conditioning_scale,
                return_dict=True,
            )
        return list(out.down_block_res_samples), out.mid_block_res_sample

    def _denoise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        image_latents: torch.Tensor,
        embeds: torch.Tensor,
        time_ids: torch.Tensor,
        cond_image: torch.Tensor,
        cond: _WindowCond,
        conditioning_scale: float,
        cfg: bool,
        low_memory: bool,
    ) -> torch.Tensor:
        """Guided model output (v-prediction) ``[B, n, 4, h, w]`` for one window's latents ``[B, n, 4, h, w]``."""
        n = latents.shape[1]

        def run(lat: torch.Tensor, img_lat: torch.Tensor, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            x = torch.cat(
                [self.scheduler.scale_model_input(lat, t), img_lat.unsqueeze(1).expand(-1, n, -1, -1, -1)], 2
            )
            down, mid = self._adapter_residuals(x, t, emb, ids, cond_image, cond, conditioning_scale)
            return self.unet(
                x,
                t,
                encoder_hidden_states=emb,
                added_time_ids=ids,
                down_block_additional_residuals=down,  # a list the UNet empties after its down pass: freed early
                mid_block_additional_residual=mid,
                residual_mode="accumulate",
                return_dict=False,
                release_residuals=True,
            )[0]

        if not cfg:
            return run(latents, image_latents, embeds, time_ids)
        if low_memory:
            b = latents.shape[0]
            uncond = run(latents, image_latents[:b], embeds[:b], time_ids[:b])
            cond_pred = run(latents, image_latents[b:], embeds[b:], time_ids[b:])
        else:
            both = run(torch.cat([latents, latents]), image_latents, embeds, time_ids)
            uncond, cond_pred = both.chunk(2)
        return sampling.combine_guidance(uncond, cond_pred, cond.guidance)

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor,
        hints: Any = None,
        flow: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = DEFAULT_MOTION_BUCKET_ID,
        noise_aug_strength: float = 0.02,
        conditioning_scale: float = 1.0,
        decode_chunk_size: int | None = 8,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        reference_mode: bool = False,
        low_memory: bool | None = None,
        window_size: int | None = None,
        window_stride: int | None = None,
        window_blend: str | None = None,
        cache_reference: bool = True,
        channels_last: bool = False,
        chunk_feed_forward: bool = True,
        shortcut_cross_attention: bool = True,
        retain_heap: bool = True,
        onednn_linear: bool | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ) -> MofaVideoPipelineOutput | tuple[Any, torch.Tensor]:
        r"""Animate ``image`` following ``hints`` (or a dense ``flow``).

        Args:
            image: the first frame: PIL image, ``[H, W, 3]`` array or ``[3, H, W]`` / ``[B, 3, H, W]`` tensor in
                [0, 1]. Sides must be multiples of 64 unless ``height``/``width`` are given (then it is resized for the
                VAE/adapter like diffusers' SVD does; CLIP always sees the original).
            hints: a ``HintSet`` in input-image pixels; densified with ``flow_model`` (CMP) or the classic
                densifier. ``hints.num_frames`` is the default frame count.
            flow: instead of hints, a dense flow ``[T-1, 2, H, W]`` / ``[B, T-1, 2, H, W]`` in output pixels.
            height, width: output size (default: the image size). Multiples of 64.
            num_frames: T including frame 0 (default: from hints/flow, else ``unet.config.num_frames``). More than
                ``window_size`` frames are generated with frame-0-anchored sliding windows (spec §7.4).
            num_inference_steps, min_guidance_scale, max_guidance_scale, fps, noise_aug_strength, decode_chunk_size,
                generator, latents, output_type, return_dict: as in diffusers' ``StableVideoDiffusionPipeline``
                (the guidance ramp runs over the frames of one window).
            motion_bucket_id: SVD's motion bucket; default **128** (not diffusers' 127) so that the default
                micro-conditioning ``[fps - 1, motion_bucket_id, noise_aug_strength] = [6, 128, 0.02]`` equals the
                values the reference hard-codes and the released adapter was used with.
            conditioning_scale: multiplier of the adapter residuals. Default 1.0 (the reference pipeline's default
                and the Keypoint app's value); the reference Traj UI defaults to 0.6, which the ``mofa animate`` CLI
                uses.
            reference_mode: reproduce the original pipeline's numerics (spec §7): time ids fixed to [6, 128, 0.02],
                un-normalised CLIP input, the reference's uniform window blend including its duplicated last window.
            low_memory: run the two guidance halves sequentially (batch 1 each) instead of as one batch of 2. Same
                output. ``None`` (default): sequentially on a CPU, where it needs about half the working memory
                (256x256 × 14 frames: 0.68 vs 1.48 GiB with ``retain_heap``) at the same step time (89.8 vs 88.9 s;
                at 128x128 the batch was ~7% faster; docs/benchmarks.md); as one batch on accelerators. ``True``
                (asked for) also empties the retained heap after every step (``retain_heap``), so no step builds on
                the previous one's fragments: the lowest peak, at a few percent of speed on a CPU.
            window_size, window_stride: sliding-window length (default ``unet.config.num_frames``) and stride
                (default ``window_size // 2``).
            window_blend: ``"ramp"`` (default; triangular cross-fade of overlapping windows) or ``"uniform"`` (the
                reference's plain average; forced by ``reference_mode``).
            cache_reference: compute the adapter's warped reference features once (default). ``False`` recomputes
                them every step like the reference (same output, slower; for benchmarks/tests).
            channels_last: run the UNet's, adapter's and VAE's 2-D convolutions on channels-last inputs (opt-in: may
                be faster with oneDNN or cuDNN; same output up to float32 summation order; see pipelines/runtime.py).
            chunk_feed_forward: run the UNet's and adapter's transformer feed-forwards on a few samples / frames at a
                time, chunks of at most 64 MiB (default): their inner tensor is the largest activation of a step
                (2.1 GB at 512x512 × 25 frames under guidance); with glibc's default allocator they were also 1.12x
                faster on a CPU, with ``retain_heap`` the same speed. Same output up to float32 summation order;
                ``False`` = diffusers' default.
            shortcut_cross_attention: compute the UNet's and adapter's cross-attention to the one CLIP token as
                ``to_out(to_v(token))`` for every query (default; exact, since a softmax over one key is 1). Same
                output up to float32 summation order; ``False`` runs the full attention like the reference.
            retain_heap: with glibc (Linux), keep freed host memory in the heap for reuse during the call instead of
                unmapping it and faulting it in again for the next large tensor (default; a CPU step at 128x128 × 14
                frames ran 1.21x faster, the reference's settings at 256x256 1.23x); the free pages are handed back
                after a step that grew the heap and when the call ends. Changes allocator settings process-wide while
                the call runs; no-op elsewhere. See pipelines/runtime.py.
            onednn_linear: run the float32 linear layers of the UNet, adapter, VAE and image encoder through oneDNN's
                matrix product with the bias fused in instead of MKL's ``addmm``. ``None`` (default): on a CPU, where
                a 128x128 × 14-frame step ran 1.14-1.26x faster (pipelines/runtime.py); ``False`` = torch's default.
                Same output up to float32 summation order.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> dict`` after every step; a returned
                ``"latents"`` replaces the latents.

        Returns:
            :class:`MofaVideoPipelineOutput` (or the tuple ``(frames, flow)`` when ``return_dict=False``).
        """
        image01 = self._image_to_tensor(image)
        batch_size = image01.shape[0]
        height = height or image01.shape[-2]
        width = width or image01.shape[-1]
        if hints is not None and num_frames is not None and getattr(hints, "num_frames", num_frames) != num_frames:
            hints = dataclasses.replace(hints, num_frames=num_frames)
        if num_frames is None:
            if flow is not None:
                num_frames = flow.shape[-4] + 1
            elif hints is not None:
                num_frames = int(hints.num_frames)
            else:
                num_frames = int(self.unet.config.num_frames)
        self.check_inputs(image, hints, flow, height, width, num_frames, batch_size)
        window_size = window_size or int(self.unet.config.num_frames)
        window_stride = window_stride or max(window_size // 2, 1)
        blend = "uniform" if reference_mode else (window_blend or "ramp")
        decode_chunk_size = decode_chunk_size or num_frames
        device = self._execution_device
        cfg = sampling.do_cfg(max_guidance_scale)
        trim_every_step = low_memory is True  # asked for: the retained heap is also emptied after every step
        if low_memory is None:
            low_memory = device.type == "cpu"

        with (
            retained_heap(enabled=retain_heap),
            channels_last_convs((self.unet, self.adapter, self.vae), enabled=channels_last),
            chunked_feed_forward((self.unet, self.adapter), enabled=chunk_feed_forward),
            single_key_cross_attention((self.unet, self.adapter), enabled=shortcut_cross_attention),
            onednn_linears(
                (self.unet, self.adapter, self.vae, self.image_encoder),
                enabled=device.type == "cpu" if onednn_linear is None else onednn_linear,
            ),
        ):
            # 1. conditioning: CLIP embedding, dense flow, noise-augmented image latents, micro-conditioning
            embeds = self._encode_image(image01, device, cfg, reference_mode)
            dtype = embeds.dtype
            dense_flow = self.prepare_flow(
                image01, hints, flow, height, width, num_frames, batch_size, reference_mode
            )  # [B, T-1, 2, H, W] float32 CPU
            vae_image = self.video_processor.preprocess(image01, height=height, width=width).to(device)  # [-1, 1]
            image_latents = self._encode_vae_image(vae_image, noise_aug_strength, generator, device, dtype, cfg)
            time_ids = sampling.svd_time_ids(
                fps, motion_bucket_id, noise_aug_strength, batch_size, cfg, reference_mode, dtype=dtype, device=device
            )
            # controlnet_cond: the un-augmented first frame in [-1, 1]
            cond_image = vae_image.to(self.adapter.dtype).contiguous()

            # 2. timesteps and initial noise
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            scale = self.vae_scale_factor
            latent_shape = (batch_size, num_frames, self.vae.config.latent_channels, height // scale, width // scale)
            latents = self.prepare_latents(latent_shape, dtype, device, generator, latents)

            # 3. windows (one for T <= window_size) with their cached conditioning
            views = plan_windows(num_frames, window_size, window_stride, dedupe=not reference_mode)
            views, weights = merge_duplicate_windows(views, blend_weights(views, num_frames, blend))
            conds = [
                self._prepare_window(
                    view, dense_flow, cond_image, min_guidance_scale, max_guidance_scale, cache_reference
                )
                for view in views
            ]
            if cache_reference and cfg and not low_memory and batch_size > 1:
                # both guidance halves share the reference features: B = 1 broadcasts in the adapter, else double
                for c in conds:
                    c.reference_features = [torch.cat([f, f]) for f in c.reference_features or []]

            # 4. denoising loop
            self._num_timesteps = len(timesteps)
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    preds = [
                        self._denoise(
                            latents[:, c.index.to(device)],
                            t,
                            image_latents,
                            embeds,
                            time_ids,
                            cond_image,
                            c,
                            conditioning_scale,
                            cfg,
                            low_memory,
                        )
                        for c in conds
                    ]
                    noise_pred = preds[0] if len(conds) == 1 else blend_windows(preds, views, weights, num_frames)
                    latents = self.scheduler.step(noise_pred, t, latents).prev_sample
                    if callback_on_step_end is not None:
                        local = {"latents": latents}
                        outputs = callback_on_step_end(
                            self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                        )
                        latents = (outputs or {}).get("latents", latents)
                    trim_retained_heap(always=trim_every_step)
                    progress_bar.update()

            # 5. decode
            if output_type == "latent":
                frames: Any = latents
            else:
                video = self.decode_latents(latents, num_frames, decode_chunk_size)
                frames = self.video_processor.postprocess_video(video=video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, dense_flow
        return MofaVideoPipelineOutput(frames=frames, flow=dense_flow)

    def _prepare_window(
        self,
        view: Window,
        dense_flow: torch.Tensor,
        cond_image: torch.Tensor,
        min_guidance_scale: float,
        max_guidance_scale: float,
        cache_reference: bool,
    ) -> _WindowCond:
        """Frame indices, guidance ramp, flow slice and (when cached) the adapter's warped reference pyramid."""
        start, end = view
        index = torch.tensor(window_frame_indices(view))
        n = len(index)
        device = cond_image.device
        flow = dense_flow[:, start - 1 : end - 1].to(device=device, dtype=cond_image.dtype)
        guidance = sampling.guidance_ramp(
            min_guidance_scale, max_guidance_scale, n, dense_flow.shape[0], dtype=self.unet.dtype, device=device
        )
        features = None
        if cache_reference:
            hook = getattr(self.adapter, "_hf_hook", None)
            if hook is not None:  # model CPU offload: encode_reference is not forward, so load the weights by hand
                hook.pre_forward(self.adapter)
            features = list(self.adapter.encode_reference(cond_image, flow, num_frames=n))
        return _WindowCond(view=view, index=index, guidance=guidance, flow=flow, reference_features=features)
