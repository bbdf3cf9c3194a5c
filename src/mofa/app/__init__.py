"""The Gradio app (``mofa app``): draw trajectories and brushes, preview, generate, download.

Only this package imports gradio. ``build_demo`` and ``launch`` are imported lazily so ``import mofa.app`` is cheap;
nothing launches at import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_demo", "launch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mofa.app import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'mofa.app' has no attribute {name!r}")
