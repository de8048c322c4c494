"""Collages for the manual evaluation of discovered parts (PartDistillation, Cho et al. 2023, supp. "Manual
evaluation", Fig. 4), and the summary of the annotators' answers.

For each object class and each of its discovered part classes, 9 random instances of the part are shown in
a 3×3 collage, the part highlighted in red inside a crop around its object. Annotators answer, per collage,
whether the highlighted region is the *same* part in (nearly) all instances ("consistent"). The paper
reports the share of consistent parts and the number of object classes with at least 3 consistent parts.

Inputs are records in the pseudo-label store format (:mod:`part_distillation.data.pseudo_labels`): a
ranked (stage-3) store, a stage-4 store, or predictions converted by :func:`records_from_predictions`
(``demo/demo.py``'s ``predictions.json``). Parts need a ``part_class``.

Instances are drawn by reservoir sampling with a seeded generator while the records stream by, so memory
holds 9 instances per (object class, part class) whatever the store's size, and reruns draw the same ones.
"""

import csv
import html
import io
import os

import cv2
import numpy as np

from ..structures.masks import decode_rle as decode_mask
from ..utils.errors import UserError
from ..utils.io import atomic_write_bytes, read_user_json
from .filters import drop_object_like_parts

__all__ = [
    "CSV_FIELDS",
    "records_from_predictions",
    "sample_part_instances",
    "render_tile",
    "make_collage",
    "write_collages",
    "parse_answer",
    "summarize_annotations",
]

CSV_FIELDS = ["object_class", "class_name", "part_class", "num_instances", "collage", "consistent"]
_RED_BGR = np.array([0, 0, 255], np.float32)


def records_from_predictions(path: str) -> list:
    """``demo/demo.py``'s ``predictions.json`` → store-format records (parts nested in their objects)."""
    data = read_user_json(path, "--predictions (demo/demo.py's predictions.json)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"--predictions {path}: expected demo/demo.py's predictions.json (a dict with 'images').")
    if data["images"] and all(image.get("class_agnostic") for image in data["images"]):
        raise UserError(
            f"--predictions {path}: these are class-agnostic parts (stage 1/2, part_class is always 0); collages "
            "need a stage-3/4 model's part classes "
            "(demo/demo.py --config-file <stage-4 config> --opts MODEL.WEIGHTS ...)."
        )
    records = []
    for image in data["images"]:
        objects = [dict(o, parts=[]) for o in image["objects"]]
        for part in image["parts"]:
            objects[part["object_id"]]["parts"].append(part)
        class_names = {o["category_id"]: o.get("category_name") for o in objects}
        records.append(
            {
                "file_name": image["file_name"],
                "height": image["height"],
                "width": image["width"],
                "objects": objects,
                "class_names": class_names,
            }
        )
    return records


def sample_part_instances(records, per_part: int = 9, seed: int = 0, max_object_iou=None):
    """Reservoir-sample ``per_part`` instances of every (object class, part class).

    Args:
        records: iterable of store-format records (parts carry ``part_class``).
        max_object_iou: when set, parts whose IoU with their object exceeds it are dropped first
            (:func:`~part_distillation.evaluation.filters.drop_object_like_parts`; the paper uses 0.5).
    Returns:
        (samples: {(object_class, part_class): [instance dicts]}, counts: {(object_class, part_class): n},
        stats: {"parts", "dropped_object_like", "without_part_class"}).
    """
    rng = np.random.default_rng(seed)
    samples, counts = {}, {}
    stats = {"parts": 0, "dropped_object_like": 0, "without_part_class": 0}
    for record in records:
        for obj in record["objects"]:
            parts = obj.get("parts", [])
            if not parts:
                continue
            keep = np.ones(len(parts), bool)
            if max_object_iou is not None:
                part_masks = np.stack([decode_mask(p["segmentation"]) for p in parts])
                keep = drop_object_like_parts(
                    part_masks, decode_mask(obj["segmentation"])[None], np.zeros(len(parts), int), max_object_iou
                )
                stats["dropped_object_like"] += int((~keep).sum())
            for part, kept in zip(parts, keep):
                stats["parts"] += 1
                if not kept:
                    continue
                if "part_class" not in part:
                    stats["without_part_class"] += 1
                    continue
                key = (int(obj.get("category_id", -1)), int(part["part_class"]))
                n = counts.get(key, 0)
                counts[key] = n + 1
                item = {
                    "file_name": record["file_name"],
                    "height": record["height"],
                    "width": record["width"],
                    "object": obj["segmentation"],
                    "part": part["segmentation"],
                }
                bucket = samples.setdefault(key, [])
                if n < per_part:
                    bucket.append(item)
                else:  # reservoir sampling (Algorithm R): every instance ends up kept with probability per_part / N
                    j = int(rng.integers(0, n + 1))
                    if j < per_part:
                        bucket[j] = item
    if stats["parts"] and stats["without_part_class"] == stats["parts"] - stats["dropped_object_like"]:
        raise UserError(
            "no part carries a 'part_class': collages need discovered part classes — give a ranked (stage-3) "
            "store, a stage-4 store, or predictions of a stage-3/4 model."
        )
    return samples, counts, stats


def render_tile(image: np.ndarray, object_mask: np.ndarray, part_mask: np.ndarray, size: int = 160) -> np.ndarray:
    """A ``size``×``size`` BGR tile: a square crop around the object (10 % margin), the part in red, the rest
    of the object as is, the background dimmed."""
    h, w = object_mask.shape
    ys, xs = np.nonzero(object_mask | part_mask)
    if len(ys) == 0:
        y0, y1, x0, x1 = 0, h, 0, w
    else:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = int(max(y1 - y0, x1 - x0) * 1.2) + 2
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    out = image.astype(np.float32)
    out[~object_mask] *= 0.45
    out[part_mask] = 0.35 * out[part_mask] + 0.65 * _RED_BGR
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(part_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), max(1, side // 120))
    canvas = np.zeros((side, side, 3), np.uint8)  # the crop, padded with black where it leaves the image
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, h), min(left + side, w)
    canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = out[sy0:sy1, sx0:sx1]
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)


def make_collage(tiles, grid: int = 3, gap: int = 4) -> np.ndarray:
    """Up to grid² equal tiles in a grid×grid collage on white (missing tiles stay white)."""
    size = tiles[0].shape[0]
    side = grid * size + (grid + 1) * gap
    canvas = np.full((side, side, 3), 255, np.uint8)
    for i, tile in enumerate(tiles[: grid * grid]):
        r, c = divmod(i, grid)
        y, x = gap + r * (size + gap), gap + c * (size + gap)
        canvas[y : y + size, x : x + size] = tile
    return canvas


def _read_image(item, cache):
    path = item["file_name"]
    if path not in cache:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        cache.clear()  # instances of one image are usually drawn together; keep one decoded image
        cache[path] = image
    image = cache[path]
    h, w = item["height"], item["width"]
    if image is None:
        return None
    return image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def _class_slug(object_class: int, name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))[:40]
    return f"{object_class:05d}_{safe}" if object_class >= 0 else f"unknown_{safe}"


_PAGE_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok));
  if (ok < imgs.length) {
    var p = document.getElementById("status");
    p.textContent = (imgs.length - ok) + " of " + imgs.length + " collages failed to load (moved or deleted files?).";
    p.style.color = "#b00";
  }
});
</script>"""


def _index_html(title: str, sections, summary: str) -> str:
    out = io.StringIO()
    out.write('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
    out.write(
        f"<title>{html.escape(title)}</title>\n<style>body{{font-family:sans-serif;margin:16px}}"
        "figure{display:inline-block;margin:6px;text-align:center}figure img{width:256px;height:256px;"
        "border:1px solid #ccc}h2{margin-top:28px}</style></head>\n<body>\n"
    )
    out.write(f'<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n<p id="status"></p>\n')
    out.write(
        "<p>Each collage shows random instances of one discovered part (red) of one object class. "
        "In collages.csv answer <b>consistent</b> = yes when the red region is the same part in "
        "(nearly) all instances, else no.</p>\n"
    )
    for heading, figures in sections:
        out.write(f"<h2>{html.escape(heading)}</h2>\n<div>\n")
        for src, caption in figures:
            out.write(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>\n"
            )
        out.write("</div>\n")
    out.write(_PAGE_SCRIPT + "\n</body></html>\n")
    return out.getvalue()


def write_collages(
    samples, counts, out_dir: str, class_names=None, title="Discovered parts", tile_size=160, progress=None
) -> dict:
    """Write ``<out_dir>/collages/<class>/part_<k>.png``, ``index.html`` and ``collages.csv`` (all atomically).

    Returns ``{"collages": n, "classes": n, "skipped_instances": n, "index": path, "csv": path}``.
    """
    names = class_names or {}
    by_class = {}
    for obj_cls, part_cls in sorted(samples):
        by_class.setdefault(obj_cls, []).append(part_cls)
    rows, sections, cache, skipped = [], [], {}, 0
    keys = [(o, p) for o in sorted(by_class) for p in by_class[o]]
    for obj_cls, part_cls in progress(keys) if progress else keys:
        tiles = []
        for item in samples[(obj_cls, part_cls)]:
            image = _read_image(item, cache)
            if image is None:
                skipped += 1
                continue
            tiles.append(render_tile(image, decode_mask(item["object"]), decode_mask(item["part"]), tile_size))
        if not tiles:
            continue
        name = names.get(obj_cls) or f"class {obj_cls}"
        rel = f"collages/{_class_slug(obj_cls, name)}/part_{part_cls:02d}.png"
        ok, png = cv2.imencode(".png", make_collage(tiles))
        if not ok:
            raise RuntimeError(f"cv2 could not encode {rel}")
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        atomic_write_bytes(os.path.join(out_dir, rel), png.tobytes())
        rows.append(
            {
                "object_class": obj_cls,
                "class_name": name,
                "part_class": part_cls,
                "num_instances": counts[(obj_cls, part_cls)],
                "collage": rel,
                "consistent": "",
            }
        )
    for obj_cls in sorted(by_class):
        figures = [
            (r["collage"], f"part {r['part_class']} ({r['num_instances']} instances)")
            for r in rows
            if r["object_class"] == obj_cls
        ]
        if figures:
            sections.append((f"{names.get(obj_cls) or f'class {obj_cls}'} (id {obj_cls})", figures))
    os.makedirs(out_dir, exist_ok=True)
    summary = f"{len(rows)} parts of {len(sections)} object classes; up to 9 random instances each."
    index = os.path.join(out_dir, "index.html")
    atomic_write_bytes(index, _index_html(title, sections, summary).encode("utf-8"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = os.path.join(out_dir, "collages.csv")
    atomic_write_bytes(csv_path, buf.getvalue().encode("utf-8"))
    return {
        "collages": len(rows),
        "classes": len(sections),
        "skipped_instances": skipped,
        "index": index,
        "csv": csv_path,
    }


_YES, _NO = {"yes", "y", "1", "true", "consistent"}, {"no", "n", "0", "false", "inconsistent"}


def parse_answer(value: str, where: str) -> bool:
    """An annotator's ``consistent`` cell → bool; anything but yes/no (y/n, 1/0, true/false) is an error."""
    v = (value or "").strip().lower()
    if v in _YES:
        return True
    if v in _NO:
        return False
    raise UserError(f"{where}: consistent={value!r}; answer yes or no for every part (an empty cell is not an answer).")


def summarize_annotations(rows, min_consistent: int = 3, source: str = "collages.csv") -> dict:
    """The paper's numbers from annotated rows (dicts with ``object_class``, ``consistent``, ...).

    Returns ``{"parts", "consistent_parts", "consistent_share" (%), "classes",
    "classes_with_min_consistent" (classes with ≥ ``min_consistent`` consistent parts), "min_consistent",
    "per_class": {object_class: {"class_name", "parts", "consistent"}}}``.
    """
    per_class = {}
    for i, row in enumerate(rows):
        for key in ("object_class", "consistent"):
            if key not in row:
                raise UserError(f"{source}: column {key!r} is missing; annotate the CSV that make_collages.py wrote.")
        answer = parse_answer(
            row["consistent"], f"{source} row {i + 2} (class {row['object_class']}, part {row.get('part_class')})"
        )
        entry = per_class.setdefault(
            str(row["object_class"]), {"class_name": row.get("class_name", ""), "parts": 0, "consistent": 0}
        )
        entry["parts"] += 1
        entry["consistent"] += int(answer)
    parts = sum(e["parts"] for e in per_class.values())
    consistent = sum(e["consistent"] for e in per_class.values())
    if parts == 0:
        raise UserError(f"{source} has no annotated parts.")
    return {
        "parts": parts,
        "consistent_parts": consistent,
        "consistent_share": 100.0 * consistent / parts,
        "classes": len(per_class),
        "classes_with_min_consistent": sum(e["consistent"] >= min_consistent for e in per_class.values()),
        "min_consistent": min_consistent,
        "per_class": per_class,
    }
