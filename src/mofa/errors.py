"""Error types raised at public boundaries.

``MofaInputError`` marks a problem with what the user gave us (a file, a value, a flag). The CLI turns it into a
one-line message and exit code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MofaInputError(ValueError):
    """Invalid user input. The message names the bad value and how to fix it, on one line."""
