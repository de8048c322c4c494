"""Your own COCO-style part dataset: a checked COCO JSON loader and ``register_part_coco``.

``register_part_coco(name, json_file, image_root)`` works like detectron2's ``register_coco_instances``:
it registers ``name`` lazily (nothing is read until ``DatasetCatalog.get``). The JSON's annotations
are *parts* (``thing_classes`` = the part categories, ``is_part_dataset``); with ``objects_name`` an
object view is registered too, one object per ``object_id`` (an annotation key; default: one object per
image) whose mask is the union of its parts (what stages 0 and 1 need). See datasets/README.md
("Your own data").

:func:`load_checked_coco_json` is the loader: it refuses a JSON that would fail later, naming the file
and the first problems (one line, :class:`DatasetFormatError`): not JSON (e.g. truncated), not a COCO
dict, duplicate image or annotation ids, a ``category_id`` not in ``categories``, an annotation without
``segmentation``, a non-finite or negative ``bbox``. Annotations whose ``image_id`` is not an image of
the file, and polygons with fewer than 3 points, are dropped and *counted* (metadata ``load_drops``,
reported by tools/validate_dataset.py).
"""

import functools
import json
import logging
import math
import os
from collections import Counter, OrderedDict

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from ...utils.errors import DatasetNotFoundError, UserError
from .common import replace_registration

__all__ = ["DatasetFormatError", "load_checked_coco_json", "register_part_coco", "register_part_coco_specs"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 3  # problems named in the one-line error (the count says how many in all)


class DatasetFormatError(UserError, ValueError):
    """An annotation file exists but cannot be used as it is (the message names the file and the fix)."""


def _read_json(json_file):
    if not os.path.isfile(json_file):
        raise DatasetNotFoundError(f"annotation file not found: {json_file}; check the path given at registration")
    try:
        with open(json_file, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DatasetFormatError(
            f"{json_file} is not valid JSON ({type(e).__name__}{where}: {getattr(e, 'msg', e)}); the file is "
            "probably truncated or not a COCO annotation file: re-download or re-export it"
        ) from None


def _bad_bbox(bbox):
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not numeric"
    if not all(math.isfinite(v) for v in values):
        return f"bbox {bbox!r} is not finite"
    if values[2] < 0 or values[3] < 0:
        return f"bbox {bbox!r} has a negative width/height"
    return None


def _problems(coco, json_file):
    """Fatal problems of a parsed COCO dict (a list of strings), and the per-reason drop counts."""
    if (
        not isinstance(coco, dict)
        or not isinstance(coco.get("images"), list)
        or not isinstance(coco.get("annotations", []), list)
        or not isinstance(coco.get("categories"), list)
    ):
        return ["not a COCO dict with 'images', 'annotations' and 'categories' lists"], Counter()
    problems, drops = [], Counter()
    image_ids = Counter(img.get("id") for img in coco["images"])
    problems += [f"image id {i!r} used {n} times" for i, n in image_ids.items() if n > 1]
    problems += [
        f"image {img.get('file_name')!r} has no id/file_name/height/width"
        for img in coco["images"]
        if any(img.get(k) is None for k in ("id", "file_name", "height", "width"))
    ]
    category_ids = {c.get("id") for c in coco["categories"]}
    ann_ids = Counter(a.get("id") for a in coco.get("annotations", []) if a.get("id") is not None)
    problems += [f"annotation id {i!r} used {n} times" for i, n in ann_ids.items() if n > 1]
    for a in coco.get("annotations", []):
        what = f"annotation id {a.get('id')!r} (image {a.get('image_id')!r})"
        if a.get("image_id") not in image_ids:
            drops["annotation_without_image"] += 1
            continue
        if a.get("category_id") not in category_ids:
            problems.append(f"{what}: category_id {a.get('category_id')!r} is not in 'categories'")
        if a.get("segmentation") is None:
            problems.append(f"{what}: no 'segmentation' (part datasets need a mask per annotation)")
        bad = _bad_bbox(a.get("bbox"))
        if bad:
            problems.append(f"{what}: {bad}")
    return problems, drops


def _valid_polygons(segmentation):
    """Polygons with at least 3 points (detectron2 drops the others too); other segmentations unchanged."""
    if not isinstance(segmentation, list):
        return segmentation
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def load_checked_coco_json(
    json_file, image_root, dataset_name=None, extra_annotation_keys=("id", "object_id"), drops_out=None
):
    """COCO JSON → detectron2 dataset dicts (as ``load_coco_json`` makes them), checked first.

    Category ids are mapped to 0..C-1 in increasing id order (``thing_dataset_id_to_contiguous_id``) and
    ``thing_classes`` are the category names in that order; with ``dataset_name`` these, ``json_file``,
    ``image_root`` and ``load_drops`` (counts by reason) are set in its metadata; ``drops_out`` (a dict), if
    given, receives the drop counts too.

    Raises:
        DatasetNotFoundError: ``json_file`` does not exist.
        DatasetFormatError: the file is unusable (module doc: which problems); names the first few.
    """
    coco = _read_json(json_file)
    problems, drops = _problems(coco, json_file)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (
            f"; ... ({len(problems)} problems)" if len(problems) > _MAX_LISTED else ""
        )
        raise DatasetFormatError(
            f"{json_file}: {listed}; fix the annotation file (tools/validate_dataset.py lists them)"
        )
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    by_image = OrderedDict((img["id"], []) for img in coco["images"])
    for a in coco.get("annotations", []):
        if a.get("image_id") not in by_image:
            continue
        segmentation = _valid_polygons(a["segmentation"])
        if isinstance(segmentation, list) and not segmentation:
            drops["invalid_polygon"] += 1
            continue
        anno = {
            "iscrowd": int(a.get("iscrowd", 0)),
            "category_id": id_map[a["category_id"]],
            "segmentation": segmentation,
            "bbox_mode": BoxMode.XYWH_ABS,
        }
        if a.get("bbox") is not None:
            anno["bbox"] = [float(v) for v in a["bbox"]]
        for key in extra_annotation_keys:
            if key in a:
                anno[key] = a[key]
        by_image[a["image_id"]].append(anno)
    records = []
    for img in coco["images"]:
        records.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "image_id": img["id"],
                "annotations": by_image[img["id"]],
            }
        )
    from ..skips import note_skip

    for reason, n in sorted(drops.items()):
        note_skip(reason, json_file, f"{n} annotation(s)", what="Dropping annotations of", count=n)
    if drops_out is not None:
        drops_out.update(drops)
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        values = {
            "thing_classes": [c["name"] for c in categories],
            "part_classes": [c["name"] for c in categories],
            "thing_dataset_id_to_contiguous_id": id_map,
            "json_file": json_file,
            "image_root": image_root,
            "load_drops": dict(drops),
        }
        if any(meta.get(k, None) not in (None, v) for k, v in values.items()):
            from .common import reset_metadata

            reset_metadata(dataset_name, dict({k: v for k, v in meta.as_dict().items() if k != "name"}, **values))
        else:
            meta.set(**{k: v for k, v in values.items() if meta.get(k, None) is None})
    return records


def _union_object_records(part_records):
    """One object per ``object_id`` (default: the image) whose segmentation is its parts' polygons/RLEs."""
    from pycocotools import mask as mask_util

    from ...structures.masks import segmentation_to_rle

    records = []
    for record in part_records:
        groups = OrderedDict()
        for a in record["annotations"]:
            if not a.get("iscrowd", 0):
                groups.setdefault(a.get("object_id", record["image_id"]), []).append(a)
        objects = []
        for object_id, parts in groups.items():
            h, w = record["height"], record["width"]
            rle = mask_util.merge([segmentation_to_rle(p["segmentation"], h, w) for p in parts], intersect=False)
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
            objects.append(
                {
                    "iscrowd": 0,
                    "category_id": 0,
                    "object_id": object_id,
                    "segmentation": rle,
                    "bbox": [x, y, bw, bh],
                    "bbox_mode": BoxMode.XYWH_ABS,
                }
            )
        records.append(dict({k: v for k, v in record.items() if k != "annotations"}, annotations=objects))
    return records


def _load(name, json_file, image_root, objects_view, class_agnostic_objects=False):
    drops = {}
    records = load_checked_coco_json(json_file, image_root, None if objects_view else name, drops_out=drops)
    if class_agnostic_objects:
        # the object view has one class ("object", id 0), so every part's object is of class 0: what a model with
        # per-object-class part classifiers (stage 4, NUM_OBJECT_CLASSES 1) is evaluated with on this view
        meta = MetadataCatalog.get(name)
        if meta.get("part_to_object", None) is None:
            meta.set(part_to_object=[0] * len(meta.thing_classes))
    if objects_view:
        meta = MetadataCatalog.get(name)
        if meta.get("load_drops", None) != drops:
            from .common import reset_metadata

            reset_metadata(name, dict({k: v for k, v in meta.as_dict().items() if k != "name"}, load_drops=drops))
        return _union_object_records(records)
    return records


def register_part_coco(name, json_file, image_root, metadata=None, objects_name=None):
    """Register a COCO-format part dataset, in the style of detectron2's ``register_coco_instances``.

    Args:
        name: the dataset name (e.g. ``"my_parts_train"``), usable in ``DATASETS.TEST`` and
            ``MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET``.
        json_file: COCO JSON whose annotations are parts (``segmentation`` required; polygons or RLE).
            An annotation's optional ``object_id`` says which object of the image it belongs to.
        image_root: the folder the JSON's ``file_name`` entries are relative to.
        metadata: extra metadata (e.g. ``{"evaluator_type": "coco"}``).
        objects_name: also register this name as the object view (one class-agnostic object per
            ``object_id``, or per image, whose mask is the union of its parts): the input of stage 1. The part
            view's metadata then maps every part to that one object class (``part_to_object``), so stage 4
            evaluates on it with its objects' class.
    """
    base = dict(metadata or {}, json_file=json_file, image_root=image_root)
    replace_registration(
        name,
        functools.partial(_load, name, json_file, image_root, False, class_agnostic_objects=bool(objects_name)),
        dict(base, is_part_dataset=True),
    )
    if objects_name:
        replace_registration(
            objects_name,
            functools.partial(_load, objects_name, json_file, image_root, True),
            dict(
                {k: v for k, v in base.items() if k != "json_file"},
                thing_classes=["object"],
                parts_json_file=json_file,
                parts_dataset=name,
            ),
        )
    return name


def register_part_coco_specs(specs, key="DATASETS.PART_COCO"):
    """Register ``"name,json_file,image_root[,objects_name]"`` strings (config ``DATASETS.PART_COCO``, or the
    validator's ``--part-coco``) with :func:`register_part_coco`; returns the names registered."""
    from ...utils.errors import ConfigError

    names = []
    for spec in specs or ():
        fields = [f.strip() for f in str(spec).split(",")]
        if len(fields) not in (3, 4) or not all(fields):
            raise ConfigError(
                f'{key} entry {spec!r} must be "name,json_file,image_root" or "name,json_file,image_root,objects_name"'
            )
        register_part_coco(fields[0], fields[1], fields[2], objects_name=fields[3] if len(fields) == 4 else None)
        names += fields[:1] + fields[3:]
    return names
