"""How a pipeline call runs, not what it computes: settings scoped to one call that leave the modules untouched.

- :func:`channels_last_convs`: 2-D convolutions on channels-last inputs (opt-in; speed, see below);
- :func:`chunked_feed_forward`: the transformer blocks' feed-forward layers a few samples / frames at a time
  (memory);
- :func:`single_key_cross_attention`: cross-attention over a one-token context computed as what it is, that token's
  projected value (speed);
- :func:`onednn_linears`: float32 linear layers on a CPU through oneDNN's matrix product with the bias fused in
  instead of MKL's ``addmm`` (speed);
- :func:`retained_heap`: freed host memory kept for reuse within the call instead of handed back to the OS and
  faulted in again (speed, glibc only).

All give the unscoped outputs up to float32 summation order.

**Channels-last.** oneDNN (CPU) and cuDNN (tensor cores) often run a 2-D convolution on a channels-last (NHWC) input
faster than on NCHW. Measured here it is not a clear win: an isolated full-size SVD-XT UNet call (256x256, 8 frames,
CFG batch 2) took ~21-25 s instead of ~34-47 s on a busy machine, but whole denoising steps of ``bench/denoise.py``
(256x256, 14 frames) ran at the same CPU time with and without it. So it is opt-in (``channels_last=True``).

Converting the weights with ``module.to(memory_format=torch.channels_last)`` would do the same but leaves
non-contiguous parameters behind, which ``safetensors`` refuses to save; so instead a forward pre-hook hands every
``nn.Conv2d`` a channels-last input for the duration of a ``with`` block and nothing about the modules changes.

**Chunked feed-forward.** The largest single activation of an SVD UNet or MOFA-Adapter step is the GEGLU
feed-forward's inner tensor, ``tokens x 2·4·C``: at 256x256 × 14 frames under guidance (28 samples of 32x32 tokens,
C = 320) it is 0.3 GB, at 512x512 × 25 frames 2.1 GB, several times any other single tensor of the step. A
feed-forward acts on every token on its own, so running it on a few samples (spatial blocks) or frames (temporal
blocks) at a time gives the same tokens out with a bounded peak (diffusers' ``set_chunk_feed_forward`` machinery,
with the chunk size chosen per call and restored here). The chunk is the largest whole number of samples / frames
whose inner tensor fits ``max_chunk_bytes`` (64 MiB): one sample or frame at a time, the previous rule, made the
low-resolution blocks re-read their large weights (52 MB for a 1280-channel GEGLU) for a few rows each — a step
was 10-15% SLOWER than unchunked on a CPU — while 64 MiB chunks are faster than unchunked (a 128x128 × 14-frame
step at 1 thread: 0.88x the unchunked CPU time, against 1.16x for one unit at a time; the intermediates stay small
enough to be reused by the allocator and to sit in cache). Under :func:`retained_heap`, where the allocator reuses
large blocks too, chunked and unchunked steps ran at the same speed (128x128, 2 threads): the chunks are for memory.

**Single-key cross-attention.** SVD conditions on one CLIP image embedding: every cross-attention (``attn2`` of the
spatial and temporal transformer blocks, in the UNet and in the adapter) attends from all ``N`` tokens to a context of
ONE token. A softmax over one key is exactly 1 whatever the query and key, so the attention output is that token's
value for every query: ``out = to_out(to_v(context))``, broadcast over the tokens. The stock path still projects every
token to a query (``N·C²`` multiply-adds), runs the attention kernel and projects all ``N`` identical rows out again
(another ``N·C²``); that is ~2 of the ~25 ``N·C²`` a spatial+temporal block pair spends in its linear layers. The
shortcut computes one value and one output row per context token. Any other call (longer context, attention mask,
training-mode dropout, 4-D inputs, group/spatial norm) goes to the wrapped processor unchanged.

**oneDNN linear layers.** On a CPU, ``F.linear`` in float32 is MKL's ``addmm``: the bias is first copied into every
row of the output, then the product is accumulated onto it. This machine is an AMD EPYC (AVX-512), where MKL's sgemm
ran ten of the UNet's and adapter's layer shapes at 105-196 GFLOP/s and oneDNN's matmul (the library that already
runs every convolution) at 143-215 GFLOP/s, 0.98-1.8x faster per shape over two passes (median 1.2x; the widest gap
on the few-row, wide products of the low-resolution blocks, e.g. 224 x 1280 -> 10240). The linear layers are about
half a CPU denoising step, so within the block every plain ``nn.Linear`` inside the modules runs
``torch.ops.mkldnn._linear_pointwise`` (bias fused as a post-op; the weights stay the module's own dense tensors): a
128x128 × 14-frame step of the pipeline defaults ran 1.14-1.26x faster (four alternating rounds in one process), its
final latents within 1.1e-5 of the MKL path's. Only inference calls take it: float32 input and weight on the CPU,
no autograd needed, oneDNN enabled (``torch.backends.mkldnn``) and the operator present in this torch build; anything
else, subclasses of ``nn.Linear`` and layers whose ``forward`` someone else already replaced (accelerate's offload
hooks) go the stock way.

**Retained heap.** glibc's ``malloc`` serves every block above its mmap threshold (dynamic, at most 32 MiB on 64-bit)
with a fresh ``mmap`` and unmaps it on ``free``; the next tensor of that size faults all its pages in again, each one
zeroed by the kernel. A denoising step allocates and frees many such tensors (activations, GEGLU inner tensors,
oneDNN's re-laid-out convolution weights), so on a CPU a 128x128 × 14-frame step took 1.5-1.8 M minor page faults and
5-8 s of system time besides ~55-60 s of user time. Within the block both thresholds (``M_MMAP_THRESHOLD``,
``M_TRIM_THRESHOLD``) are 1 GiB, so large blocks come from the heap and freed ones are reused: the same step
(pipeline defaults, three alternating pairs in one process) then took < 7 k faults and 0.15 s of system time and ran
1.21x faster (27.5 vs 33.4 s wall, 53.8 vs 64.8 s CPU). At 256x256 × 14 frames it made the reference's settings 1.23x
faster (``bench/denoise.py``, mode ``reference_heap``) at 1.13x their working memory (freed blocks wait in the heap
instead of going back to the OS). On exit the thresholds go back to the values glibc's dynamic rule settles at after a
32 MiB block is freed (mmap 32 MiB, trim 64 MiB) and ``malloc_trim(0)`` hands the retained memory back, so the process
does not stay at its peak. The settings are process-wide for the duration of the block (other threads allocating
meanwhile share them); nested blocks apply them once. Where the C library is not glibc (macOS, Windows, musl) the
block is a no-op.

Reuse is not guaranteed: torch's CPU allocator asks for 64-byte alignment (``posix_memalign``), and glibc serves that
by cutting a block out of a slightly larger chunk, leaving slivers of 32-96 bytes beside it. Its per-thread cache
(tcache) keeps such small chunks without merging them, so a freed block can stay walled off from its neighbours and
from the top of the heap, and the next request of the same size (a few bytes larger inside ``memalign``) does not fit
it: the heap grows by a fresh block instead. A probe that allocates, fills and frees a 96 MiB tensor twice in a row,
four times, saw this in 10 of 30 fresh processes (in 4 still on the fourth pair), and in none of 30 with
``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``. Across denoising steps the retained heap therefore crept up (256x256
× 14 frames, working memory after each of 4 steps: 0.625, 0.650, 0.694, 0.694 GiB). The pipeline calls
:func:`trim_retained_heap` after every step: when the heap has grown since the previous step (``mallinfo2``), it
returns the free pages (``malloc_trim(0)`` releases the page-aligned interior of every free chunk, not only the top)
and keeps the thresholds. A trim after every step held those 4 steps at 0.622 GiB but cost ~5% at 128x128 (the next
step faults its working set in again, ~60 k pages); trimming on growth only did it after 2 of 5 steps there.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention import TemporalBasicTransformerBlock
from torch import nn

__all__ = [
    "channels_last_convs",
    "chunked_feed_forward",
    "onednn_linears",
    "retained_heap",
    "single_key_cross_attention",
    "trim_retained_heap",
]


def _submodules(modules: Iterable[nn.Module | None]) -> Iterator[nn.Module]:
    """Every submodule of the given modules; ``None`` entries (absent optional components) are skipped."""
    for module in modules:
        if module is not None:
            yield from module.modules()


def _to_channels_last(_module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


@contextmanager
def channels_last_convs(modules: Iterable[nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``nn.Conv2d`` inside ``modules`` receives its 4-D input in channels-last layout.

    Parameters, buffers and state dicts are untouched; the hooks are removed on exit, also on error. ``None`` entries
    (absent optional components) are skipped; ``enabled=False`` makes the block a no-op.
    """
    handles = []
    try:
        if enabled:
            for sub in _submodules(modules):
                if isinstance(sub, nn.Conv2d):
                    handles.append(sub.register_forward_pre_hook(_to_channels_last))
        yield
    finally:
        for handle in handles:
            handle.remove()


FEED_FORWARD_CHUNK_BYTES = 64 * 2**20
"""Default cap on a feed-forward chunk's inner activation (the GEGLU projection output), in bytes."""


def _feed_forward_units(block: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(units along the chunk dim, bytes of one unit's inner activation)`` of one transformer-block call, or None."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None
    ffs = [getattr(block, name, None) for name in ("ff", "ff_in")]
    widths = [ff.net[0].proj.out_features for ff in ffs if ff is not None and hasattr(ff.net[0], "proj")]
    if not widths:
        return None
    row_bytes = max(widths) * hidden.element_size()
    if isinstance(block, TemporalBasicTransformerBlock):  # temporal block: [B·T, S, C] -> chunks along T of B·S rows
        frames = args[1] if len(args) > 1 else kwargs.get("num_frames")
        if not frames or hidden.shape[0] % int(frames):
            return None
        return int(frames), hidden.shape[0] // int(frames) * hidden.shape[1] * row_bytes
    return hidden.shape[0], hidden.shape[1] * row_bytes  # spatial block: chunks along B·T of S rows


def _units_per_chunk(units: int, unit_bytes: int, max_bytes: int) -> int:
    """The largest divisor of ``units`` whose chunk's inner tensor fits ``max_bytes`` (at least 1)."""
    fit = max(1, max_bytes // max(unit_bytes, 1))
    return max(d for d in range(1, min(units, fit) + 1) if units % d == 0)


@contextmanager
def chunked_feed_forward(
    modules: Iterable[nn.Module | None], enabled: bool = True, max_chunk_bytes: int = FEED_FORWARD_CHUNK_BYTES
) -> Iterator[None]:
    """Within the block, every diffusers transformer block inside ``modules`` runs its feed-forward in chunks whose
    inner activation stays within ``max_chunk_bytes``: spatial blocks (``[B·T, tokens, C]``) a whole number of samples
    at a time, temporal blocks (``[B·tokens, T, C]``) a whole number of frames at a time; the chunk size is the largest
    divisor that fits, chosen per call from the input's shape (so low-resolution blocks, whose weights are large and
    activations small, keep one big matrix product). The blocks' previous chunk settings are restored on exit, also
    on error."""
    saved: list[tuple[nn.Module, object, object]] = []
    handles = []

    def size_chunks(block: nn.Module, args: tuple, kwargs: dict) -> None:
        found = _feed_forward_units(block, args, kwargs)
        if found is not None:
            units, unit_bytes = found
            size = _units_per_chunk(units, unit_bytes, max_chunk_bytes)
            block._chunk_size = None if size == units else size  # one chunk: the plain path, no concatenation

    try:
        if enabled:
            for block in _submodules(modules):
                if not (hasattr(block, "set_chunk_feed_forward") and hasattr(block, "_chunk_size")):
                    continue
                saved.append((block, block._chunk_size, getattr(block, "_chunk_dim", 0)))
                block.set_chunk_feed_forward(1, dim=0)  # temporal blocks pin their own dim (frames, 1)
                handles.append(block.register_forward_pre_hook(size_chunks, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block, size, dim in saved:
            block._chunk_size, block._chunk_dim = size, dim


class _SingleKeyCrossAttention:
    """Attention processor wrapper: a cross-attention whose context has one token returns that token's projected value
    for every query (softmax over one key is exactly 1); anything else goes to the wrapped processor."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def _applies(self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None, mask) -> bool:
        return (
            context is not None
            and mask is None
            and hidden_states.ndim == 3
            and context.ndim == 3
            and context.shape[1] == 1
            and context.shape[0] == hidden_states.shape[0]
            and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None
            and not (attn.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in attn.to_out))
        )

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self._applies(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        value = attn.to_v(context).to(hidden_states.dtype)  # [N, 1, inner]: the attention output of every query
        out = attn.to_out[1](attn.to_out[0](value))  # [N, 1, C]
        out = out.expand(-1, hidden_states.shape[1], -1)  # [N, tokens, C], a view
        if attn.residual_connection:
            out = out + hidden_states
        if attn.rescale_output_factor != 1.0:  # SVD's is 1: skip a pass over every token (x / 1.0 == x exactly)
            out = out / attn.rescale_output_factor
        return out


@contextmanager
def single_key_cross_attention(modules: Iterable[nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within the block, every diffusers cross-attention inside ``modules`` computes a one-token context as
    ``to_out(to_v(context))`` broadcast over the queries (same result as the full attention; see the module
    docstring). The previous processors are restored on exit, also on error."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        if enabled:
            for attn in _submodules(modules):
                if getattr(attn, "is_cross_attention", False) and hasattr(attn, "processor"):
                    saved.append((attn, attn.processor))
                    attn.processor = _SingleKeyCrossAttention(attn.processor)
        yield
    finally:
        for attn, processor in saved:
            attn.processor = processor


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear operator and it runs here (checked once on a tiny input)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = _mkldnn_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 4.0)))


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (``[..., in] -> [..., out]``), the bias a fused post-op."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` through oneDNN (bias fused) when the call is a float32 CPU inference call, else stock."""
    w, b = layer.weight, layer.bias
    if (
        x.dtype == w.dtype == torch.float32
        and x.device.type == w.device.type == "cpu"
        and x.layout == w.layout == torch.strided
        and x.dim() >= 2
        and not (
            torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
        )
        and torch.backends.mkldnn.enabled
    ):
        return _mkldnn_linear(x, w, b)
    return F.linear(x, w, b)


@contextmanager
def onednn_linears(modules: Iterable[nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within the block, every plain ``nn.Linear`` inside ``modules`` computes float32 CPU inference calls with
    oneDNN's matrix product, bias fused (see the module docstring; other calls go the stock way). Parameters and
    state dicts are untouched: the layer gets an instance ``forward`` for the block, removed on exit, also on error.
    Subclasses and layers that already have an instance ``forward`` are left alone. A no-op with ``enabled=False`` or
    where the operator is missing."""
    patched: list[nn.Module] = []
    try:
        if enabled and onednn_linear_available():
            for layer in _submodules(modules):
                if type(layer) is nn.Linear and "forward" not in vars(layer):
                    layer.forward = functools.partial(_onednn_linear_forward, layer)
                    patched.append(layer)
        yield
    finally:
        for layer in patched:
            vars(layer).pop("forward", None)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)
HEAP_THRESHOLD_BYTES = 2**30
"""mmap and trim thresholds within :func:`retained_heap`: blocks up to 1 GiB come from (and go back to) the heap."""
_GLIBC_DYNAMIC_MAX = (32 * 2**20, 64 * 2**20)
"""(mmap, trim) thresholds restored on exit: where glibc's dynamic rule ends on 64-bit once a 32 MiB block is freed."""
_heap_lock = threading.Lock()
_heap_depth = 0
_heap_seen: int | None = None
"""Heap size at the last :func:`trim_retained_heap` in the current block (None: not yet noted)."""


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): allocator statistics in ``size_t`` fields."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None. Looked up once:
    ``platform.libc_ver`` reads the interpreter's executable, not something to repeat on every pipeline call."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallinfo2"):
            libc.mallinfo2.restype = _MallInfo2
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set_thresholds(libc: ctypes.CDLL, mmap_bytes: int, trim_bytes: int) -> None:
    """Both thresholds; a value glibc refuses leaves that threshold as it was (mallopt returns 0, nothing else)."""
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)


@contextmanager
def retained_heap(enabled: bool = True) -> Iterator[None]:
    """Within the block, glibc keeps freed blocks of up to 1 GiB in the heap for reuse instead of unmapping them
    (no page faults for a tensor the size of one just freed); on exit the retained memory is handed back with
    ``malloc_trim``. Process-wide while it lasts; a no-op without glibc or with ``enabled=False``. See the module
    docstring for the measurements."""
    global _heap_depth, _heap_seen
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_depth += 1
        if _heap_depth == 1:
            _heap_seen = None
            _set_thresholds(libc, HEAP_THRESHOLD_BYTES, HEAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                _set_thresholds(libc, *_GLIBC_DYNAMIC_MAX)
                libc.malloc_trim(0)


def _heap_size(libc: ctypes.CDLL) -> int | None:
    """Bytes the heap has taken from the OS (``mallinfo2().arena``, all arenas), or None before glibc 2.33."""
    mallinfo2 = getattr(libc, "mallinfo2", None)
    return None if mallinfo2 is None else int(mallinfo2().arena)


def trim_retained_heap(always: bool = False) -> bool:
    """Inside :func:`retained_heap`, if the heap has grown since the previous call in the block (or ``always``), hand
    its free pages back to the OS now (``malloc_trim(0)``: the unused top and the page-aligned interior of every free
    chunk), keeping the thresholds; True if it trimmed. The first call in a block only notes the heap's size; without
    ``mallinfo2`` (glibc < 2.33) every call trims.

    Meant between denoising steps. Once the heap holds a step's working set, later steps reuse it without page faults
    and the heap stays the same size: nothing to do. It grows again when a freed block could not be reused, because
    torch's 64-byte aligned allocations leave small slivers beside each block that glibc's per-thread cache holds (see
    the module docstring); trimming then keeps the retained heap from creeping up step after step, at the price of
    faulting the working set in once more in the next step. ``always`` trims after every step, so that every step
    starts from an empty heap and none builds on the previous one's fragments (the lowest peak, at a few percent of
    speed). A no-op (False) outside the block or without glibc."""
    global _heap_seen
    libc = _glibc() if _heap_depth > 0 else None
    if libc is None:
        return False
    size = _heap_size(libc)
    with _heap_lock:
        grown = always or size is None or (_heap_seen is not None and size > _heap_seen)
        _heap_seen = size
    if grown:
        libc.malloc_trim(0)
    return grown
