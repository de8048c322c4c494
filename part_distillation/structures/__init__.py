"""Low-level data structures shared by data, modeling, evaluation and tools (no registrations, no I/O)."""

from .masks import decode_segmentation  # noqa: F401
