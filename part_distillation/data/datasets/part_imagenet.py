"""Lazy detectron2 registration of PartImageNet (COCO-format part annotations).

Two views of each split (``train``, ``val``, ``test``):

* ``part_imagenet_parts_{split}``: one annotation per part polygon, 40 part classes in the
  official category-id order (``thing_classes`` = :data:`PART_IMAGENET_PART_CLASSES`);
* ``part_imagenet_{split}``: one object per image whose mask is the union of the image's part
  masks (its polygons concatenated, or an RLE union when a part is RLE-encoded) and whose class is
  the super-category of its parts (``thing_classes`` = the 11 :data:`PART_IMAGENET_OBJECT_CLASSES`).

Every record carries ``class_code`` (the ImageNet wnid, taken from the file name) and every
annotation ``class_code_id`` (its index in the metadata list ``class_codes``, the sorted wnids of the
split, set at load time; PartImageNet splits have disjoint classes) and ``object_id`` (the image id:
there is one object per image).

Expected layout (``root`` defaults to ``$DETECTRON2_DATASETS/part_imagenet``)::

    part_imagenet/
      annotations/{train,val,test}.json      (or annotations/<split>/<split>.json, as released)
      images/{train,val,test}/<wnid>_<n>.JPEG  (or images/<split>/<wnid>/<wnid>_<n>.JPEG)

The JSON file names are bare (``n01440764_10029.JPEG``); whether the images sit directly in the split
folder or in per-wnid sub-folders is decided once per split at load time from the first image.
``register_part_imagenet(image_root=...)`` points all splits at another folder instead (e.g.
``imagenet_1k/train``, which is what PartDistillation uses by default: PartImageNet images are
ImageNet-1K train images).

Nothing is read at import time: ``$DETECTRON2_DATASETS`` is resolved when ``DatasetCatalog.get`` runs.
"""

import functools
import logging
import os

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from ...structures.masks import segmentation_to_rle
from ...utils.errors import UserError
from .part_coco import load_checked_coco_json
from .common import dataset_root, not_found, readme_hint, register_views, require, reset_metadata, view_name

__all__ = [
    "PART_IMAGENET_OBJECT_CLASSES",
    "PART_IMAGENET_PART_CLASSES",
    "PART_IMAGENET_PART_TO_OBJECT",
    "register_part_imagenet",
    "default_part_imagenet_root",
]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")
_README = "datasets/README.md#partimagenet"

# Super-categories and their parts, in the order of the official part category ids 0..39.
_OBJECT_PARTS = (
    ("Quadruped", ("Head", "Body", "Foot", "Tail")),
    ("Biped", ("Head", "Body", "Hand", "Foot", "Tail")),
    ("Fish", ("Head", "Body", "Fin", "Tail")),
    ("Bird", ("Head", "Body", "Wing", "Foot", "Tail")),
    ("Snake", ("Head", "Body")),
    ("Reptile", ("Head", "Body", "Foot", "Tail")),
    ("Car", ("Body", "Tier", "Side Mirror")),  # "Tier" is the dataset's spelling of "tire"
    ("Bicycle", ("Body", "Head", "Seat", "Tier")),
    ("Boat", ("Body", "Sail")),
    ("Aeroplane", ("Head", "Body", "Engine", "Wing", "Tail")),
    ("Bottle", ("Mouth", "Body")),
)

PART_IMAGENET_OBJECT_CLASSES = [obj for obj, _ in _OBJECT_PARTS]
PART_IMAGENET_PART_CLASSES = [f"{obj} {part}" for obj, parts in _OBJECT_PARTS for part in parts]
PART_IMAGENET_PART_TO_OBJECT = [i for i, (_, parts) in enumerate(_OBJECT_PARTS) for _ in parts]


def default_part_imagenet_root():
    return dataset_root("part_imagenet")


def _json_file(root, split):
    """The split's JSON: ``annotations/<split>.json``, else the release's ``annotations/<split>/<split>.json``."""
    flat = os.path.join(root, "annotations", f"{split}.json")
    nested = os.path.join(root, "annotations", split, f"{split}.json")
    return nested if not os.path.isfile(flat) and os.path.isfile(nested) else flat


def _image_dir(root, split, image_root):
    return image_root if image_root else os.path.join(root, "images", split)


def _metadata(root, split, parts, image_root, json_file=None):
    """``json_file`` is located at load time; registration assumes ``annotations/<split>.json``."""
    json_file = json_file or os.path.join(root, "annotations", f"{split}.json")
    meta = {
        "object_classes": list(PART_IMAGENET_OBJECT_CLASSES),
        "part_classes": list(PART_IMAGENET_PART_CLASSES),
        "part_to_object": list(PART_IMAGENET_PART_TO_OBJECT),
        "image_root": _image_dir(root, split, image_root),
        "evaluator_type": "coco",
        "dataset_root": root,
    }
    if parts:
        # What load_coco_json sets from the official JSON (category ids 0..39 map to themselves).
        meta["thing_classes"] = list(PART_IMAGENET_PART_CLASSES)
        meta["thing_dataset_id_to_contiguous_id"] = {i: i for i in range(len(PART_IMAGENET_PART_CLASSES))}
        meta["json_file"] = json_file
        meta["is_part_dataset"] = True
    else:
        # No "json_file": the part JSON is not the object ground truth, so detectron2's COCOEvaluator
        # must build it from these records instead (it does so when json_file is absent).
        meta["thing_classes"] = list(PART_IMAGENET_OBJECT_CLASSES)
        meta["thing_dataset_id_to_contiguous_id"] = {i + 1: i for i in range(len(PART_IMAGENET_OBJECT_CLASSES))}
        meta["parts_json_file"] = json_file
    return meta


def _resolve_image_paths(records, image_dir, json_file):
    """Point bare file names at ``<image_dir>/<file>`` or ``<image_dir>/<wnid>/<file>`` (checked once)."""
    bare = [r for r in records if os.sep not in os.path.relpath(r["file_name"], image_dir)]
    if not bare:
        return
    first = bare[0]["file_name"]
    if os.path.isfile(first):
        return
    name = os.path.basename(first)
    nested = os.path.join(image_dir, name.split("_")[0], name)
    if not os.path.isfile(nested):
        raise not_found(f"PartImageNet image of {json_file}", f"{first} (nor {nested})", readme_hint(_README))
    for record in bare:
        name = os.path.basename(record["file_name"])
        record["file_name"] = os.path.join(image_dir, name.split("_")[0], name)


def _load_parts(split, root, image_root):
    name = view_name("part_imagenet", split, parts_view=True)
    root = root or default_part_imagenet_root()
    meta = _metadata(root, split, True, image_root, _json_file(root, split))
    json_file, image_dir = meta["json_file"], meta["image_root"]
    require(json_file, "PartImageNet annotations", readme_hint(_README), os.path.isfile)
    # load_coco_json sets thing_classes / the id map from the JSON; start from metadata without them
    # so that a different JSON gives the clear error below, not detectron2's metadata assertion.
    reset_metadata(name, {k: v for k, v in meta.items() if not k.startswith("thing_")})
    records = load_checked_coco_json(json_file, image_dir, name, extra_annotation_keys=["id"])
    found = MetadataCatalog.get(name).thing_classes
    if found != PART_IMAGENET_PART_CLASSES:
        reset_metadata(name, meta)
        raise UserError(
            f"{json_file} has {len(found)} categories {found[:3]}..., not the 40 official PartImageNet "
            f"part classes in id order; see {_README}"
        )
    _resolve_image_paths(records, image_dir, json_file)
    class_codes = sorted({os.path.basename(r["file_name"]).split("_")[0] for r in records})
    code_ids = {code: i for i, code in enumerate(class_codes)}
    for record in records:
        record["class_code"] = os.path.basename(record["file_name"]).split("_")[0]
        for anno in record["annotations"]:
            anno["part_id"] = anno.pop("id", None)
            anno["object_id"] = record["image_id"]
            anno["class_code_id"] = code_ids[record["class_code"]]
    MetadataCatalog.get(name).set(class_codes=class_codes, dataset_root=root)
    return records, class_codes


def _union_segmentation(annos, height, width):
    """Union of the part masks: concatenated polygons, or one RLE when any part is an RLE."""
    segms = [a["segmentation"] for a in annos if a.get("segmentation")]
    if not segms:
        return None
    if all(isinstance(s, list) for s in segms):
        return [poly for s in segms for poly in s]
    rles = [segmentation_to_rle(s, height, width) for s in segms]
    return mask_util.merge(rles, intersect=False)


def _object_annotation(record):
    parts = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    if not parts:
        return None
    objects = [PART_IMAGENET_PART_TO_OBJECT[a["category_id"]] for a in parts]
    category = max(set(objects), key=lambda o: (objects.count(o), -o))
    if len(set(objects)) > 1:
        logger.warning(
            "PartImageNet image %s has parts of several super-categories %s; using %s",
            record["file_name"],
            sorted(set(objects)),
            PART_IMAGENET_OBJECT_CLASSES[category],
        )
    boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in parts], dtype=float)
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
    anno = {
        "iscrowd": 0,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category,
        "object_id": record["image_id"],
        "class_code_id": parts[0]["class_code_id"],
    }
    segmentation = _union_segmentation(parts, record["height"], record["width"])
    if segmentation:
        anno["segmentation"] = segmentation
    return anno


def _load_objects(split, root, image_root):
    root = root or default_part_imagenet_root()
    part_records, class_codes = _load_parts(split, root, image_root)
    name = view_name("part_imagenet", split, parts_view=False)
    meta = _metadata(root, split, False, image_root, _json_file(root, split))
    meta["class_codes"] = class_codes
    reset_metadata(name, meta)
    records = []
    for part_record in part_records:
        record = {k: v for k, v in part_record.items() if k != "annotations"}
        anno = _object_annotation(part_record)
        record["annotations"] = [anno] if anno is not None else []
        records.append(record)
    return records


def _load(name, split, parts, root, image_root):
    # ``name`` is not needed: each loader knows the names whose metadata it sets (the objects view
    # loads the parts view too).
    if parts:
        return _load_parts(split, root, image_root)[0]
    return _load_objects(split, root, image_root)


def register_part_imagenet(root=None, image_root=None):
    """Register both views of every split; ``root=None`` resolves the root at load time.

    Args:
        root: the ``part_imagenet`` folder (default ``$DETECTRON2_DATASETS/part_imagenet``).
        image_root: one image folder for all splits instead of ``<root>/images/<split>`` (e.g. the
            ImageNet-1K train folder with per-wnid sub-folders).

    Safe to call again: existing registrations are replaced.
    """
    register_views(
        "part_imagenet",
        _SPLITS,
        root,
        default_part_imagenet_root,
        functools.partial(_load, image_root=image_root),
        functools.partial(_metadata, image_root=image_root),
    )


register_part_imagenet()
