"""Counted skips: every sample a mapper drops is logged with its reason and counted per reason.

Reasons are short keys (``unreadable_image``, ``mask_size_mismatch``, ``extreme_aspect_ratio``, ...;
:data:`SKIP_REASONS`). A mapper calls :func:`note_skip`; the warning names the file, the reason and how
many samples this process skipped for that reason so far (the first few of each reason, then every
power of ten, so a bad dataset cannot flood the log). Labelling (stage 1/3) also counts skips per run and
per shard in the store (see ``evaluation/pseudo_label_writer.py``); training logs them here.
"""

import logging
from collections import Counter

__all__ = ["SKIP_REASONS", "note_skip", "skip_counts", "reset_skip_counts", "reason_key"]

logger = logging.getLogger(__name__)

SKIP_REASONS = {
    "unreadable_image": "the image file is missing, empty, corrupt or truncated (the detail says which)",
    "degenerate_image": "the image is less than 2 pixels wide or high",
    "size_mismatch": "the recorded height/width differ from the image",
    "mask_size_mismatch": "an annotation's RLE size differs from its image's size",
    "extreme_aspect_ratio": "the image's aspect ratio exceeds data.validation.MAX_ASPECT_RATIO",
    "empty_object_mask": "an object's mask is empty (or lies outside the image): the object is dropped",
    "object_below_min_area": "an object is smaller than MODEL.PIXEL_GROUPING.OBJECT_MIN_AREA_RATIO: dropped",
    "object_below_score": "an object scores below MODEL.PIXEL_GROUPING.OBJECT_SCORE_THRESH: dropped",
    "object_beyond_topk": "an object is not among the MODEL.PIXEL_GROUPING.OBJECT_TOPK best: dropped",
    "object_without_class": "(evaluation) an object has no class for a model with per-object-class part classifiers",
    "annotation_without_image": "(loader) an annotation's image_id is no image of the JSON: dropped",
    "invalid_polygon": "(loader) an annotation has no polygon of 3 or more points: dropped",
}

_COUNTS = Counter()
_ALWAYS_LOGGED = 5


def reason_key(reason: str) -> str:
    """``"truncated_image: JPEG ..."`` → ``"truncated_image"`` (the key before the first colon)."""
    return str(reason).split(":", 1)[0].strip() or "unknown"


def note_skip(reason: str, file_name: str, detail: str = "", what: str = "Skipping", count: int = 1) -> str:
    """Count (``count`` times) and log one skip; returns ``"<reason>: <detail>"`` (what labelling stores)."""
    _COUNTS[reason] += count
    n = _COUNTS[reason]
    if n <= _ALWAYS_LOGGED or str(n).rstrip("0") == "1":  # 1..5, 10, 100, 1000, ...
        logger.warning(
            "%s %s: %s%s (%d skipped for this reason in this process)",
            what,
            file_name,
            reason,
            f": {detail}" if detail else "",
            n,
        )
    return f"{reason}: {detail}" if detail else reason


def skip_counts() -> dict:
    """Skips counted in this process so far, by reason."""
    return dict(_COUNTS)


def reset_skip_counts() -> None:
    """Forget the counts of this process (a new run in the same process logs its first skips again)."""
    _COUNTS.clear()
