"""Per-session state of the app: the prepared image and the hints drawn on it.

The state is an immutable value: every edit returns a new :class:`AppState` (``dataclasses.replace``), so handlers are
pure functions and a gradio ``gr.State`` can hold it without aliasing between sessions. It imports neither gradio nor
torch.

All coordinates are integer xy pixels of the **prepared** image (the one shown in the app, sides multiples of 64) —
the same pixels ``mofa preview IMAGE --tracks hints.json`` uses after preparing the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

__all__ = ["AppState", "BrushStamp", "EditKind", "Point"]

Point = tuple[int, int]
"""(x, y) pixel of the prepared image."""

BrushStamp = tuple[int, int, int]
"""(x, y, radius) filled circle in pixels of the prepared image (the reference app's brush click)."""

EditKind = Literal["point", "move", "static"]


@dataclass(frozen=True, eq=False)
class AppState:
    """What one browser session has drawn.

    Attributes:
        image: the prepared input image ``[H, W, 3]`` uint8 (read-only), or None before an upload.
        tracks: click polylines; the last one is the *current* track that new clicks extend. An empty trailing
            track means "the next click starts a new track".
        move_stamps, static_stamps: motion-brush / static-brush circles.
        history: the order of edits, so "undo" removes the most recent point or brush stamp, whichever it was.
        source_name: file name of the upload (for output names).
    """

    image: np.ndarray | None = None
    tracks: tuple[tuple[Point, ...], ...] = ((),)
    move_stamps: tuple[BrushStamp, ...] = ()
    static_stamps: tuple[BrushStamp, ...] = ()
    history: tuple[EditKind, ...] = ()
    source_name: str = "image"

    # ------------------------------------------------------------------ views
    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the prepared image, or None."""
        return None if self.image is None else (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def drawn_tracks(self) -> list[list[Point]]:
        """Non-empty tracks, in drawing order."""
        return [list(t) for t in self.tracks if t]

    @property
    def num_points(self) -> int:
        return sum(len(t) for t in self.tracks)

    @property
    def is_empty(self) -> bool:
        """True when nothing is drawn (no point, no brush stamp)."""
        return not self.history

    # ------------------------------------------------------------------ edits (each returns a new state)
    def with_image(self, image: np.ndarray, source_name: str = "image") -> AppState:
        """A fresh state for a new image: every hint is dropped (they were drawn on the old pixels)."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        img.setflags(write=False)
        return AppState(image=img, source_name=source_name)

    def add_point(self, point: Point) -> AppState:
        """Append ``point`` to the current track."""
        tracks = (*self.tracks[:-1], (*self.tracks[-1], point))
        return replace(self, tracks=tracks, history=(*self.history, "point"))

    def new_track(self) -> AppState:
        """Close the current track; the next click starts another one. No-op if the current track is empty."""
        if not self.tracks[-1]:
            return self
        return replace(self, tracks=(*self.tracks, ()))

    def add_stamp(self, kind: Literal["move", "static"], stamp: BrushStamp) -> AppState:
        if kind == "move":
            return replace(self, move_stamps=(*self.move_stamps, stamp), history=(*self.history, "move"))
        return replace(self, static_stamps=(*self.static_stamps, stamp), history=(*self.history, "static"))

    def undo(self) -> AppState:
        """Remove the most recent point or brush stamp. No-op when nothing is drawn."""
        if not self.history:
            return self
        last, history = self.history[-1], self.history[:-1]
        if last == "move":
            return replace(self, move_stamps=self.move_stamps[:-1], history=history)
        if last == "static":
            return replace(self, static_stamps=self.static_stamps[:-1], history=history)
        tracks = list(self.tracks)
        while not tracks[-1]:  # an empty trailing track ("new track" pressed): the point to remove is before it
            tracks.pop()
        tracks[-1] = tracks[-1][:-1]
        return replace(self, tracks=tuple(tracks) or ((),), history=history)

    def clear(self) -> AppState:
        """Drop every track and brush stamp; keep the image."""
        return AppState(image=self.image, source_name=self.source_name)
