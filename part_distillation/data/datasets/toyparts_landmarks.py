"""Part-centre landmarks for toyparts: ``toyparts_landmarks_{train,val}`` (lazy registration).

Toyparts has no annotated landmarks, so landmark NME (Choudhury et al. 2021 §4.1: "fit a linear regression
model ... to map predicted keypoints to ground truth keypoints") gets one landmark per part class, computed
from the GT part masks alone: landmark ``c`` of an image is the centroid (continuous pixel coordinates, pixel
centres at ``j + 0.5``) of all its pixels of part class ``c``, visible when the image has any (``v = 2``),
else ``(0, 0, 0)``. Nothing is tuned: the positions are a deterministic function of the annotations.

The records are those of ``toyparts_parts_<split>`` (same ``image_id``, ``annotations``) plus ``keypoints``
(a flat ``[x, y, v] × 19`` list, original pixels), so the mask-based NMI/ARI evaluator and the landmark NME
evaluator can score the same predictions. Metadata: the parts view's, plus ``keypoint_names`` (the part class
names) and ``landmark_source = "part_centres"``.
"""

import functools

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..dataset_mappers.part_eval import decode_segmentation
from .common import replace_registration
from .toyparts_meta import TOYPARTS_PART_CLASSES

__all__ = ["register_toyparts_landmarks", "part_centre_keypoints"]

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


def _load(name, split):
    records = DatasetCatalog.get(f"toyparts_parts_{split}")
    out = []
    for r in records:
        r = dict(r)
        r["keypoints"] = part_centre_keypoints(r)
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
