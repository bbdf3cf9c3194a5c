"""All weight loading of mofa: hub ids, the released folder layouts (spec §10), safe loading only.

Two sections, owned by different parts of the code base:

- **CMP** — the released sparse-to-dense checkpoint (``ckpt_iter_42000.pth.tar``) → ``CMPModel``.
- **SVD / adapter / pipeline** — Stable Video Diffusion XT 1.1 folders (with their ``fp16`` variant files), the
  MOFA-Adapter folder and the released ``MOFA-Video-Traj`` / ``MOFA-Video-Hybrid`` trees → ``MofaVideoPipeline``.

Nothing here unpickles code: safetensors, or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mofa.errors import MofaInputError

if TYPE_CHECKING:
    from mofa.pipelines.pipeline_mofa import MofaVideoPipeline


# ==============================================================================================================
# Safe-loading helpers (shared by every section)
# ==============================================================================================================


@dataclass
class LoadReport:
    """What a loader read and what it deliberately left out (the CLI prints this instead of warnings).

    Attributes:
        source: the file or folder read.
        format: ``"pth.tar"`` (``torch.load(weights_only=True)``), ``"safetensors"`` or ``"diffusers"`` (folder).
        loaded: number of tensors loaded into the model (parameters and buffers).
        parameters: number of parameter elements in the model.
        ignored: entries of the file that are not model weights (e.g. ``"optimizer state"``, ``"step=42000"``).
        target: where the result went (a model class, or the converted output path).
    """

    source: str
    format: str
    loaded: int
    parameters: int
    ignored: list[str] = field(default_factory=list)
    target: str = ""

    def __str__(self) -> str:
        ignored = ", ".join(self.ignored) if self.ignored else "nothing"
        head = f"loaded {self.loaded} tensors ({self.parameters:,} parameters) from {self.source} [{self.format}]"
        tail = f" -> {self.target}" if self.target else ""
        return f"{head}{tail}; ignored: {ignored}"


_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with user-facing errors.

    Only tensors and plain containers/numbers/strings are accepted; a file that references any other pickled
    global (a class instance, ``os.system``, ...) is refused with a :class:`MofaInputError` naming that global —
    nothing from it is executed.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise MofaInputError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = _PICKLED_GLOBAL.search(str(err))
        if match:
            raise MofaInputError(
                f"refusing to load {path}: it contains pickled code/objects ({match.group(1)}), not only tensors; "
                f"convert it to safetensors in a trusted environment first"
            ) from None
        raise MofaInputError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 — any parse failure of a user file (struct.error, EOFError, ...) is input
        raise MofaInputError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)})") from None


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` file, on CPU."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MofaInputError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 — safe_open is no dict
    except (SafetensorError, OSError, ValueError) as err:
        raise MofaInputError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    return tensors, metadata


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str, model_name: str
) -> None:
    """Strict key and shape check; raises one :class:`MofaInputError` listing missing, unexpected and wrong-shaped
    keys (at most 5 of each, with counts)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{key} {tuple(found[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(found))
        if tuple(found[key].shape) != tuple(expected[key].shape)
    ]
    if not (missing or unexpected or wrong):
        return

    def summary(label: str, items: list[str]) -> str:
        more = f", ... (+{len(items) - 5})" if len(items) > 5 else ""
        return f"{len(items)} {label}: {', '.join(items[:5])}{more}"

    parts = [
        summary(label, items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong))
        if items
    ]
    raise MofaInputError(f"{source} does not match {model_name}: " + "; ".join(parts))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if str(dtype).lower() not in names:
        raise MofaInputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return names[str(dtype).lower()]


# ==============================================================================================================
# CMP section (sparse-to-dense checkpoint) — owned by the CMP code; keep edits below this banner small.
# ==============================================================================================================

CMP_STATE_PREFIX = "module."
"""Prefix of every key in the released CMP ``state_dict`` (the network was wrapped in a ``FixModule``)."""
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_cmp_state_dict(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], LoadReport]:
    """Read a CMP checkpoint without building a model.

    Accepts the released ``.pth.tar`` (``{'step', 'state_dict' with 'module.' keys, 'optimizer'}``, read with
    ``weights_only=True``), a bare state dict saved with ``torch.save``, a ``.safetensors`` file (config in the
    ``"config"`` metadata entry, else the released config) or a diffusers folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``).

    Returns:
        ``(state_dict without the 'module.' prefix, CMPModel config kwargs, LoadReport with loaded=0)``.
    """
    path = Path(path).expanduser()
    ignored: list[str] = []
    config: dict[str, Any] = {}
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / _DIFFUSERS_WEIGHTS
        if not (config_file.is_file() and weights_file.is_file()):
            raise MofaInputError(f"{path} is not a CMP folder: expected config.json and {_DIFFUSERS_WEIGHTS}")
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise MofaInputError(f"{config_file} is not valid JSON ({_first_line(err)})") from None
        if raw.get("_class_name", "CMPModel") != "CMPModel":
            raise MofaInputError(f"{path} holds a {raw['_class_name']}, not a CMPModel")
        config = {k: v for k, v in raw.items() if not k.startswith("_")}
        state, _ = read_safetensors(weights_file)
        fmt = "diffusers"
    elif path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        if "config" in metadata:
            try:
                config = json.loads(metadata["config"])
            except ValueError:
                raise MofaInputError(f"{path} has an unreadable 'config' metadata entry (not JSON)") from None
        fmt = "safetensors"
    else:
        loaded = safe_torch_load(path)
        if not isinstance(loaded, Mapping):
            raise MofaInputError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
        if "state_dict" in loaded:
            state = loaded["state_dict"]
            for key, value in loaded.items():
                if key == "state_dict":
                    continue
                if key == "optimizer":
                    ignored.append("optimizer state")
                elif isinstance(value, (int, float, str)):
                    ignored.append(f"{key}={value}")
                else:
                    ignored.append(str(key))
        else:
            state = loaded
        fmt = "pth.tar"
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MofaInputError(f"{path}: 'state_dict' must map names to tensors")
    if state and all(key.startswith(CMP_STATE_PREFIX) for key in state):
        state = {key[len(CMP_STATE_PREFIX) :]: value for key, value in state.items()}
    config = _cmp_config_kwargs(config, str(path))
    return dict(state), config, LoadReport(str(path), fmt, 0, 0, ignored)


def _cmp_config_kwargs(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {"layers", "img_enc_dim", "sparse_enc_dim", "nbins", "fmax"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise MofaInputError(f"{source}: unknown CMPModel config entries {unknown}")
    kwargs = dict(config)
    if "layers" in kwargs:
        kwargs["layers"] = tuple(kwargs["layers"])
    return kwargs


def load_cmp_checkpoint(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    return_report: bool = False,
) -> Any:
    """Load the released CMP (or a converted copy) into a :class:`~mofa.models.cmp.CMPModel` in eval mode.

    Args:
        path: released ``ckpt_iter_42000.pth.tar``, a ``.safetensors`` file or a diffusers folder
            (see :func:`read_cmp_state_dict`).
        device: where the model goes (default CPU; the reference's hard-coded CUDA is not needed).
        dtype: optional ``torch.float16`` / ``torch.bfloat16`` (or ``"fp16"``, ``"bf16"``); default float32.
        return_report: also return the :class:`LoadReport`.

    Returns:
        The model, or ``(model, report)`` with ``return_report=True``.

    Raises:
        MofaInputError: unreadable file, pickled code inside, or keys/shapes that do not match the architecture
            (all missing / unexpected / wrong-shaped keys are listed; nothing is loaded partially).
    """
    from mofa.models.cmp import CMPModel

    state, config, report = read_cmp_state_dict(path)
    target_dtype = _parse_dtype(dtype)
    with torch.device("meta"):
        skeleton = CMPModel(**config)
    check_state_dict(skeleton.state_dict(), state, str(path), "the CMP architecture")
    model = CMPModel(**config)
    model.load_state_dict(state, strict=True)
    # nn.Module.to: ModelMixin.to would warn about fp32-pinned modules, which CMPModel does not have.
    model = torch.nn.Module.to(model, device=device, dtype=target_dtype).eval()
    report.loaded = len(state)
    report.parameters = sum(p.numel() for p in model.parameters())
    report.target = f"CMPModel ({model.dtype}, {model.device})"
    return (model, report) if return_report else model


def convert_cmp_checkpoint(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], overwrite: bool = False
) -> LoadReport:
    """Convert a CMP checkpoint to safetensors (``out_path`` ends in ``.safetensors``; the config is stored in the
    ``"config"`` metadata entry) or to a diffusers folder (``out_path`` without suffix: ``config.json`` +
    ``diffusion_pytorch_model.safetensors``, loadable with ``CMPModel.from_pretrained``).

    The input is fully validated first and the output is written to a temporary sibling and renamed, so a failure
    leaves nothing half-written. Returns the :class:`LoadReport` (``target`` = the output path).
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out_path).expanduser()
    if out.suffix and out.suffix != ".safetensors":
        raise MofaInputError(f"output {out} must end in .safetensors (a file) or have no suffix (a diffusers folder)")
    if out.exists() and not overwrite:
        raise MofaInputError(f"output {out} already exists; remove it or pass --overwrite")
    if not out.parent.is_dir():
        raise MofaInputError(f"output folder {out.parent} does not exist")
    model, report = load_cmp_checkpoint(in_path, return_report=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if out.suffix == ".safetensors":
            staged = tmp / out.name
            tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
            config = {key: value for key, value in model.config.items() if not key.startswith("_")}
            metadata = {"config": json.dumps(config), "format": "pt", "model": "CMPModel"}
            save_file(tensors, str(staged), metadata=metadata)
        else:
            staged = tmp / "model"
            model.save_pretrained(staged, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staged.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.target = str(out)
    return report


# ==============================================================================================================
# SVD / adapter / pipeline section
# ==============================================================================================================

SVD_HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
"""The base model MOFA-Video's trajectory adapter was trained on."""
TRAJ_HUB_ID = "MyNiuuu/MOFA-Video-Traj"
"""Released trajectory adapter (``ckpts/controlnet``) and CMP checkpoint."""
HYBRID_HUB_ID = "MyNiuuu/MOFA-Video-Hybrid"

CMP_CHECKPOINT_RELPATH = (
    "models/cmp/experiments/semiauto_annot/resnet50_vip+mpii_liteflow/checkpoints/ckpt_iter_42000.pth.tar"
)
"""Where the released apps expect the CMP checkpoint, relative to the app folder (spec §10)."""

SVD_COMPONENTS = ("unet", "vae", "image_encoder")
"""Weight-bearing SVD subfolders; each holds ``<stem>.safetensors`` and/or the ``<stem>.fp16.safetensors`` variant."""
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "image_encoder": "model"}
SVD_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.fp16.safetensors",
)
"""The files of an SVD-XT 1.1 folder that mofa reads (fp16 variant, as the reference loads them)."""
ADAPTER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")

# Sub-folders of the released trees, searched in this order (spec §10).
_SVD_SUBDIRS = (
    "",
    "ckpts/stable-video-diffusion-img2vid-xt-1-1",
    "ckpts/mofa/stable-video-diffusion-img2vid-xt-1-1",
    "stable-video-diffusion-img2vid-xt-1-1",
    "mofa/stable-video-diffusion-img2vid-xt-1-1",
)
_ADAPTER_SUBDIRS = (
    "",
    "adapter",
    "ckpts/controlnet",
    "ckpts/mofa/traj_controlnet",
    "controlnet",
    "mofa/traj_controlnet",
)
_CMP_SUBPATHS = (
    CMP_CHECKPOINT_RELPATH,
    f"MOFA-Video-Traj/{CMP_CHECKPOINT_RELPATH}",
    f"ckpts/{CMP_CHECKPOINT_RELPATH}",
)


def _is_hub_id(value: str | os.PathLike[str]) -> bool:
    text = str(value)
    return (
        not Path(text).exists()
        and text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and all(part and " " not in part for part in text.split("/"))
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, patterns: list[str], files_hint: list[str], where: str) -> Path:
    """``huggingface_hub.snapshot_download`` (cache first, progress bars on) or a MofaInputError naming the files."""
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 — every failure mode (offline, no network, 404) gets the same advice
        reason = "HF_HUB_OFFLINE is set" if offline else f"download failed ({type(err).__name__})"
        raise MofaInputError(
            f"{repo_id!r} is no local folder and cannot be fetched from the Hugging Face hub: {reason}; place these "
            f"files in a local folder and pass that folder instead ({where}): {', '.join(files_hint)}"
        ) from None


def _has_weights(folder: Path, stem: str) -> bool:
    return any((folder / f"{stem}{suffix}").is_file() for suffix in (".safetensors", ".fp16.safetensors", ".bin"))


def pick_svd_variant(folder: str | os.PathLike[str], variant: str | None = None) -> str | None:
    """The weight variant to load from an SVD folder: ``variant`` if given, else ``None`` when every component has its
    default ``*.safetensors`` file and ``"fp16"`` when (some) components only ship ``*.fp16.safetensors``.

    Raises ``MofaInputError`` naming the missing file when neither exists, or when the requested variant is absent.
    """
    root = Path(folder)
    need_fp16 = False
    for name in SVD_COMPONENTS:
        stem = _WEIGHT_STEMS[name]
        default = root / name / f"{stem}.safetensors"
        fp16 = root / name / f"{stem}.fp16.safetensors"
        if variant is not None:
            wanted = root / name / f"{stem}.{variant}.safetensors"
            if not wanted.is_file():
                raise MofaInputError(
                    f"variant {variant!r} requested but {wanted} is missing; drop --variant or add it"
                )
            continue
        if default.is_file():
            continue
        if fp16.is_file():
            need_fp16 = True
            continue
        raise MofaInputError(f"SVD folder {root} has no weights for {name!r}: expected {default} or {fp16}")
    if variant is not None:
        return variant
    if need_fp16:
        # diffusers loads a variant folder-wide; with mixed files the fp16 files must exist for every component.
        for name in SVD_COMPONENTS:
            fp16 = root / name / f"{_WEIGHT_STEMS[name]}.fp16.safetensors"
            if not fp16.is_file():
                raise MofaInputError(f"SVD folder {root} mixes variants: add {fp16} (or remove the other fp16 files)")
        return "fp16"
    return None


def resolve_svd_folder(svd: str | os.PathLike[str] = SVD_HUB_ID) -> Path:
    """Local SVD folder (``model_index.json`` + components) for a hub id, a bare SVD folder, or a released tree
    (``MOFA-Video-Traj`` with ``ckpts/stable-video-diffusion-img2vid-xt-1-1`` or Hybrid ``ckpts/mofa/...``)."""
    if _is_hub_id(svd):
        patterns = ["model_index.json", "*/*.json", "*/*.fp16.safetensors"]
        root = _download(str(svd), patterns, list(SVD_FILES), "--svd DIR / svd=DIR")
        if not (root / "model_index.json").is_file():
            raise MofaInputError(f"hub repo {svd!r} is not an SVD folder (no model_index.json)")
        return root
    base = Path(svd).expanduser()
    if not base.exists():
        raise MofaInputError(f"SVD path {base} does not exist; pass a folder or the hub id {SVD_HUB_ID!r}")
    for sub in _SVD_SUBDIRS:
        folder = base / sub
        if (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file():
            return folder
    raise MofaInputError(
        f"{base} is not an SVD folder: expected model_index.json and unet/, vae/, image_encoder/, scheduler/, "
        f"feature_extractor/ (directly or under ckpts/stable-video-diffusion-img2vid-xt-1-1)"
    )


def resolve_adapter_folder(adapter: str | os.PathLike[str] = TRAJ_HUB_ID) -> Path:
    """Local MOFA-Adapter folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) for the hub id
    ``MyNiuuu/MOFA-Video-Traj``, a released tree (``ckpts/controlnet`` or ``ckpts/mofa/traj_controlnet``), a saved
    pipeline folder (``adapter/``) or a bare adapter folder."""
    if _is_hub_id(adapter):
        repo = str(adapter)
        if repo == HYBRID_HUB_ID:
            sub, files = "ckpts/mofa/traj_controlnet", [f"ckpts/mofa/traj_controlnet/{f}" for f in ADAPTER_FILES]
        else:
            sub, files = "ckpts/controlnet", [f"ckpts/controlnet/{f}" for f in ADAPTER_FILES]
        root = _download(repo, [f"{sub}/*"], files, "--adapter DIR / adapter=DIR")
        return resolve_adapter_folder(root)
    base = Path(adapter).expanduser()
    if not base.exists():
        raise MofaInputError(f"adapter path {base} does not exist; pass a folder or the hub id {TRAJ_HUB_ID!r}")
    for sub in _ADAPTER_SUBDIRS:
        folder = base / sub
        if (folder / "config.json").is_file() and _has_weights(folder, "diffusion_pytorch_model"):
            return folder
    raise MofaInputError(
        f"{base} holds no MOFA-Adapter: expected {' + '.join(ADAPTER_FILES)} directly or under ckpts/controlnet "
        f"(MOFA-Video-Traj) or ckpts/mofa/traj_controlnet (MOFA-Video-Hybrid)"
    )


def resolve_cmp_checkpoint(cmp: str | os.PathLike[str]) -> Path:
    """The CMP ``.pth.tar`` for a file path, a released app tree (``models/cmp/.../ckpt_iter_42000.pth.tar``) or the
    hub id ``MyNiuuu/MOFA-Video-Traj``."""
    if _is_hub_id(cmp):
        root = _download(str(cmp), [f"*{CMP_CHECKPOINT_RELPATH}"], [CMP_CHECKPOINT_RELPATH], "--cmp PATH / cmp=PATH")
        found = sorted(root.rglob("ckpt_iter_42000.pth.tar"))
        if not found:
            raise MofaInputError(f"hub repo {cmp!r} has no {CMP_CHECKPOINT_RELPATH}; pass --cmp PATH to the file")
        return found[0]
    path = Path(cmp).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for sub in _CMP_SUBPATHS:
            if (path / sub).is_file():
                return path / sub
        if (path / "config.json").is_file():  # a converted CMP (diffusers folder, see convert_cmp_checkpoint)
            return path
    raise MofaInputError(
        f"CMP checkpoint {path} not found: pass the .pth.tar file or a tree with {CMP_CHECKPOINT_RELPATH}"
    )


@dataclass
class ReleasedPaths:
    """Resolved local locations of everything ``MofaVideoPipeline.from_released`` loads."""

    svd: Path
    adapter: Path
    cmp: Path | None
    variant: str | None


def resolve_released(
    svd: str | os.PathLike[str] = SVD_HUB_ID,
    adapter: str | os.PathLike[str] = TRAJ_HUB_ID,
    cmp: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> ReleasedPaths:
    """Resolve hub ids / released trees to local paths (downloads when online; clear errors when offline)."""
    svd_dir = resolve_svd_folder(svd)
    return ReleasedPaths(
        svd=svd_dir,
        adapter=resolve_adapter_folder(adapter),
        cmp=None if cmp is None else resolve_cmp_checkpoint(cmp),
        variant=pick_svd_variant(svd_dir, variant),
    )


def load_released_pipeline(
    svd: str | os.PathLike[str] = SVD_HUB_ID,
    adapter: str | os.PathLike[str] = TRAJ_HUB_ID,
    cmp: str | os.PathLike[str] | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    device: torch.device | str | None = None,
    pipeline_cls: type[MofaVideoPipeline] | None = None,
) -> MofaVideoPipeline:
    """Build a :class:`~mofa.pipelines.pipeline_mofa.MofaVideoPipeline` from the released pieces.

    Args:
        svd: hub id, SVD folder or released tree holding ``ckpts/stable-video-diffusion-img2vid-xt-1-1``.
        adapter: hub id, adapter folder or released tree holding ``ckpts/controlnet`` / ``ckpts/mofa/traj_controlnet``.
        cmp: CMP checkpoint (file, tree or hub id) or ``None`` for the weight-free classic densifier.
        torch_dtype: dtype of every model (default float32; the fp16 files are upcast).
        variant: SVD weight variant; ``None`` picks ``"fp16"`` when only fp16 files exist.
        device: where to put the pipeline (default: stay on CPU).
    """
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPVisionModelWithProjection

    from mofa.models.adapter import MofaAdapterModel
    from mofa.models.unet_injection import MofaUNetSpatioTemporalConditionModel

    if pipeline_cls is None:
        from mofa.pipelines.pipeline_mofa import MofaVideoPipeline as pipeline_cls
    paths = resolve_released(svd, adapter, cmp, variant)
    dtype = torch_dtype or torch.float32
    common: dict[str, Any] = {**_dtype_kwargs("diffusers", dtype), "variant": paths.variant}
    unet = MofaUNetSpatioTemporalConditionModel.from_pretrained(paths.svd, subfolder="unet", **common)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(paths.svd, subfolder="vae", **common)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        paths.svd / "image_encoder", variant=paths.variant, **_dtype_kwargs("transformers", dtype)
    )
    scheduler = EulerDiscreteScheduler.from_pretrained(paths.svd, subfolder="scheduler")
    feature_extractor = _load_feature_extractor(paths.svd / "feature_extractor")
    adapter_model = MofaAdapterModel.from_pretrained(paths.adapter, **_dtype_kwargs("diffusers", dtype))
    flow_model = None
    if paths.cmp is not None:
        flow_model = load_cmp_checkpoint(paths.cmp)
    pipe = pipeline_cls(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        adapter=adapter_model,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
        flow_model=flow_model,
    )
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _load_feature_extractor(folder: Path) -> Any:
    """The SVD folder's CLIP image processor (its mean/std drive the CLIP normalisation); ``None`` if absent."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(folder)


def _dtype_kwargs(library: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword: ``dtype`` for transformers >= 5 / diffusers >= 0.42, else ``torch_dtype``."""
    if dtype is None:
        return {}
    from packaging.version import Version

    module = __import__(library)
    new = Version(module.__version__).release >= ((5,) if library == "transformers" else (0, 42))
    return {"dtype" if new else "torch_dtype": dtype}


def is_pipeline_folder(path: str | os.PathLike[str]) -> bool:
    """True for a local folder written by ``MofaVideoPipeline.save_pretrained`` (model_index.json with ``adapter``)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    return "adapter" in json.loads(index.read_text())


def load_pipeline_folder(
    folder: str | os.PathLike[str],
    pipeline_cls: type[MofaVideoPipeline] | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    device: torch.device | str | None = None,
    **components: Any,
) -> MofaVideoPipeline:
    """Load a saved pipeline folder component by component (``model_index.json`` names each class).

    diffusers' generic loader resolves a component's base class through its *module*, which fails for classes
    defined in sub-modules of a third-party package; mofa's own components are therefore loaded by their classes.
    ``components`` overrides individual parts (e.g. ``flow_model=None``).
    """
    import importlib

    from mofa.models.adapter import MofaAdapterModel
    from mofa.models.unet_injection import MofaUNetSpatioTemporalConditionModel

    if pipeline_cls is None:
        from mofa.pipelines.pipeline_mofa import MofaVideoPipeline as pipeline_cls
    root = Path(folder)
    entries = json.loads((root / "model_index.json").read_text())
    ours: dict[str, Any] = {"unet": MofaUNetSpatioTemporalConditionModel, "adapter": MofaAdapterModel}
    for name, spec in entries.items():
        if name.startswith("_") or name in components:
            continue
        library, class_name = spec if isinstance(spec, (list, tuple)) else (None, None)
        if library is None or class_name is None:
            components[name] = None
            continue
        if name == "flow_model":
            from mofa.models.cmp import CMPModel

            model_cls: Any = CMPModel
        else:
            model_cls = ours.get(name) or getattr(importlib.import_module(library), class_name)
        top = model_cls.__module__.split(".")[0]
        sub = root / name
        if name in ("scheduler", "feature_extractor"):
            components[name] = model_cls.from_pretrained(sub)
        elif top == "transformers":
            components[name] = model_cls.from_pretrained(sub, **_dtype_kwargs("transformers", torch_dtype))
        else:
            has_variant = variant is not None and any(sub.glob(f"*.{variant}.safetensors"))
            extra = {"variant": variant} if has_variant else {}
            components[name] = model_cls.from_pretrained(sub, **_dtype_kwargs("diffusers", torch_dtype), **extra)
    pipe = pipeline_cls(**components)
    return pipe.to(device) if device is not None else pipe
