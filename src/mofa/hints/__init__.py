"""User hints on the input image: drags (trajectories), motion / static brushes, and their JSON file format.

Coordinates are xy pixels of the input image; sizes are (height, width). See docs/formats.md.
"""

from __future__ import annotations

from mofa.hints.brush import MotionBrush, brush_from_circles
from mofa.hints.drag import DragHint, resample_polyline
from mofa.hints.schema import FORMAT_VERSION, HintSet, load_hints, save_hints

__all__ = [
    "FORMAT_VERSION",
    "DragHint",
    "HintSet",
    "MotionBrush",
    "brush_from_circles",
    "load_hints",
    "resample_polyline",
    "save_hints",
]
