"""Part-centre landmarks for toyparts: ``toyparts_landmarks_{train,val}`` (lazy registration).

Toyparts has no annotated landmarks, so landmark NME (Choudhury et al. 2021 §4.1: "fit a linear regression
model ... to map predicted keypoints to ground truth keypoints") gets one landmark per part class, computed
from the GT part masks alone: landmark ``c`` of an image is the centroid (continuous pixel coordinates, pixel
centres at ``j + 0.5``) of all its pixels of part class ``c``, visible when the image has any (``v = 2``),
else ``(0, 0, 0)``. Nothing is tuned: the positions are a deterministic function of the annotations.

The records are those of ``toyparts_parts_<split>`` (same ``image_id``, ``annotations``) plus ``keypoints``
(a flat ``[x, y, v] × 19`` list, original pixels), so the mask-based NMI/ARI evaluator and the landmark NME
evaluator can score the same predictions, plus ``object_annotations``: the objects of the same image from the
instance view ``toyparts_<split>`` (``object_id``, ``category_id`` = the object class in [0, 5), ``segmentation``
= the union of its parts, ``bbox``), as Pascal-Part's ``*_parts_*`` views carry them. Models whose part
predictions are conditioned on the object class (PartDistillation's per-object-class part classifiers, Cho et
al. 2023 supp. Eq. 6) read it through :class:`PartEvalDatasetMapper`, whatever ``DATASETS.TEST`` names.
Metadata: the parts view's, plus ``keypoint_names`` (the part class names) and ``landmark_source =
"part_centres"``.
"""

import functools

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..dataset_mappers.part_eval import decode_segmentation
from ...utils.errors import ConfigError
from .common import replace_registration
from .toyparts_meta import TOYPARTS_PART_CLASSES

__all__ = ["register_toyparts_landmarks", "part_centre_keypoints", "object_annotations_by_image"]

_SPLITS = ("train", "val")


def part_centre_keypoints(record: dict, num_classes: int = len(TOYPARTS_PART_CLASSES)) -> list:
    """Flat ``[x, y, v] × num_classes`` centroids of each part class's GT pixels in ``record`` (v = 2 when present)."""
    h, w = int(record["height"]), int(record["width"])
    union = np.zeros((num_classes, h, w), dtype=bool)
    for ann in record.get("annotations", []):
        if ann.get("iscrowd", 0) or "segmentation" not in ann:
            continue
        union[int(ann["category_id"])] |= decode_segmentation(ann["segmentation"], h, w)
    out = []
    for c in range(num_classes):
        ys, xs = np.nonzero(union[c])
        if len(xs):
            out += [float(xs.mean() + 0.5), float(ys.mean() + 0.5), 2.0]
        else:
            out += [0.0, 0.0, 0.0]
    return out


_OBJECT_KEYS = ("object_id", "category_id", "segmentation", "bbox", "bbox_mode", "iscrowd")


def object_annotations_by_image(object_records) -> dict:
    """``image_id`` → the instance view's objects of that image (``object_id``, ``category_id``, mask, box)."""
    return {
        r["image_id"]: [{k: a[k] for k in _OBJECT_KEYS if k in a} for a in r.get("annotations", [])]
        for r in object_records
    }


def _load(name, split):
    records = DatasetCatalog.get(f"toyparts_parts_{split}")
    objects = object_annotations_by_image(DatasetCatalog.get(f"toyparts_{split}"))
    out = []
    for r in records:
        r = dict(r)
        r["keypoints"] = part_centre_keypoints(r)
        r["object_annotations"] = objects.get(r["image_id"], [])
        known = {o.get("object_id") for o in r["object_annotations"]}
        missing = sorted({a.get("object_id") for a in r["annotations"]} - known, key=str)
        if missing:
            raise ConfigError(
                f"{r['file_name']}: parts of object_id {missing} have no object in toyparts_{split} (the parts and "
                f"instance JSONs of {split} differ): regenerate toyparts (datasets/prepare_toyparts.py)."
            )
        out.append(r)
    meta = MetadataCatalog.get(f"toyparts_parts_{split}").as_dict()
    meta.pop("name", None)
    MetadataCatalog.get(name).set(**{k: v for k, v in meta.items() if k not in MetadataCatalog.get(name).as_dict()})
    return out


def _metadata(split):
    return {
        "keypoint_names": list(TOYPARTS_PART_CLASSES),
        "landmark_source": "part_centres",
        "parts_view": f"toyparts_parts_{split}",
        "background_label": 0,
    }


def register_toyparts_landmarks():
    """Register ``toyparts_landmarks_{train,val}`` (records read only by ``DatasetCatalog.get``)."""
    for split in _SPLITS:
        name = f"toyparts_landmarks_{split}"
        replace_registration(name, functools.partial(_load, name, split), _metadata(split))


register_toyparts_landmarks()
