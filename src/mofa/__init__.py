"""mofa: controllable image animation with MOFA-Adapters on a frozen Stable Video Diffusion.

The public API is small and imported lazily so that ``import mofa`` and ``mofa --help`` stay fast:

- ``MofaVideoPipeline``: image + hints → video with SVD-XT and a MOFA-Adapter.
- ``CMPModel``, ``MofaAdapterModel``: the weight-bearing models (released checkpoints load unchanged).
- ``DragHint``, ``MotionBrush``, ``HintSet``: user hints.
- ``preview``: weight-free animation (classic sparse-to-dense + forward warping).
- ``export_video``: write frames to mp4 / gif.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MofaVideoPipeline": "mofa.pipelines.pipeline_mofa",
    "MofaVideoPipelineOutput": "mofa.pipelines.pipeline_mofa",
    "CMPModel": "mofa.models.cmp",
    "MofaAdapterModel": "mofa.models.adapter",
    "MofaUNetSpatioTemporalConditionModel": "mofa.models.unet_injection",
    "DragHint": "mofa.hints.drag",
    "MotionBrush": "mofa.hints.brush",
    "HintSet": "mofa.hints.schema",
    "preview": "mofa.pipelines.preview",
    "export_video": "mofa.io.video",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mofa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
