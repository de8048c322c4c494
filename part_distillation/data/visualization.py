"""Pictures of pseudo-labels (used by tools/inspect_pseudo_labels.py and tools/make_pseudo_labels.py --vis)."""

import cv2
import numpy as np

from ..structures.masks import decode_rle as decode_mask
from ..utils.io import atomic_write_bytes

__all__ = ["render_pseudo_labels"]


def render_pseudo_labels(record: dict, path: str) -> str:
    """Write one overlay of a store record to ``path`` (atomically): parts coloured, object contours white."""
    h, w = record["height"], record["width"]
    image = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)
    if image is None:  # missing/unreadable: draw on grey so the labels are still visible
        image = np.full((h, w, 3), 127, dtype=np.uint8)
    elif image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    canvas = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for obj in record["objects"]:
        for part in obj["parts"]:
            mask = decode_mask(part["segmentation"])
            colour = rng.integers(40, 256, size=3).astype(np.float32)
            canvas[mask] = 0.45 * canvas[mask] + 0.55 * colour
    canvas = np.ascontiguousarray(canvas.astype(np.uint8))
    for obj in record["objects"]:
        mask = decode_mask(obj["segmentation"]).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, (255, 255, 255), 1)
    ok, png = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError("cv2 could not encode a PNG")
    atomic_write_bytes(path, png.tobytes())
    return path
