"""Reusable sanity checks on detectron2 dataset dicts (a registered dataset's records + metadata).

Every problem is a :class:`Finding` ``(severity, check, file, detail)`` with severity ``"error"``
(the sample is dropped or crashes at load/train/eval time, or evaluation is wrong) or
``"warning"`` (it loads, but not as one might assume: e.g. a CMYK JPEG converted to RGB). The
check names are the keys of :data:`CHECKS`.

Image checks are cheap by default: ``PIL.Image.open`` reads the header, ``verify()`` the chunk
CRCs (PNG), and a JPEG is fully decoded only when its end-of-image marker is missing (the usual
sign of a truncated download). :func:`check_image_file` is what a loader should call to explain
why it skips a file (see ``read_image_or_none`` in dataset_mappers/instance_lsj.py).

Record checks need no image I/O: RLE sizes and areas come from the RLE header, polygons are
checked against ``height``/``width``, category ids against the metadata class lists, and a part's
``object_index``/``object_id`` against the record's object list (``annotations`` when the record
has ``part_annotations``, else ``object_annotations``).
"""

import collections
import numbers
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

__all__ = [
    "ERROR",
    "WARNING",
    "CHECKS",
    "Finding",
    "check_image_file",
    "check_annotations",
    "check_record",
    "check_duplicate_image_ids",
    "check_load_drops",
    "validate_dataset_dicts",
    "summarize_findings",
    "format_summary_table",
]

ERROR, WARNING = "error", "warning"

CHECKS = {
    "missing_image": "image file does not exist (or the record has no file_name)",
    "empty_file": "image file has 0 bytes",
    "unreadable_image": "PIL cannot identify/open the file",
    "corrupt_image": "PIL verify() or decoding fails",
    "truncated_image": "JPEG without end-of-image marker (decoding fails or stops early)",
    "cmyk_image": "CMYK image: the loader converts it to RGB without colour management",
    "high_bit_depth": "16-bit (or 32-bit) image: the loader reduces it to 8 bits",
    "exif_rotation": "EXIF orientation makes the decoded size differ from the recorded height/width",
    "size_mismatch": "recorded height/width differ from the image size",
    "degenerate_image": "image is 1 pixel wide or high (or empty)",
    "mask_outside_image": "RLE size differs from the image size, or polygon coordinates out of bounds",
    "empty_mask": "annotation mask has zero area",
    "invalid_mask": "segmentation cannot be interpreted (bad RLE, polygon with < 3 points)",
    "unknown_category": "category_id missing or not an index of the metadata class list",
    "dangling_object_ref": "a part's object_index/object_id points to no object of the record",
    "duplicate_image_id": "image_id used by more than one record",
    "alpha_channel": "image has an alpha channel (RGBA, LA, PA, transparent palette): the loader drops it",
    "extreme_aspect_ratio": "image is more than MAX_ASPECT_RATIO times wider than high (or the reverse)",
    "tiny_mask": "mask has fewer pixels than the K parts pixel grouping splits an object into",
    "dropped_at_load": "the loader dropped annotations (e.g. pointing to a missing image id): see the count",
}

# Stage 1 resizes the longer side to INPUT.IMAGE_SIZE; beyond this ratio the short side shrinks to a few
# pixels (the grouping mapper refuses such images, see dataset_mappers/pixel_grouping.py).
MAX_ASPECT_RATIO = 20.0

# EXIF orientations (tag 0x0112) that transpose the image: decoded width/height are swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Polygon coordinates up to this far outside [0, W] x [0, H] are ordinary rounding, not faults.
_POLYGON_TOLERANCE = 1.0


class Finding(NamedTuple):
    severity: str  # ERROR or WARNING
    check: str  # a key of CHECKS
    file: str  # the image file (or "" when a record has none)
    detail: str


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _png_bit_depth(path):
    """Bit depth from a PNG's IHDR chunk (the first chunk, at a fixed offset), or None."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">B", head[24:25])[0]


def _jpeg_has_end_marker(path, size):
    # In entropy-coded JPEG data 0xFF is always stuffed, so FF D9 only occurs as the EOI marker;
    # a few trailing padding bytes after it are common, hence the search in the last KiB.
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        return _JPEG_EOI in f.read()


def _full_decode(path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def check_image_file(path, expected_hw=None):
    """Check one image file the way detectron2's ``read_image`` will read it.

    Args:
        path: image file.
        expected_hw: (height, width) recorded in the dataset dict; None (or None entries) skips
            the size comparison.

    Returns:
        list[Finding]: empty if the file is fine.
    """
    from PIL import Image, UnidentifiedImageError

    if not path:
        return [Finding(ERROR, "missing_image", "", "record has no file_name")]
    if not os.path.isfile(path):
        return [Finding(ERROR, "missing_image", path, "no such file")]
    size = os.path.getsize(path)
    if size == 0:
        return [Finding(ERROR, "empty_file", path, "0 bytes")]
    findings = []
    try:
        with Image.open(path) as im:  # header only
            fmt, mode, (width, height) = im.format, im.mode, im.size
            has_transparency = "transparency" in im.info
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # a damaged EXIF block: PIL's reader ignores it too when loading
                orientation = 1
        with Image.open(path) as im:  # verify() must come right after open (getexif may read on)
            im.verify()
    except UnidentifiedImageError as e:
        return [Finding(ERROR, "unreadable_image", path, f"PIL cannot identify the file ({e})")]
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
        return [Finding(ERROR, "corrupt_image", path, f"{type(e).__name__}: {e}")]

    if fmt == "JPEG" and not _jpeg_has_end_marker(path, size):
        try:
            _full_decode(path)
        except Exception as e:
            return [Finding(ERROR, "truncated_image", path, f"JPEG end marker missing, decoding fails: {e}")]
        findings.append(Finding(WARNING, "truncated_image", path, "JPEG end marker missing, but the image decodes"))
    elif fmt not in ("JPEG", "PNG"):  # verify() checks little for other formats: decode fully
        try:
            _full_decode(path)
        except Exception as e:
            return [Finding(ERROR, "corrupt_image", path, f"{fmt} decoding fails: {type(e).__name__}: {e}")]

    if mode == "CMYK":
        findings.append(
            Finding(
                WARNING, "cmyk_image", path, "CMYK; loaded with PIL Image.convert('RGB') (no ICC colour management)"
            )
        )
    bit_depth = _png_bit_depth(path) if fmt == "PNG" else None
    if mode in _HIGH_BIT_DEPTH_MODES:
        findings.append(
            Finding(
                WARNING,
                "high_bit_depth",
                path,
                f"{fmt} mode {mode}"
                + (f" ({bit_depth}-bit)" if bit_depth else "")
                + "; the loader rescales it to 8 bits (part_distillation.data.image_io)",
            )
        )
    elif bit_depth == 16:
        findings.append(
            Finding(
                WARNING,
                "high_bit_depth",
                path,
                f"16-bit PNG opened by PIL as 8-bit mode {mode} (each sample reduced to its high byte)",
            )
        )

    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and has_transparency):
        findings.append(Finding(WARNING, "alpha_channel", path, f"mode {mode}: the loader drops the alpha channel"))
    # detectron2's read_image applies the EXIF orientation before returning the array.
    raw_hw = (height, width)
    loaded_hw = (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else raw_hw
    if min(loaded_hw) < 2:
        findings.append(Finding(ERROR, "degenerate_image", path, f"image is {loaded_hw[0]}x{loaded_hw[1]} (HxW)"))
    elif max(loaded_hw) / min(loaded_hw) > MAX_ASPECT_RATIO:
        findings.append(
            Finding(
                ERROR,
                "extreme_aspect_ratio",
                path,
                f"image is {loaded_hw[0]}x{loaded_hw[1]} (HxW), aspect ratio above {MAX_ASPECT_RATIO:g}: stage 1 "
                "skips it; crop or pad it",
            )
        )
    if expected_hw is not None and None not in tuple(expected_hw):
        expected_hw = (int(expected_hw[0]), int(expected_hw[1]))
        if loaded_hw != expected_hw:
            if orientation in _TRANSPOSING_ORIENTATIONS and raw_hw == expected_hw:
                findings.append(
                    Finding(
                        ERROR,
                        "exif_rotation",
                        path,
                        f"EXIF orientation {orientation}: decoded as {loaded_hw[0]}x{loaded_hw[1]} but recorded "
                        f"{expected_hw[0]}x{expected_hw[1]} (the stored, unrotated size; annotations are likely in "
                        "that frame); detectron2 read_image rotates, so the size check fails",
                    )
                )
            else:
                extra = f" (after EXIF orientation {orientation})" if orientation != 1 else ""
                findings.append(
                    Finding(
                        ERROR,
                        "size_mismatch",
                        path,
                        f"recorded {expected_hw[0]}x{expected_hw[1]}, image is {loaded_hw[0]}x{loaded_hw[1]}{extra}",
                    )
                )
    return findings


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------


def _meta_get(metadata, key):
    if metadata is None:
        return None
    if isinstance(metadata, dict):
        return metadata.get(key)
    return metadata.get(key, None)


def _polygon_area(poly):
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def _check_segmentation(segm, hw, where, file, min_pixels=0):
    findings = _check_segmentation_shape(segm, hw, where, file)
    if min_pixels and not any(f.check in ("invalid_mask", "empty_mask") for f in findings):
        from ..structures.masks import rle_area

        area = rle_area(segm) if isinstance(segm, dict) else sum(_polygon_area([float(v) for v in p]) for p in segm)
        if 0 < area < min_pixels:
            findings.append(
                Finding(WARNING, "tiny_mask", file, f"{where}: {area:g} pixel(s), fewer than K={min_pixels} parts")
            )
    return findings


def _check_segmentation_shape(segm, hw, where, file):
    findings = []
    if isinstance(segm, dict):
        size = segm.get("size")
        if size is None or "counts" not in segm:
            return [Finding(ERROR, "invalid_mask", file, f"{where}: RLE without size/counts")]
        if hw is not None and [int(v) for v in size] != list(hw):
            findings.append(
                Finding(ERROR, "mask_outside_image", file, f"{where}: RLE size {list(size)} != image size {list(hw)}")
            )
        from ..structures.masks import rle_area

        try:
            area = rle_area(segm)
        except Exception as e:  # pycocotools raises generic errors on malformed counts
            return findings + [Finding(ERROR, "invalid_mask", file, f"{where}: bad RLE ({e})")]
        if area == 0:
            findings.append(Finding(WARNING, "empty_mask", file, f"{where}: RLE has zero area"))
        return findings
    if isinstance(segm, (list, tuple)):
        polygons = list(segm)
        if not polygons:
            return [Finding(WARNING, "empty_mask", file, f"{where}: no polygons")]
        total_area = 0.0
        for k, poly in enumerate(polygons):
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                findings.append(
                    Finding(ERROR, "invalid_mask", file, f"{where}: polygon {k} has {len(poly)} coordinates")
                )
                continue
            poly = [float(v) for v in poly]
            total_area += _polygon_area(poly)
            if hw is None:
                continue
            h, w = hw
            xs, ys = poly[0::2], poly[1::2]
            t = _POLYGON_TOLERANCE
            if min(xs) < -t or min(ys) < -t or max(xs) > w + t or max(ys) > h + t:
                outside = max(xs) <= 0 or max(ys) <= 0 or min(xs) >= w or min(ys) >= h
                findings.append(
                    Finding(
                        ERROR if outside else WARNING,
                        "mask_outside_image",
                        file,
                        f"{where}: polygon {k} spans x [{min(xs):g}, {max(xs):g}], y [{min(ys):g}, {max(ys):g}] "
                        f"for a {w}x{h} (WxH) image" + (" (entirely outside)" if outside else ""),
                    )
                )
        if total_area == 0 and not any(f.check == "invalid_mask" for f in findings):
            findings.append(Finding(WARNING, "empty_mask", file, f"{where}: polygons have zero area"))
        return findings
    return [Finding(ERROR, "invalid_mask", file, f"{where}: segmentation of type {type(segm).__name__}")]


def _object_and_part_lists(record):
    """(objects, parts, key of the objects list) when the record links parts to objects, else None."""
    if "object_annotations" in record:
        return record["object_annotations"], record.get("annotations", []), "object_annotations"
    if "part_annotations" in record:
        return record.get("annotations", []), record["part_annotations"], "annotations"
    return None


def check_annotations(record, metadata=None, min_mask_pixels=0):
    """Annotation checks of one record (no image I/O); see the module docstring. ``min_mask_pixels``:
    warn about masks with fewer pixels (K, the parts pixel grouping makes per object; 0: no check)."""
    file = record.get("file_name", "")
    hw = None
    if record.get("height") is not None and record.get("width") is not None:
        hw = (int(record["height"]), int(record["width"]))
    findings = []
    class_lists = {
        "annotations": _meta_get(metadata, "thing_classes"),
        "part_annotations": _meta_get(metadata, "part_classes"),
        "object_annotations": _meta_get(metadata, "object_classes"),
    }
    for key, classes in class_lists.items():
        for i, anno in enumerate(record.get(key) or []):
            where = f"{key}[{i}]"
            if classes is not None:
                cid = anno.get("category_id")
                if not isinstance(cid, numbers.Integral) or isinstance(cid, bool) or not 0 <= cid < len(classes):
                    findings.append(
                        Finding(
                            ERROR,
                            "unknown_category",
                            file,
                            f"{where}: category_id {cid!r} not in 0..{len(classes) - 1}",
                        )
                    )
            if anno.get("segmentation") is not None:
                findings += _check_segmentation(anno["segmentation"], hw, where, file, min_mask_pixels)
            elif key == "part_annotations" or (key == "annotations" and _meta_get(metadata, "is_part_dataset")):
                findings.append(Finding(ERROR, "invalid_mask", file, f"{where}: no segmentation"))

    linked = _object_and_part_lists(record)
    if linked is not None:
        objects, parts, objects_key = linked
        parts_key = "annotations" if objects_key == "object_annotations" else "part_annotations"
        object_ids = {o.get(k) for o in objects for k in ("id", "object_id")} - {None}
        for i, part in enumerate(parts):
            where = f"{parts_key}[{i}]"
            index = part.get("object_index")
            if index is not None:
                if not isinstance(index, numbers.Integral) or not 0 <= index < len(objects):
                    findings.append(
                        Finding(
                            ERROR,
                            "dangling_object_ref",
                            file,
                            f"{where}: object_index {index!r} but {objects_key} has {len(objects)} entries",
                        )
                    )
                    continue
            object_id = part.get("object_id")
            if object_id is None:
                continue
            if object_id not in object_ids:
                findings.append(
                    Finding(
                        ERROR, "dangling_object_ref", file, f"{where}: object_id {object_id!r} is not in {objects_key}"
                    )
                )
            elif index is not None and object_id not in (objects[index].get("id"), objects[index].get("object_id")):
                findings.append(
                    Finding(
                        ERROR,
                        "dangling_object_ref",
                        file,
                        f"{where}: object_index {index} is object {objects[index].get('id')!r}, "
                        f"but object_id is {object_id!r}",
                    )
                )
    return findings


def check_record(record, metadata=None, check_images=True, min_mask_pixels=0):
    """All per-record checks: the image file (optional) and the annotations."""
    findings = []
    if check_images:
        findings += check_image_file(record.get("file_name", ""), (record.get("height"), record.get("width")))
    return findings + check_annotations(record, metadata, min_mask_pixels)


def check_load_drops(metadata):
    """A warning per reason for which the dataset's loader dropped annotations (metadata ``load_drops``)."""
    drops = _meta_get(metadata, "load_drops") or {}
    file = _meta_get(metadata, "json_file") or ""
    return [
        Finding(WARNING, "dropped_at_load", file, f"{n} annotation(s) dropped by the loader: {reason}")
        for reason, n in sorted(drops.items())
        if n
    ]


def check_duplicate_image_ids(records):
    """One error per record whose ``image_id`` an earlier record already uses."""
    first = {}
    findings = []
    for record in records:
        image_id = record.get("image_id")
        if image_id is None:
            continue
        if image_id in first:
            findings.append(
                Finding(
                    ERROR,
                    "duplicate_image_id",
                    record.get("file_name", ""),
                    f"image_id {image_id!r} also used by {first[image_id]}",
                )
            )
        else:
            first[image_id] = record.get("file_name", "")
    return findings


def validate_dataset_dicts(records, metadata=None, num_workers=1, check_images=True, progress=False, min_mask_pixels=0):
    """Run every check on ``records``; findings come back in record order.

    Args:
        num_workers: threads for the per-record checks (image header reads are I/O bound).
        progress: show a tqdm progress bar (on stderr).
    """
    records = list(records)

    def run(record):
        return check_record(record, metadata, check_images, min_mask_pixels)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="validating", unit="img")
    results = []
    if num_workers and num_workers > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            for findings in pool.map(run, records):
                results.append(findings)
                if bar is not None:
                    bar.update(1)
    else:
        for record in records:
            results.append(run(record))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    findings = [f for per_record in results for f in per_record]
    return check_load_drops(metadata) + findings + check_duplicate_image_ids(records)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def summarize_findings(findings, max_examples=3):
    """check -> {"severity", "count", "examples": [(file, detail)]}; errors first, then by count."""
    groups = collections.OrderedDict()
    for f in findings:
        key = (f.check, f.severity)
        g = groups.setdefault(key, {"check": f.check, "severity": f.severity, "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < max_examples:
            g["examples"].append((f.file, f.detail))
    return sorted(groups.values(), key=lambda g: (g["severity"] != ERROR, -g["count"], g["check"]))


def format_summary_table(findings, num_records=None, max_examples=3):
    """A plain-text table: check, severity, count, examples (one per line)."""
    rows = summarize_findings(findings, max_examples)
    errors = sum(g["count"] for g in rows if g["severity"] == ERROR)
    warnings = sum(g["count"] for g in rows if g["severity"] == WARNING)
    head = f"{errors} error(s), {warnings} warning(s)" + (
        f" in {num_records} record(s)" if num_records is not None else ""
    )
    if not rows:
        return head + ": no problems found"
    width = max(len("check"), *(len(g["check"]) for g in rows))
    lines = [head, f"{'check':<{width}}  {'severity':<8}  {'count':>6}  examples", "-" * (width + 30)]
    for g in rows:
        first = True
        for file, detail in g["examples"]:
            prefix = f"{g['check']:<{width}}  {g['severity']:<8}  {g['count']:>6}" if first else " " * (width + 18)
            lines.append(f"{prefix}  {os.path.basename(file) or '-'}: {detail}")
            first = False
    return "\n".join(lines)
