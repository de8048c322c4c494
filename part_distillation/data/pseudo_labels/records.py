"""Pseudo-label records (the schema in the package docstring): building them, checking them, and turning
them into detectron2 dataset dicts. Masks are compressed COCO RLEs (``structures/masks.py``)."""

import numbers

import numpy as np
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from ...structures.masks import decode_rle as decode_mask
from ...structures.masks import encode_mask, rle_area, segmentation_to_rle

__all__ = [
    "decode_mask",
    "encode_mask",
    "mask_area",
    "rle_bbox_xywh",
    "make_part",
    "make_object",
    "jsonable",
    "validate_record",
    "record_to_dataset_dict",
]


def mask_area(rle: dict) -> int:
    """Pixel count of an RLE mask, without decoding it."""
    return rle_area(rle)


def _compressed(rle: dict) -> dict:
    height, width = (int(s) for s in rle["size"])
    return segmentation_to_rle(rle, height, width)


def rle_bbox_xywh(rle: dict) -> list:
    """The XYWH_ABS box of an RLE mask ([0, 0, 0, 0] when empty), without decoding it."""
    return [float(v) for v in mask_util.toBbox(_compressed(rle))]


def _as_rle(mask_or_rle) -> dict:
    if isinstance(mask_or_rle, dict):
        rle = _compressed(mask_or_rle)
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return encode_mask(mask_or_rle)


def make_part(mask_or_rle, score: float = 1.0, part_class=None, soft_scores=None) -> dict:
    """A part entry from a boolean mask (or an RLE); optional fields are left out when None."""
    part = {"segmentation": _as_rle(mask_or_rle), "score": float(score)}
    if part_class is not None:
        part["part_class"] = int(part_class)
    if soft_scores is not None:
        part["soft_scores"] = [float(s) for s in np.asarray(soft_scores, dtype=np.float64).ravel()]
    return part


def make_object(mask_or_rle, parts, score: float = 1.0, category_id: int = -1) -> dict:
    """An object entry; its XYXY_ABS box is computed from the mask ([0, 0, 0, 0] when empty)."""
    rle = _as_rle(mask_or_rle)
    x, y, w, h = rle_bbox_xywh(rle)
    return {
        "category_id": int(category_id),
        "score": float(score),
        "bbox": [x, y, x + w, y + h],
        "segmentation": rle,
        "parts": list(parts),
    }


def _where(record, what):
    image_id = record.get("image_id", "?") if isinstance(record, dict) else "?"
    return f"pseudo-label record (image_id={image_id!r}): {what}"


def _as_int(value, record, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(_where(record, f"{what} must be an int, got {value!r}"))
    return int(value)


def _as_float(value, record, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(_where(record, f"{what} must be a finite float, got {value!r}"))
    return float(value)


def _check_rle(rle, size, record, what):
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        raise ValueError(_where(record, f"{what} must be a COCO RLE dict {{size, counts}}; use encode_mask()"))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise ValueError(_where(record, f"{what}.counts must be a compressed RLE string; use encode_mask()"))
    rle_size = [int(s) for s in rle["size"]]
    if rle_size != size:
        raise ValueError(_where(record, f"{what} has size {rle_size}, but the record's height/width is {size}"))
    return {"size": rle_size, "counts": counts}


def jsonable(value, record, what):
    """``value`` as plain JSON types (numpy scalars/arrays are converted); for a value JSON cannot hold, a
    ValueError names ``what`` in ``record``. Used for extra (non-schema) record keys and for configs."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _as_float(value, record, what)
    if isinstance(value, (list, tuple)):
        return [jsonable(v, record, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): jsonable(v, record, f"{what}.{k}") for k, v in value.items()}
    raise ValueError(_where(record, f"{what} is a {type(value).__name__}, which JSON cannot hold"))


def validate_record(record: dict) -> dict:
    """Check ``record`` against the schema (package docstring) and return a canonical copy.

    numpy scalars become Python numbers, RLE counts become str, a missing object ``bbox`` is
    computed from its mask. Keys outside the schema are kept if JSON can hold them.
    """
    if not isinstance(record, dict):
        raise ValueError(f"pseudo-label records are dicts, got {type(record).__name__}")
    for key in ("image_id", "file_name", "height", "width", "objects"):
        if key not in record:
            raise ValueError(_where(record, f"missing key {key!r}"))
    out = {}
    for key, value in record.items():
        if key in ("image_id", "file_name", "height", "width", "class_code", "objects", "index"):
            continue
        out[key] = jsonable(value, record, key)
    image_id = record["image_id"]
    if isinstance(image_id, np.generic):
        image_id = image_id.item()
    if isinstance(image_id, bool) or not isinstance(image_id, (str, numbers.Integral)):
        raise ValueError(_where(record, "image_id must be a str or an int"))
    out["image_id"] = image_id if isinstance(image_id, str) else int(image_id)
    if not isinstance(record["file_name"], str) or not record["file_name"]:
        raise ValueError(_where(record, "file_name must be the image's full path"))
    out["file_name"] = record["file_name"]
    out["height"] = _as_int(record["height"], record, "height")
    out["width"] = _as_int(record["width"], record, "width")
    if out["height"] <= 0 or out["width"] <= 0:
        raise ValueError(_where(record, "height and width must be positive"))
    class_code = record.get("class_code")
    if class_code is not None and not isinstance(class_code, str):
        raise ValueError(_where(record, "class_code must be a str or None"))
    out["class_code"] = class_code
    size = [out["height"], out["width"]]
    objects = []
    for j, obj in enumerate(record["objects"]):
        where = f"objects[{j}]"
        if not isinstance(obj, dict) or "segmentation" not in obj or "parts" not in obj:
            raise ValueError(_where(record, f"{where} needs 'segmentation' and 'parts'; use make_object()"))
        o = {
            k: jsonable(v, record, f"{where}.{k}")
            for k, v in obj.items()
            if k not in ("category_id", "score", "bbox", "segmentation", "parts")
        }
        o["category_id"] = _as_int(obj.get("category_id", -1), record, f"{where}.category_id")
        o["score"] = _as_float(obj.get("score", 1.0), record, f"{where}.score")
        o["segmentation"] = _check_rle(obj["segmentation"], size, record, f"{where}.segmentation")
        if obj.get("bbox") is None:
            x, y, w, h = rle_bbox_xywh(o["segmentation"])
            o["bbox"] = [x, y, x + w, y + h]
        else:
            box = list(obj["bbox"])
            if len(box) != 4:
                raise ValueError(_where(record, f"{where}.bbox must be [x0, y0, x1, y1]"))
            o["bbox"] = [_as_float(v, record, f"{where}.bbox") for v in box]
        parts = []
        for i, part in enumerate(obj["parts"]):
            pwhere = f"{where}.parts[{i}]"
            if not isinstance(part, dict) or "segmentation" not in part:
                raise ValueError(_where(record, f"{pwhere} needs 'segmentation'; use make_part()"))
            p = {
                k: jsonable(v, record, f"{pwhere}.{k}")
                for k, v in part.items()
                if k not in ("segmentation", "score", "part_class", "soft_scores")
            }
            p["segmentation"] = _check_rle(part["segmentation"], size, record, f"{pwhere}.segmentation")
            p["score"] = _as_float(part.get("score", 1.0), record, f"{pwhere}.score")
            if part.get("part_class") is not None:
                p["part_class"] = _as_int(part["part_class"], record, f"{pwhere}.part_class")
            if part.get("soft_scores") is not None:
                p["soft_scores"] = [
                    _as_float(s, record, f"{pwhere}.soft_scores") for s in np.asarray(part["soft_scores"]).ravel()
                ]
            parts.append(p)
        o["parts"] = parts
        objects.append(o)
    out["objects"] = objects
    return out


def record_to_dataset_dict(record: dict) -> dict:
    """A store record → a detectron2 dataset dict whose annotations are the parts.

    Each part annotation carries ``segmentation`` (RLE), ``bbox`` (XYWH_ABS), ``category_id``
    (``part_class`` when present, else 0), ``object_id`` (index into ``objects``) and ``score``.
    ``objects`` holds the objects in the same annotation format (their ``category_id`` may be -1).
    """
    out = {
        "file_name": record["file_name"],
        "height": record["height"],
        "width": record["width"],
        "image_id": record["image_id"],
        "pseudo_label_index": record["index"],
    }
    if record.get("class_code") is not None:
        out["class_code"] = record["class_code"]
    annotations, objects = [], []
    for j, obj in enumerate(record["objects"]):
        x0, y0, x1, y1 = obj["bbox"]
        objects.append(
            {
                "object_id": j,
                "segmentation": obj["segmentation"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": obj["category_id"],
                "score": obj["score"],
                "iscrowd": 0,
            }
        )
        for part in obj["parts"]:
            ann = {
                "segmentation": part["segmentation"],
                "bbox": rle_bbox_xywh(part["segmentation"]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": part.get("part_class", 0),
                "object_id": j,
                "score": part["score"],
                "iscrowd": 0,
            }
            if "part_class" in part:
                ann["part_class"] = part["part_class"]
            if "soft_scores" in part:
                ann["soft_scores"] = part["soft_scores"]
            annotations.append(ann)
    out["annotations"] = annotations
    out["objects"] = objects
    return out
