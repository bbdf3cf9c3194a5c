"""CMP: the sparse-to-dense flow network of MOFA-Video (Conditional Motion Propagation, Zhan et al. CVPR 2019).

Architecture of the released checkpoint ``resnet50_vip+mpii_liteflow/ckpt_iter_42000.pth.tar`` (spec §3), with module
names such that ``CMPModel().state_dict()`` has exactly the checkpoint's keys minus the ``module.`` prefix:

- ``image_encoder``: ResNet-50 (torchvision "v1.5" layout, stride in ``conv2``) dilated to output stride 8 (layer3
  dilation 2, layer4 dilation 4) and a 1×1 ``conv5`` 2048 → 256. Returns the 1/8 features and the skips
  ``conv1`` (64 ch, 1/2) and ``layer1`` (256 ch, 1/4).
- ``flow_encoder``: "shallownet8x" on ``[flow_x, flow_y, mask, mask]`` → 16 ch at 1/8.
- ``flow_decoder``: "MotionDecoderSkipLayer": four pooled branches (1, 2, 4, 8) fused at 1/8, skip fusion at 1/4 and
  1/2, 1×1 head → ``2 * nbins`` logits at 1/2.
- 99-bin decoding: softmax per axis, expectation over bin centres ``i * 100/99 - 50 + 50/99`` (pixels of the input
  grid), then bilinear (``align_corners=True``) upsampling to the input size. Output is bounded by ±49.495 px.

Efficiency (a deviation in *how* it is computed, not in what): the reference runs the whole network once per frame
although all frames share one image. :meth:`CMPModel.encode_image` runs everything that depends only on the image
once (the ResNet, the two skip convolutions and the image part of every convolution whose input concatenates image
and flow features — a convolution of a concatenation is the sum of the convolutions of its parts), and
:meth:`CMPModel.decode` runs only the per-frame rest. Both fold each eval-mode BatchNorm into the convolution before
it, and the decoder's fusion convolutions of bilinearly resized inputs (fusion8 on the pooled branches, fusion4,
fusion2) mix channels at the source resolution and resize afterwards (:class:`ResizedConv3x3`), which removes over
half of the per-frame multiply-adds. All of this is exact up to float round-off. :meth:`CMPModel.forward` is the plain
network, kept for parity tests.

:meth:`encode_image` / :meth:`decode` / :meth:`densify` are inference only (BatchNorm with running statistics, as the
reference runs it); the model is constructed in eval mode. Train with :meth:`forward`.

The image is normalised as ``image * 2 - 1`` only (MOFA-Video's call; the training config's ImageNet mean/std are not
used at inference). The network is fully convolutional; it was trained on 384×384 crops, which is what
:meth:`CMPModel.preferred_grid` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mofa.errors import MofaInputError
from mofa.models.resized_conv import ResizedConv3x3

__all__ = ["CMPModel", "CMPImageFeatures", "CMPDensifier", "bin_centers", "decode_flow_bins"]

CMP_TRAINED_GRID: tuple[int, int] = (384, 384)
"""Crop size the released CMP was trained on (height, width)."""

_DECODER_WIDTH = 128  # channels of every decoder branch (fixed in the released architecture)


# ---------------------------------------------------------------------------------------------------------------------
# Bin decoding (the reference's ``Fuser``)
# ---------------------------------------------------------------------------------------------------------------------


def bin_centers(nbins: int = 99, fmax: float = 50.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of the flow classification bins ``[nbins]``: ``i * 2*fmax/nbins - fmax + fmax/nbins`` (pixels)."""
    step = 2.0 * fmax / nbins
    return torch.arange(nbins, device=device, dtype=torch.float64).mul(step).add(-fmax + step / 2).to(dtype)


def decode_flow_bins(logits: torch.Tensor, nbins: int = 99, fmax: float = 50.0) -> torch.Tensor:
    """Expected flow from per-axis bin logits.

    Args:
        logits: ``[N, 2*nbins, h, w]``; channels ``[0, nbins)`` classify x, ``[nbins, 2*nbins)`` classify y.
        nbins, fmax: bin count and range (released CMP: 99 bins over ±50 px).

    Returns:
        ``[N, 2, h, w]`` flow in pixels of the network's *input* grid (not of the logit grid):
        ``sum_i softmax(logits_axis)_i * bin_centers[i]``. Computed in float32 (float64 for float64 logits).
    """
    if logits.shape[1] != 2 * nbins:
        raise ValueError(f"expected {2 * nbins} logit channels for nbins={nbins}, got shape {tuple(logits.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    centers = bin_centers(nbins, fmax, device=logits.device, dtype=dtype).view(1, nbins, 1, 1)
    logits = logits.to(dtype)
    fx = (torch.softmax(logits[:, :nbins], dim=1) * centers).sum(dim=1, keepdim=True)
    fy = (torch.softmax(logits[:, nbins:], dim=1) * centers).sum(dim=1, keepdim=True)
    return torch.cat([fx, fy], dim=1)


def _bin_head(head: nn.Conv2d, nbins: int, fmax: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The 1×1 head and the bin centres laid out for :func:`_expected_flow` (each axis padded to a multiple of 8 bins).

    Padding bins get a zero weight, a ``-inf`` bias (softmax weight exactly 0) and a zero centre. The padding is for
    speed only: a ``[P, 64] @ [64, 198]`` product runs at a third of the speed of ``[64, 208]`` on CPU BLAS.
    """
    width = nbins + (-nbins) % 8
    channels = head.in_channels
    weight = head.weight.new_zeros((2, width, channels), dtype=dtype)
    weight[:, :nbins] = head.weight.reshape(2, nbins, channels).to(dtype)
    bias = head.weight.new_full((2, width), float("-inf"), dtype=dtype)
    bias[:, :nbins] = head.bias.reshape(2, nbins).to(dtype)
    centers = head.weight.new_zeros(width, dtype=dtype)
    centers[:nbins] = bin_centers(nbins, fmax, device=head.weight.device, dtype=dtype)
    return weight.reshape(2 * width, channels).t().contiguous(), bias, centers


def _expected_flow(
    features: torch.Tensor,
    head: tuple[torch.Tensor, ...],
    buffer: torch.Tensor,
    return_logits: bool = False,
    nbins: int = 0,
) -> torch.Tensor:
    """``decode_flow_bins(head(features))`` for channels-last features ``[P, 64]`` → ``[P, 2]`` (x, y).

    Same maths as :func:`decode_flow_bins` (softmax expectation over the bin centres, float32 or wider) with the
    bins contiguous: ``e = exp(logits - max)``, flow = ``sum(e * c) / sum(e)``. With ``return_logits``: the
    ``[P, 2, nbins]`` logits instead. ``buffer`` (``[P, 2 * padded bins]``) receives the logits and is overwritten.
    """
    weight_t, bias, centers = head
    logits = torch.mm(features.to(weight_t.dtype), weight_t, out=buffer).view(features.shape[0], 2, -1).add_(bias)
    if return_logits:
        return logits[..., :nbins].clone()
    weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return torch.matmul(weights, centers).div_(weights.sum(dim=-1))


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (names mirror the checkpoint)
# ---------------------------------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _DilatedResNet50(nn.Module):
    """ResNet-50 with output stride 8: layer2 strides, layer3/4 dilate (2, 4) instead. No fc."""

    def __init__(self, layers: tuple[int, ...], out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        # (planes, stride, dilation) per stage; the first block of layer3/layer4 keeps stride 1 (also in downsample.0).
        stage_specs = zip((64, 128, 256, 512), layers, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)
        for planes, blocks, stride, dilation in stage_specs:
            downsample = None
            if stride != 1 or inplanes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
                )
            blocks_list = [_Bottleneck(inplanes, planes, stride, dilation, downsample)]
            inplanes = planes * 4
            blocks_list += [_Bottleneck(inplanes, planes, 1, dilation, None) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*blocks_list))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.conv5 = nn.Conv2d(2048, out_dim, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image [B,3,H,W]`` in [-1, 1] → (out ``[B,out_dim,H/8,W/8]``, conv1 ``[B,64,H/2,W/2]``,
        layer1 ``[B,256,H/4,W/4]``)."""
        conv1 = self.relu(self.bn1(self.conv1(image)))
        layer1 = self.layer1(self.maxpool(conv1))
        out = self.conv5(self.layer4(self.layer3(self.layer2(layer1))))
        return out, conv1, layer1


class _ShallowNet8x(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 16, 5, stride=2, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, out_dim, 3, padding=1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
        )

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.features(sparse)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _MotionDecoderSkipLayer(nn.Module):
    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        w = _DECODER_WIDTH

        def branch(pool: int) -> nn.Sequential:
            pre = [] if pool == 1 else [nn.MaxPool2d(pool, pool)]
            return nn.Sequential(*pre, *_conv_bn_relu(input_dim, w), *_conv_bn_relu(w, w), *_conv_bn_relu(w, w))

        self.decoder1, self.decoder2, self.decoder4, self.decoder8 = (branch(p) for p in (1, 2, 4, 8))
        self.fusion8 = nn.Sequential(*_conv_bn_relu(4 * w, 256))
        self.skipconv4 = nn.Sequential(*_conv_bn_relu(256, 128))
        self.fusion4 = nn.Sequential(*_conv_bn_relu(256 + 128, 128))
        self.skipconv2 = nn.Sequential(*_conv_bn_relu(64, 32))
        self.fusion2 = nn.Sequential(*_conv_bn_relu(128 + 32, 64))
        self.head = nn.Conv2d(64, output_dim, 1)

    def branches(self) -> tuple[nn.Sequential, ...]:
        return self.decoder1, self.decoder2, self.decoder4, self.decoder8

    def forward(self, x: torch.Tensor, conv1: torch.Tensor, layer1: torch.Tensor) -> torch.Tensor:
        """The reference decoder: ``x [N,272,h/8,w/8]`` + skips → logits ``[N, output_dim, h/2, w/2]``."""
        x1 = self.decoder1(x)
        size = x1.shape[-2:]
        parts = [x1] + [_up(branch(x), size) for branch in self.branches()[1:]]
        f8 = self.fusion8(torch.cat(parts, dim=1))
        f4 = self.fusion4(torch.cat([_up(f8, layer1.shape[-2:]), self.skipconv4(layer1)], dim=1))
        f2 = self.fusion2(torch.cat([_up(f4, conv1.shape[-2:]), self.skipconv2(conv1)], dim=1))
        return self.head(f2)


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval-mode BatchNorm is a per-channel affine map)."""
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = bn.weight.to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    bias = bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale
    if conv.bias is not None:
        bias = bias + conv.bias.to(dtype) * scale
    weight = conv.weight.to(dtype) * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


@dataclass
class _FoldedDecoder:
    """The decoder's conv + BatchNorm pairs folded into single convolutions (inference only)."""

    branches: tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...]  # per branch: 3 × (weight, bias)
    fusion8: tuple[torch.Tensor, torch.Tensor]
    fusion4: tuple[torch.Tensor, torch.Tensor]
    fusion2: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def from_decoder(cls, dec: _MotionDecoderSkipLayer) -> _FoldedDecoder:
        def pair(seq: nn.Sequential, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
            return _fold_bn(seq[i], seq[i + 1])

        # branch[-9:] = conv, bn, relu ×3 (after the optional max pool)
        branches = tuple(tuple(pair(branch[-9:], i) for i in (0, 3, 6)) for branch in dec.branches())
        return cls(branches, pair(dec.fusion8), pair(dec.fusion4), pair(dec.fusion2))


# ---------------------------------------------------------------------------------------------------------------------
# Public model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CMPImageFeatures:
    """Everything the CMP computes from the image alone; pass it to :meth:`CMPModel.decode` for any number of frames.

    The ``*_term`` tensors are the image halves of the decoder convolutions whose input concatenates image and flow
    features, with the following BatchNorm folded in (inference only). Layouts are what :meth:`CMPModel.decode`
    consumes.

    Attributes:
        out: ``[B, img_enc_dim, h/8, w/8]`` ResNet + conv5 features (B = 1 or N).
        conv1: ``[B, 64, h/2, w/2]`` skip after the stem ReLU.
        layer1: ``[B, 256, h/4, w/4]`` skip after layer1.
        branch_terms: per decoder branch (pool 1, 2, 4, 8), ``[B, 128, h/8/p, w/8/p]`` (channels-last memory).
        fusion4_term: ``[B, w/4, h/4, 128]`` (x, y, channels) image half of fusion4: from ``skipconv4(layer1)``.
        fusion2_term: ``[B, h/2, w/2, 64]`` (y, x, channels) image half of fusion2: from ``skipconv2(conv1)``.
        image_size: (h, w) of the input grid.
    """

    out: torch.Tensor
    conv1: torch.Tensor
    layer1: torch.Tensor
    branch_terms: tuple[torch.Tensor, ...]
    fusion4_term: torch.Tensor
    fusion2_term: torch.Tensor
    image_size: tuple[int, int]


class CMPModel(ModelMixin, ConfigMixin):
    """Sparse-to-dense flow network compatible with the released MOFA-Video CMP checkpoint (spec §3).

    Args:
        layers: bottleneck blocks per ResNet stage (released: ``(3, 4, 6, 3)``; smaller only for tiny test models).
        img_enc_dim: channels of the image encoder output (``conv5``).
        sparse_enc_dim: channels of the sparse-flow encoder output.
        nbins: flow classification bins per axis.
        fmax: half range of the bins in pixels of the input grid.

    Example:
        >>> model = CMPModel().eval()                                   # or mofa.io.weights.load_cmp_checkpoint(path)
        >>> image = torch.rand(3, 384, 384)
        >>> flow, mask = torch.zeros(24, 2, 384, 384), torch.zeros(24, 1, 384, 384)
        >>> dense = model.densify(image, flow, mask)                    # [24, 2, 384, 384], ResNet run once
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        img_enc_dim: int = 256,
        sparse_enc_dim: int = 16,
        nbins: int = 99,
        fmax: float = 50.0,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        self.image_encoder = _DilatedResNet50(tuple(layers), img_enc_dim)
        self.flow_encoder = _ShallowNet8x(sparse_enc_dim)
        self.flow_decoder = _MotionDecoderSkipLayer(img_enc_dim + sparse_enc_dim, 2 * nbins)
        self.eval()

    # -- helpers -----------------------------------------------------------------------------------------------------

    @property
    def _param_dtype(self) -> torch.dtype:
        return self.image_encoder.conv1.weight.dtype

    def preferred_grid(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The grid the released weights were trained on, whatever the image size: ``(384, 384)``."""
        return CMP_TRAINED_GRID

    @staticmethod
    def _check_size(height: int, width: int) -> None:
        if height % 8 or width % 8 or height < 64 or width < 64:
            raise MofaInputError(
                f"CMP input {height}x{width} must be multiples of 8 and at least 64x64 "
                f"(the released CMP was trained on 384x384: resize to the S2D grid first)"
            )

    @staticmethod
    def _check_sparse(sparse: torch.Tensor, mask: torch.Tensor) -> None:
        if sparse.ndim != 4 or sparse.shape[1] != 2:
            raise MofaInputError(f"sparse flow must be [N,2,h,w], got shape {tuple(sparse.shape)}")
        if mask.ndim != 4 or mask.shape[1] not in (1, 2) or mask.shape[0] != sparse.shape[0]:
            raise MofaInputError(
                f"mask must be [N,1,h,w] or [N,2,h,w] with N={sparse.shape[0]}, got {tuple(mask.shape)}"
            )
        if mask.shape[-2:] != sparse.shape[-2:]:
            raise MofaInputError(f"mask {tuple(mask.shape)} and sparse flow {tuple(sparse.shape)} differ in size")

    def _sparse_input(self, sparse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_sparse(sparse, mask)
        if mask.shape[1] == 1:
            mask = mask.expand(-1, 2, -1, -1)
        # The network sees [flow_x, flow_y, mask, mask] (reference: mask repeated on the channel axis).
        return torch.cat([sparse, mask], dim=1).to(self._param_dtype)

    def _finish(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        flow = decode_flow_bins(logits, self.config.nbins, self.config.fmax)
        return F.interpolate(flow, size=size, mode="bilinear", align_corners=True)

    # -- the plain network (reference numerics) ----------------------------------------------------------------------

    def forward(self, image: torch.Tensor, sparse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The full network per frame, exactly as the reference runs it (use :meth:`densify` for speed).

        Args:
            image: ``[N, 3, h, w]`` in [0, 1] (one image per frame; h, w multiples of 8, ≥ 64; trained at 384²).
            sparse: ``[N, 2, h, w]`` sparse flow in pixels of this grid (x, y), zero where unknown.
            mask: ``[N, 1, h, w]`` or ``[N, 2, h, w]`` float, non-zero where ``sparse`` is known.

        Returns:
            ``[N, 2, h, w]`` float32 dense flow in pixels of the input grid, |flow| < 49.5 (released bins).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise MofaInputError(f"image must be [N,3,h,w] in [0,1], got shape {tuple(image.shape)}")
        self._check_size(*image.shape[-2:])
        sparse_in = self._sparse_input(sparse, mask)
        if image.shape[0] != sparse_in.shape[0] or image.shape[-2:] != sparse_in.shape[-2:]:
            raise MofaInputError(f"image {tuple(image.shape)} and sparse flow {tuple(sparse.shape)} do not match")
        out, conv1, layer1 = self.image_encoder(image.to(self._param_dtype) * 2 - 1)
        x = torch.cat([out, self.flow_encoder(sparse_in)], dim=1)
        logits = self.flow_decoder(x, conv1, layer1)
        return self._finish(logits, tuple(image.shape[-2:]))

    # -- image once, frames batched ----------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> CMPImageFeatures:
        """Run everything that depends only on the image (inference only: BatchNorm folded with running statistics).

        Args:
            image: ``[B, 3, h, w]`` or ``[3, h, w]`` in [0, 1] (B = 1 to share one image across all frames).

        Returns:
            :class:`CMPImageFeatures` on the model's device and dtype.
        """
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[1] != 3:
            raise MofaInputError(f"image must be [3,h,w] or [B,3,h,w] in [0,1], got shape {tuple(image.shape)}")
        self._check_size(*image.shape[-2:])
        dec = self.flow_decoder
        folded = _FoldedDecoder.from_decoder(dec)
        img_dim = self.config.img_enc_dim
        out, conv1, layer1 = self.image_encoder(image.to(self._param_dtype) * 2 - 1)
        branch_terms = []
        for branch, ((weight, bias), _, _) in zip(dec.branches(), folded.branches, strict=True):
            pooled = out if len(branch) == 9 else branch[0](out)  # max pooling is per channel: pool(cat) = cat(pool)
            term = F.conv2d(pooled, weight[:, :img_dim], bias, padding=1)
            branch_terms.append(term.contiguous(memory_format=torch.channels_last))
        (w4, b4), (w2, b2) = folded.fusion4, folded.fusion2
        fusion4_term = F.conv2d(dec.skipconv4(layer1), w4[:, 256:], b4, padding=1)
        fusion2_term = F.conv2d(dec.skipconv2(conv1), w2[:, 128:], b2, padding=1)
        return CMPImageFeatures(
            out=out,
            conv1=conv1,
            layer1=layer1,
            branch_terms=tuple(branch_terms),
            fusion4_term=fusion4_term.permute(0, 3, 2, 1).contiguous(),
            fusion2_term=fusion2_term.permute(0, 2, 3, 1).contiguous(),
            image_size=(int(image.shape[-2]), int(image.shape[-1])),
        )

    def decode(
        self,
        features: CMPImageFeatures,
        sparse: torch.Tensor,
        mask: torch.Tensor,
        return_logits: bool = False,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Per-frame part of the network for N frames that share ``features`` (inference only).

        The sparse-flow encoder and the 1/8 decoder branches run ``chunk_size`` frames at a time, the fusion layers
        and the bin decoding frame by frame. The fusion convolutions never build their resized inputs (see
        :class:`ResizedConv3x3`); the image halves of the concatenated convolutions come from ``features``.

        Args:
            features: from :meth:`encode_image` (batch 1, broadcast to all frames without copying, or batch N).
            sparse: ``[N, 2, h, w]`` sparse flow in pixels of the image grid.
            mask: ``[N, 1 or 2, h, w]`` float mask of known sparse flow.
            return_logits: return the ``[N, 2*nbins, h/2, w/2]`` logits instead of the flow.
            chunk_size: frames per chunk of the sparse encoder and 1/8 branches (``None`` = all at once).

        Returns:
            ``[N, 2, h, w]`` float32 (float64 for a float64 model) dense flow (pixels of the input grid), or the
            logits.
        """
        self._check_sparse(sparse, mask)
        if tuple(sparse.shape[-2:]) != features.image_size:
            raise MofaInputError(
                f"sparse flow is {tuple(sparse.shape[-2:])} but the image features are for {features.image_size}"
            )
        n = sparse.shape[0]
        batch = features.out.shape[0]
        if batch not in (1, n):
            raise MofaInputError(f"image features have batch {batch}; expected 1 or N={n}")
        dec = self.flow_decoder
        folded = _FoldedDecoder.from_decoder(dec)
        img_dim, nbins, width = self.config.img_enc_dim, self.config.nbins, _DECODER_WIDTH
        cl = torch.channels_last
        (h8, w8), (h4, w4), (h2, w2) = (t.shape[-2:] for t in (features.out, features.layer1, features.conv1))
        # channels-last weights: the 1/8 convolutions then write (y, x, c) memory, which the fusion layers read as is
        branch_weights = []
        for (w0, _), (w1, b1), (w2_, b2_) in folded.branches:
            sparse_half = w0[:, img_dim:].contiguous(memory_format=cl)  # the image half is in features.branch_terms
            branch_weights.append(
                ((sparse_half, None), (w1.contiguous(memory_format=cl), b1), (w2_.contiguous(memory_format=cl), b2_))
            )
        w_f8, b_f8 = folded.fusion8
        w_f8_first = w_f8[:, :width].contiguous(memory_format=cl)
        # Fusion convolutions of resized inputs; the spatial axes alternate: (x, y) -> (y, x) -> (x, y) -> (y, x).
        fusion8_parts = [
            ResizedConv3x3(
                w_f8[:, k * width : (k + 1) * width].transpose(2, 3), (term.shape[-1], term.shape[-2]), (w8, h8)
            )
            for k, term in enumerate(features.branch_terms[1:], start=1)
        ]
        fusion4 = ResizedConv3x3(folded.fusion4[0][:, :256], (h8, w8), (h4, w4))
        fusion2 = ResizedConv3x3(folded.fusion2[0][:, :128].transpose(2, 3), (w4, h4), (w2, h2))
        head = _bin_head(dec.head, nbins, self.config.fmax, torch.promote_types(self._param_dtype, torch.float32))
        # per-frame buffers, reused (fresh multi-megabyte tensors per frame cost page faults)
        f4 = features.fusion4_term.new_empty(features.fusion4_term.shape[1:])
        f2 = features.fusion2_term.new_empty(features.fusion2_term.shape[1:])
        logits = head[0].new_empty((h2 * w2, head[0].shape[1]))
        step = n if not chunk_size else max(1, int(chunk_size))
        outs = []
        for i in range(0, n, step):
            sl = slice(i, i + step)
            sparse_enc = self.flow_encoder(self._sparse_input(sparse[sl], mask[sl])).contiguous(memory_format=cl)
            branch_outs = []
            for branch, convs, img_term in zip(dec.branches(), branch_weights, features.branch_terms, strict=True):
                z = sparse_enc if len(branch) == 9 else branch[0](sparse_enc)
                for k, (weight, bias) in enumerate(convs):
                    z = F.conv2d(z, weight, bias, padding=1)
                    if k == 0:
                        z = z.add_(img_term if batch == 1 else img_term[sl])
                    z = z.relu_()
                branch_outs.append(z)
            f8_all = F.conv2d(branch_outs[0], w_f8_first, b_f8, padding=1).contiguous(memory_format=cl)
            for j in range(f8_all.shape[0]):
                frame = 0 if batch == 1 else i + j
                f8 = f8_all[j].permute(1, 2, 0)  # [h8, w8, 256], a contiguous view
                for part, x in zip(fusion8_parts, branch_outs[1:], strict=True):
                    part.accumulate_(x[j].permute(2, 1, 0).contiguous(), f8)  # input (x, y, c) -> output (y, x, c)
                fusion4.accumulate_(f8.relu_(), f4.copy_(features.fusion4_term[frame])).relu_()
                fusion2.accumulate_(f4, f2.copy_(features.fusion2_term[frame])).relu_()
                out = _expected_flow(f2.view(h2 * w2, -1), head, logits, return_logits, nbins)
                outs.append(out.reshape(h2, w2, -1).permute(2, 0, 1))
        dense = torch.stack(outs)
        if return_logits:
            return dense
        return F.interpolate(dense, size=features.image_size, mode="bilinear", align_corners=True)

    def densify(
        self,
        image: torch.Tensor,
        flow: torch.Tensor,
        mask: torch.Tensor,
        chunk_size: int | None = 2,
    ) -> torch.Tensor:
        """Sparse-to-dense protocol: dense flow for N frames of one image, the image encoded once.

        Args:
            image: ``[3, h, w]`` in [0, 1] on the S2D grid (384² for the released weights).
            flow: ``[N, 2, h, w]`` sparse flow, frame 0 → frame t, pixels of this grid; zero where unknown.
            mask: ``[N, 1, h, w]`` float, non-zero where ``flow`` is known.
            chunk_size: frames decoded per batch (bounds peak memory; ``None`` = all at once).

        Returns:
            ``[N, 2, h, w]`` dense flow in pixels of the same grid, in ``flow``'s floating dtype (float32 for
            integer input). Values saturate at ±49.495 px (spec §12.12).
        """
        if image.ndim != 3:
            raise MofaInputError(f"densify takes one image [3,h,w], got shape {tuple(image.shape)}")
        if flow.ndim != 4 or tuple(flow.shape[-2:]) != tuple(image.shape[-2:]):
            raise MofaInputError(
                f"flow must be [N,2,h,w] on the image grid {tuple(image.shape[-2:])}, got {tuple(flow.shape)}"
            )
        out_dtype = flow.dtype if flow.is_floating_point() else torch.float32
        if flow.shape[0] == 0:
            return flow.new_zeros((0, 2, *image.shape[-2:]), dtype=out_dtype)
        device = self.device
        with torch.inference_mode():
            features = self.encode_image(image.to(device))
            dense = self.decode(features, flow.to(device), mask.to(device), chunk_size=chunk_size)
        return dense.to(device=flow.device, dtype=out_dtype)

    def as_densifier(self, chunk_size: int | None = 2) -> CMPDensifier:
        """A plain callable for ``densify_hints(..., densifier=...)`` that also answers ``preferred_grid``."""
        return CMPDensifier(self, chunk_size)


class CMPDensifier:
    """Callable wrapper implementing the sparse-to-dense protocol with a CMP model (see :meth:`CMPModel.densify`)."""

    def __init__(self, model: CMPModel, chunk_size: int | None = 2):
        self.model = model
        self.chunk_size = chunk_size

    def preferred_grid(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        return self.model.preferred_grid(image_size)

    def __call__(self, image: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.densify(image, flow, mask, chunk_size=self.chunk_size)
