"""Pictures of predicted parts with a legend (demo/demo.py, :class:`~part_distillation.engine.PartPredictor`).

One colour per part *label*: a part class for class-aware models (stages 3/4), or, for class-agnostic models
(stage-1 segments, stage-2 proposals), the segment's rank inside its object ("segment 1", "segment 2", ...):
two objects' "segment 1" share a colour but are not the same part. Colours come from detectron2's
``colormap`` (distinct, saturated). The legend swatches are drawn in exactly the legend's colours; inside a
part the picture is ``(1 - ALPHA) · image + ALPHA · colour``.
"""

import cv2
import numpy as np
from detectron2.utils.colormap import colormap

__all__ = ["ALPHA", "part_label_names", "legend_colors", "render_parts_with_legend"]

ALPHA = 0.55
_LEGEND_WIDTH = 230
_ROW = 20
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def part_label_names(part_classes, object_index, class_agnostic: bool, part_names=None) -> list:
    """One legend label per part: ``segment k`` (rank inside its object) or the part class's name."""
    labels, seen = [], {}
    for cls, obj in zip(part_classes, object_index):
        if class_agnostic:
            seen[obj] = seen.get(obj, 0) + 1
            labels.append(f"segment {seen[obj]}")
        elif part_names is not None and 0 <= int(cls) < len(part_names):
            labels.append(str(part_names[int(cls)]))
        else:
            labels.append(f"part {int(cls)}")
    return labels


def legend_colors(labels) -> dict:
    """label → RGB colour (tuple of 3 ints), in order of first appearance (stable across images when
    labels appear in the same order, e.g. ``segment 1``, ``segment 2``, ...)."""
    palette = colormap(rgb=True, maximum=255).astype(np.uint8)
    order = []
    for label in labels:
        if label not in order:
            order.append(label)
    if all(label.startswith("segment ") for label in order):  # keep segment k on palette entry k-1
        order = sorted(order, key=lambda s: int(s.split()[1]))
        return {label: tuple(int(c) for c in palette[(int(label.split()[1]) - 1) % len(palette)]) for label in order}
    return {label: tuple(int(c) for c in palette[i % len(palette)]) for i, label in enumerate(order)}


def _text(canvas, text, xy, scale=0.45, color=(0, 0, 0)):
    cv2.putText(canvas, text, xy, _FONT, scale, color, 1, cv2.LINE_AA)


def render_parts_with_legend(image_bgr: np.ndarray, object_masks, part_masks, labels, title_lines=()):
    """Overlay of parts (coloured by label) and object contours (white) plus a legend panel on the right.

    Args:
        image_bgr: (H, W, 3) uint8.
        object_masks: (M, H, W) bool. part_masks: (P, H, W) bool. labels: P legend labels.
        title_lines: text written above the legend (e.g. where the objects came from).
    Returns:
        (canvas BGR uint8 of shape (max(H, legend height), W + legend width, 3),
         legend: list of {"label", "color": [r, g, b]}).
    """
    h, w = image_bgr.shape[:2]
    colors = legend_colors(labels)
    overlay = image_bgr.astype(np.float32)
    for mask, label in zip(part_masks, labels):
        bgr = np.array(colors[label][::-1], dtype=np.float32)
        overlay[mask] = (1 - ALPHA) * overlay[mask] + ALPHA * bgr
    overlay = np.ascontiguousarray(np.round(overlay).astype(np.uint8))
    for mask in object_masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(overlay, contours, -1, (255, 255, 255), 2)
    lines = [str(t) for t in title_lines]
    panel_h = 10 + _ROW * (len(lines) + 1 + len(colors)) + 10
    canvas = np.full((max(h, panel_h), w + _LEGEND_WIDTH, 3), 255, dtype=np.uint8)
    canvas[:h, :w] = overlay
    y = 10
    for line in lines:
        y += _ROW
        _text(canvas, line[:34], (w + 8, y - 5))
    y += _ROW
    _text(canvas, "parts:" if colors else "no parts found", (w + 8, y - 5), color=(60, 60, 60))
    legend = []
    for label, rgb in colors.items():
        y0 = y + 4
        canvas[y0 : y0 + _ROW - 6, w + 8 : w + 8 + 24] = rgb[::-1]
        y += _ROW
        _text(canvas, label[:22], (w + 40, y - 5))
        legend.append({"label": label, "color": list(rgb)})
    return canvas, legend
