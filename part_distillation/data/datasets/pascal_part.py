"""Lazy detectron2 registration of Pascal-Part (PASCAL VOC 2010 images + Pascal-Part part masks).

Expected layout (see datasets/README.md#pascal-part)::

    $DETECTRON2_DATASETS/pascal_part/
        JPEGImages/<image_id>.jpg                  VOC2010 images
        ImageSets/Main/{train,val}.txt             VOC2010 split lists
        Annotations_Part/<image_id>.mat            Pascal-Part annotations (original .mat format)

Each ``.mat`` holds a struct ``anno`` with ``imname`` and an ``objects`` struct array; every object
has ``class`` (name), ``class_ind`` (1-based VOC index), ``mask`` (H×W) and ``parts`` (struct array
of ``part_name``, ``mask``; an empty array when the object has no parts).

Annotation part names (``lwing``, ``window_3``...) are merged per object class into 50 part classes
(tables below, from the PartDistillation release). With ``merge_parts=True`` (the release's
``USE_MERGED_GT``) all part masks of one merged class inside one object are OR-ed into one mask.
Objects without (known) parts and images without any part-annotated object are dropped.

Registered names:

* ``pascal_part_{train,val}``: ``annotations`` = objects (category_id = VOC class index 0..19),
  ``part_annotations`` = parts (category_id 0..49, ``object_index`` into ``annotations``);
* ``pascal_part_parts_{train,val}``: ``annotations`` = parts, ``object_annotations`` = objects;
* ``pascal_part_crops_<class>_{train,val}`` (one per VOC class, e.g. ``pascal_part_crops_sheep_train``): the
  per-class object-crop view of Choudhury et al. 2021 (appendix, "PASCAL-Part": one model per category, "only
  ... images for which the respective object category occupies at least 20% of the image (measured by its
  bounding box) during training and evaluation"; NMI/ARI and FG-NMI/ARI inside the object's crop). One record
  per object of the class whose bbox covers ≥ :data:`CROP_MIN_BBOX_AREA` of the image: the top-level ``bbox``
  (XYWH) is the object's, so the paired-view / keypoint mappers crop around it; ``annotations`` = that object's
  parts only (their union is the training fg mask; other objects are background); ``object_annotations`` = the
  object. ``image_id`` is ``<VOC id>_<object index>``. See :func:`object_crop_records`.

Every annotation has a split-unique ``id``; objects carry ``object_id`` = their own id and parts
the id of their object (as toyparts does). Nothing is read at import time: the root comes from
``$DETECTRON2_DATASETS`` when ``DatasetCatalog.get`` runs.

The helpers :func:`mask_to_annotation`, :func:`build_record`, :func:`part_dataset_metadata` and
:func:`log_drop_summary` are shared with ``panoptic_parts.py``; :func:`sync_metadata` (kept importable
from here) now lives in ``common.py`` with the other registration helpers.
"""

import collections
import functools
import itertools
import logging
import os

import numpy as np
from detectron2.structures import BoxMode

from ...utils.errors import DatasetNotFoundError
from .common import (
    dataset_root,
    readme_hint,
    register_part_views,
    replace_registration,
    require,
    sync_metadata,
    view_name,
)

__all__ = [
    "PASCAL_OBJECT_CLASSES",
    "PASCAL_PART_CLASSES",
    "PASCAL_PART_MERGE",
    "PASCAL_PART_TO_OBJECTS",
    "PASCAL_OBJECT_TO_PARTS",
    "register_pascal_part",
    "load_pascal_part",
    "read_pascal_part_mat",
    "merge_object_parts",
    "normalize_object_class",
    "mask_to_annotation",
    "build_record",
    "part_dataset_metadata",
    "sync_metadata",
    "log_drop_summary",
    "default_pascal_part_root",
    "object_crop_records",
    "CROP_MIN_BBOX_AREA",
]

logger = logging.getLogger(__name__)

README_SECTION = "datasets/README.md#pascal-part"
_SPLITS = ("train", "val")

# The 20 PASCAL VOC classes in detectron2's (alphabetical) order: object category ids 0..19.
PASCAL_OBJECT_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# Object class names used by the annotation files that differ from the VOC names above.
_OBJECT_CLASS_ALIASES = {"table": "diningtable"}

# Merge tables: per object class, (merged part class, annotation part names merged into it).
# Annotation names are compared after dropping any "_<n>" suffix ("window_3" -> "window").
# The order of first appearance, iterating the object classes in VOC order, defines the ids of
# the 50 merged part classes (checked against PASCAL_PART_CLASSES below).
_VEHICLE_SIDES = (
    ("front", ("frontside",)),
    ("side", ("leftside", "rightside")),
    ("back", ("backside",)),
    ("roof", ("roofside",)),
    ("mirror", ("leftmirror", "rightmirror")),
    ("license plate", ("fliplate", "bliplate")),
    ("door", ("door",)),
    ("wheel", ("wheel",)),
    ("headlight", ("headlight",)),
    ("window", ("window",)),
)
_CAT = (
    ("head", ("head",)),
    ("eye", ("leye", "reye")),
    ("ear", ("lear", "rear")),
    ("nose", ("nose",)),
    ("torso", ("torso",)),
    ("neck", ("neck",)),
    ("leg", ("lfleg", "rfleg", "lbleg", "rbleg")),
    ("paw", ("lfpa", "rfpa", "lbpa", "rbpa")),
    ("tail", ("tail",)),
)
_COW = (
    ("head", ("head",)),
    ("eye", ("leye", "reye")),
    ("ear", ("lear", "rear")),
    ("muzzle", ("muzzle",)),
    ("horn", ("lhorn", "rhorn")),
    ("torso", ("torso",)),
    ("neck", ("neck",)),
    ("leg", ("lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg")),
    ("tail", ("tail",)),
)
_MERGE_TABLES = {
    "aeroplane": (
        ("body", ("body",)),
        ("stern", ("stern",)),
        ("wing", ("lwing", "rwing")),
        ("tail", ("tail",)),
        ("engine", ("engine",)),
        ("wheel", ("wheel",)),
    ),
    "bicycle": (
        ("wheel", ("fwheel", "bwheel")),
        ("seat", ("saddle",)),
        ("handlebar", ("handlebar",)),
        ("chainwheel", ("chainwheel",)),
        ("headlight", ("headlight",)),
    ),
    "bird": (
        ("head", ("head",)),
        ("eye", ("leye", "reye")),
        ("beak", ("beak",)),
        ("torso", ("torso",)),
        ("neck", ("neck",)),
        ("wing", ("lwing", "rwing")),
        ("leg", ("lleg", "rleg")),
        ("foot", ("lfoot", "rfoot")),
        ("tail", ("tail",)),
    ),
    "boat": (),
    "bottle": (("cap", ("cap",)), ("body", ("body",))),
    "bus": _VEHICLE_SIDES,
    "car": _VEHICLE_SIDES,
    "cat": _CAT,
    "chair": (),
    "cow": _COW,
    "diningtable": (),
    "dog": _CAT + (("muzzle", ("muzzle",)),),
    "horse": _COW + (("hoof", ("lfho", "rfho", "lbho", "rbho")),),
    "motorbike": (
        ("wheel", ("fwheel", "bwheel")),
        ("handlebar", ("handlebar",)),
        ("seat", ("saddle",)),
        ("headlight", ("headlight",)),
    ),
    "person": (
        ("head", ("head",)),
        ("eye", ("leye", "reye")),
        ("ear", ("lear", "rear")),
        ("eyebrow", ("lebrow", "rebrow")),
        ("nose", ("nose",)),
        ("mouth", ("mouth",)),
        ("hair", ("hair",)),
        ("torso", ("torso",)),
        ("neck", ("neck",)),
        ("arm", ("llarm", "luarm", "rlarm", "ruarm")),
        ("hand", ("lhand", "rhand")),
        ("leg", ("llleg", "luleg", "rlleg", "ruleg")),
        ("foot", ("lfoot", "rfoot")),
    ),
    "pottedplant": (("pot", ("pot",)), ("plant", ("plant",))),
    "sheep": _COW,
    "sofa": (),
    "train": (
        ("locomotive", ("head",)),
        ("locomotive_front", ("hfrontside",)),
        ("locomotive_side", ("hleftside", "hrightside")),
        ("locomotive_backside", ("hbackside",)),
        ("locomotive_roof", ("hroofside",)),
        ("headlight", ("headlight",)),
        ("coach_car", ("coach",)),
        ("coach_front", ("cfrontside",)),
        ("coach_side", ("cleftside", "crightside")),
        ("coach_backside", ("cbackside",)),
        ("coach_roof", ("croofside",)),
    ),
    "tvmonitor": (("screen", ("screen",)),),
}

# The 50 merged part classes (ids as in the PartDistillation release).
PASCAL_PART_CLASSES = (
    "body", "stern", "wing", "tail", "engine", "wheel", "seat", "handlebar", "chainwheel",
    "headlight", "head", "eye", "beak", "torso", "neck", "leg", "foot", "cap", "front", "side",
    "back", "roof", "mirror", "license plate", "door", "window", "ear", "nose", "paw", "muzzle",
    "horn", "hoof", "eyebrow", "mouth", "hair", "arm", "hand", "pot", "plant", "locomotive",
    "locomotive_front", "locomotive_side", "locomotive_backside", "locomotive_roof", "coach_car",
    "coach_front", "coach_side", "coach_backside", "coach_roof", "screen",
)  # fmt: skip


def _first_appearance_order(tables, object_classes):
    order = []
    for obj in object_classes:
        for merged, _ in tables[obj]:
            if merged not in order:
                order.append(merged)
    return tuple(order)


if _first_appearance_order(_MERGE_TABLES, PASCAL_OBJECT_CLASSES) != PASCAL_PART_CLASSES:
    raise RuntimeError("Pascal-Part merge tables and PASCAL_PART_CLASSES disagree")  # a code bug

# object class -> {annotation part name -> merged part class id}
PASCAL_PART_MERGE = {
    obj: {raw: PASCAL_PART_CLASSES.index(merged) for merged, raws in table for raw in raws}
    for obj, table in _MERGE_TABLES.items()
}
# object class id -> sorted merged part ids; part id -> sorted object class ids (a part such as
# "wheel" belongs to several object classes).
PASCAL_OBJECT_TO_PARTS = [
    sorted({PASCAL_PART_CLASSES.index(m) for m, _ in _MERGE_TABLES[obj]}) for obj in PASCAL_OBJECT_CLASSES
]
PASCAL_PART_TO_OBJECTS = [
    [o for o, parts in enumerate(PASCAL_OBJECT_TO_PARTS) if p in parts] for p in range(len(PASCAL_PART_CLASSES))
]


# --------------------------------------------------------------------------------------------
# Helpers shared with panoptic_parts.py
# --------------------------------------------------------------------------------------------


def mask_to_annotation(mask, category_id):
    """A detectron2 annotation dict for a binary H×W ``mask``: compressed RLE (str counts), XYWH box."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    area = float(mask_util.area(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "segmentation": rle,
        "bbox": bbox,
        "bbox_mode": BoxMode.XYWH_ABS,
        "area": area,
        "category_id": int(category_id),
        "iscrowd": 0,
    }


def build_record(file_name, image_id, height, width, objects, ids, parts_view):
    """One dataset dict from ``objects`` = [(object category id, mask, [(part category id, mask)])].

    ``ids`` is an iterator of split-unique annotation ids. In the objects view the object list is
    ``annotations`` and the parts ``part_annotations``; in the parts view they are swapped into
    ``annotations`` (parts) and ``object_annotations``. Parts carry ``object_index`` (position in
    the object list) and ``object_id`` (their object's ``id``).
    """
    object_annos, part_annos = [], []
    for object_index, (object_category, object_mask, parts) in enumerate(objects):
        obj = mask_to_annotation(object_mask, object_category)
        obj["id"] = obj["object_id"] = next(ids)
        object_annos.append(obj)
        for part_category, part_mask in parts:
            part = mask_to_annotation(part_mask, part_category)
            part["id"] = next(ids)
            part["object_id"] = obj["id"]
            part["object_index"] = object_index
            part_annos.append(part)
    record = {"file_name": file_name, "image_id": image_id, "height": int(height), "width": int(width)}
    if parts_view:
        record["annotations"] = part_annos
        record["object_annotations"] = object_annos
    else:
        record["annotations"] = object_annos
        record["part_annotations"] = part_annos
    return record


def part_dataset_metadata(
    root, split, parts_view, object_classes, part_classes, part_to_object, object_to_parts, **extra
):
    """Metadata for an object/part dataset view (values must not change between registration and load)."""
    classes = part_classes if parts_view else object_classes
    meta = {
        "thing_classes": list(classes),
        "thing_dataset_id_to_contiguous_id": {i: i for i in range(len(classes))},
        "object_classes": list(object_classes),
        "part_classes": list(part_classes),
        "part_to_object": [list(v) if isinstance(v, (list, tuple)) else v for v in part_to_object],
        "object_to_parts": [list(v) for v in object_to_parts],
        "evaluator_type": "coco",
        "dataset_root": root,
        "split": split,
    }
    if parts_view:
        meta["is_part_dataset"] = True
    meta.update(extra)
    return meta


def log_drop_summary(dataset, counts, examples=None, log=None):
    """One INFO line with what was kept and dropped while loading (``counts``: what -> number),
    then a WARNING with up to 5 examples per entry of ``examples``; ``log`` defaults to this module's logger."""
    log = log or logger
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    log.info("%s: %s", dataset, summary or "no images")
    for reason, items in (examples or {}).items():
        if items:
            log.warning("%s: %s, e.g. %s", dataset, reason, ", ".join(map(str, items[:5])))


# --------------------------------------------------------------------------------------------
# Pascal-Part
# --------------------------------------------------------------------------------------------


def default_pascal_part_root():
    return dataset_root("pascal_part")


def _paths(root, split):
    return {
        "image_root": os.path.join(root, "JPEGImages"),
        "split_file": os.path.join(root, "ImageSets", "Main", f"{split}.txt"),
        "annotation_root": os.path.join(root, "Annotations_Part"),
    }


def _metadata(root, split, parts_view, merge_parts):
    return part_dataset_metadata(
        root,
        split,
        parts_view,
        PASCAL_OBJECT_CLASSES,
        PASCAL_PART_CLASSES,
        PASCAL_PART_TO_OBJECTS,
        PASCAL_OBJECT_TO_PARTS,
        merged_parts=bool(merge_parts),
        **_paths(root, split),
    )


def _mat_str(value):
    """A MATLAB char array as loaded by scipy (``array(['name'])`` or an empty array) -> str."""
    flat = np.asarray(value).ravel()
    return str(flat[0]).strip() if flat.size else ""


def _mat_int(value):
    flat = np.asarray(value).ravel()
    return int(flat[0]) if flat.size else -1


def _mat_struct_list(value):
    """A MATLAB struct array (1×N record array, or an empty double array) -> list of records."""
    arr = np.asarray(value)
    if arr.size == 0 or arr.dtype.names is None:
        return []
    return list(arr.ravel())


def read_pascal_part_mat(path):
    """Parse one original Pascal-Part ``.mat`` file.

    Returns:
        dict: ``imname`` and ``objects``, a list of dicts with ``class`` (str), ``class_ind`` (int),
        ``mask`` (H×W bool) and ``parts`` (list of (annotation part name, H×W bool mask)).
    """
    from scipy.io import loadmat

    anno = loadmat(path)["anno"].ravel()[0]
    objects = []
    for obj in _mat_struct_list(anno["objects"]):
        parts = [
            (_mat_str(part["part_name"]), np.asarray(part["mask"]).astype(bool))
            for part in _mat_struct_list(obj["parts"])
        ]
        objects.append(
            {
                "class": _mat_str(obj["class"]),
                "class_ind": _mat_int(obj["class_ind"]),
                "mask": np.asarray(obj["mask"]).astype(bool),
                "parts": parts,
            }
        )
    return {"imname": _mat_str(anno["imname"]), "objects": objects}


def normalize_object_class(name, class_ind=-1):
    """VOC object class id (0..19) from an annotation class name (or 1-based ``class_ind``); None if unknown."""
    name = _OBJECT_CLASS_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name in PASCAL_OBJECT_CLASSES:
        return PASCAL_OBJECT_CLASSES.index(name)
    if 1 <= class_ind <= len(PASCAL_OBJECT_CLASSES):
        return class_ind - 1
    return None


def merge_object_parts(object_class, parts, merge_parts=True):
    """Map annotation parts of one object to merged part classes.

    Args:
        object_class (str): a name of PASCAL_OBJECT_CLASSES.
        parts: list of (annotation part name, bool mask).
        merge_parts: OR all masks of the same merged class into one (sorted by class id);
            otherwise keep one entry per annotation part, in annotation order.

    Returns:
        (list of (part class id, mask), list of unknown annotation part names)
    """
    table = PASCAL_PART_MERGE[object_class]
    mapped, unknown = [], []
    for raw_name, mask in parts:
        key = raw_name.strip().lower().split("_")[0]
        if key not in table:
            unknown.append(raw_name)
            continue
        mapped.append((table[key], mask))
    if not merge_parts:
        return mapped, unknown
    merged = {}
    for part_id, mask in mapped:
        merged[part_id] = merged[part_id] | mask if part_id in merged else mask.copy()
    return sorted(merged.items()), unknown


def _read_split_ids(split_file):
    with open(split_file) as f:
        # Main/<split>.txt has one id per line; class lists (<cls>_<split>.txt) add a ±1 column.
        return [line.split()[0] for line in f if line.strip()]


def load_pascal_part(root, split, parts_view=False, merge_parts=True, dataset_name=None):
    """Read the Pascal-Part split ``split`` under ``root`` into detectron2 dataset dicts."""
    dataset_name = dataset_name or view_name("pascal_part", split, parts_view)
    paths = _paths(root, split)
    for what, path in (
        ("root", root),
        ("split list", paths["split_file"]),
        ("annotation folder", paths["annotation_root"]),
    ):
        require(path, f"Pascal-Part {what}", readme_hint(README_SECTION, layout=True))
    image_ids = _read_split_ids(paths["split_file"])
    ids = itertools.count(1)
    counts = collections.Counter()
    examples = collections.defaultdict(list)
    records = []
    step = max(50, len(image_ids) // 10)  # no progress lines for tiny splits
    for i, image_id in enumerate(image_ids):
        if i and i % step == 0:
            logger.info("%s: read %d/%d annotation files", dataset_name, i, len(image_ids))
        mat_path = os.path.join(paths["annotation_root"], image_id + ".mat")
        if not os.path.isfile(mat_path):
            counts["images without a .mat file"] += 1
            examples["images without a .mat file"].append(mat_path)
            continue
        try:
            anno = read_pascal_part_mat(mat_path)
        except Exception as e:  # scipy raises many types on a damaged file; skip it, but say so
            counts["unreadable .mat files"] += 1
            examples["unreadable .mat files"].append(f"{mat_path} ({type(e).__name__}: {e})")
            continue
        objects = []
        for obj in anno["objects"]:
            category = normalize_object_class(obj["class"], obj["class_ind"])
            if category is None:
                counts["objects of unknown class"] += 1
                examples["objects of unknown class"].append(f"{image_id}:{obj['class']}")
                continue
            parts, unknown = merge_object_parts(PASCAL_OBJECT_CLASSES[category], obj["parts"], merge_parts)
            if unknown:
                counts["parts with unknown names"] += len(unknown)
                examples["parts with unknown names"] += [f"{image_id}:{obj['class']}/{n}" for n in unknown]
            if not parts:
                counts["objects without parts"] += 1
                continue
            objects.append((category, obj["mask"], parts))
        if not objects:
            counts["images without part-annotated objects"] += 1
            continue
        height, width = objects[0][1].shape
        file_name = os.path.join(paths["image_root"], image_id + ".jpg")
        records.append(build_record(file_name, image_id, height, width, objects, ids, parts_view))
    if not records and counts["images without a .mat file"] == len(image_ids):
        raise DatasetNotFoundError(
            f"none of the {len(image_ids)} Pascal-Part annotation files of {paths['split_file']} exist in "
            f"{paths['annotation_root']}; see {README_SECTION}"
        )
    counts_line = {"images kept": len(records), **counts}
    log_drop_summary(dataset_name, counts_line, examples)
    return records


# Objects whose bounding box covers less of the image are left out of the crop view (Choudhury et al. 2021
# appendix: "at least 20% of the image ... during training and evaluation").
CROP_MIN_BBOX_AREA = 0.2


def object_crop_records(records, object_category, min_bbox_area=CROP_MIN_BBOX_AREA, dataset_name="pascal_part"):
    """Objects-view records → one record per object of ``object_category`` whose XYWH box covers at least
    ``min_bbox_area`` of its image (module docstring, ``pascal_part_crops_<class>_<split>``)."""
    out = []
    counts = collections.Counter()
    for r in records:
        image_area = float(r["height"]) * float(r["width"])
        for index, obj in enumerate(r["annotations"]):
            if int(obj["category_id"]) != int(object_category):
                continue
            x, y, w, h = (float(v) for v in obj["bbox"])
            if w * h < min_bbox_area * image_area:
                counts[f"objects under {min_bbox_area:.0%} of the image"] += 1
                continue
            parts = [dict(p) for p in r.get("part_annotations", []) if p.get("object_index") == index]
            if not parts:
                counts["objects without parts"] += 1
                continue
            out.append(
                {
                    "file_name": r["file_name"],
                    "image_id": f"{r['image_id']}_{index}",
                    "height": r["height"],
                    "width": r["width"],
                    "bbox": [x, y, w, h],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "annotations": parts,
                    "object_annotations": [dict(obj)],
                    "object_category_id": int(object_category),
                }
            )
    log_drop_summary(dataset_name, {"objects kept": len(out), **counts})
    return out


def _load_crops(name, split, object_category, root, merge_parts):
    records = load_pascal_part(root or default_pascal_part_root(), split, False, merge_parts, dataset_name=name)
    return object_crop_records(records, object_category, CROP_MIN_BBOX_AREA, dataset_name=name)


def _crop_metadata(root, split, object_category, merge_parts):
    meta = _metadata(root, split, True, merge_parts)
    meta.update(
        object_class=PASCAL_OBJECT_CLASSES[object_category],
        min_bbox_area=CROP_MIN_BBOX_AREA,
        background_label=0,
        evaluator_type="part_nmi_ari",
    )
    return meta


def register_pascal_part(root=None, merge_parts=True):
    """Register the four Pascal-Part views; ``root=None`` resolves the root at load time.

    Safe to call again (e.g. with an explicit root): existing registrations are replaced.
    """
    register_part_views(
        "pascal_part",
        _SPLITS,
        root,
        default_pascal_part_root,
        functools.partial(load_pascal_part, merge_parts=merge_parts),
        functools.partial(_metadata, merge_parts=merge_parts),
    )
    for split in _SPLITS:
        for category, object_class in enumerate(PASCAL_OBJECT_CLASSES):
            name = f"pascal_part_crops_{object_class}_{split}"
            replace_registration(
                name,
                functools.partial(_load_crops, name, split, category, root, merge_parts),
                _crop_metadata(root or default_pascal_part_root(), split, category, merge_parts),
            )


register_pascal_part()
