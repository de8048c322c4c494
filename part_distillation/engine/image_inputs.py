"""Inputs and outputs of ``demo/demo.py``: image lists, COCO object-mask files, prediction records."""

import glob
import logging
import os

import numpy as np
import pycocotools.mask as mask_util

from ..data.pseudo_labels import encode_mask
from ..utils.errors import ConfigError, UserError
from ..utils.io import read_user_json

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "output_names", "CocoObjectMasks", "prediction_record"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs) -> list:
    """Files, directories (their images, not recursive) and glob patterns → sorted unique image paths.

    A path or pattern that matches nothing is an error naming it (a typo should not give an empty run).
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
        if not found:
            raise UserError(
                f'--input {item!r} matches no image file (give files, folders or quoted patterns like "*.jpg").'
            )
        paths += found
    seen, out = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def output_names(paths) -> list:
    """One PNG name per input, from its file stem; repeated stems get ``_1``, ``_2``, ... suffixes."""
    used, names = {}, []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        n = used.get(stem, 0)
        used[stem] = n + 1
        names.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return names


class CocoObjectMasks:
    """Object masks from a COCO instances JSON (``images`` with ``file_name``, ``annotations`` with
    ``image_id``, ``segmentation`` as polygons or RLE, optional ``category_id``/``score``, optional
    ``categories``), looked up by image file name (the base name, so the JSON need not know our paths)."""

    def __init__(self, path: str):
        data = read_user_json(path, "--object-masks")
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)
        ):
            raise ConfigError(
                f"--object-masks {path}: expected a COCO instances file with 'images' (id, file_name) and "
                "'annotations' (image_id, segmentation)."
            )
        self.path = path
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
        by_id = {}
        self._images = {}
        for im in data["images"]:
            if "id" not in im or "file_name" not in im:
                raise ConfigError(f"--object-masks {path}: every entry of 'images' needs 'id' and 'file_name'.")
            by_id[im["id"]] = im
            self._images[os.path.basename(im["file_name"])] = {"image": im, "annotations": []}
        for i, ann in enumerate(data["annotations"]):
            if "segmentation" not in ann or ann.get("image_id") not in by_id:
                raise ConfigError(
                    f"--object-masks {path}: annotation #{i} needs 'segmentation' and an 'image_id' listed in 'images'."
                )
            self._images[os.path.basename(by_id[ann["image_id"]]["file_name"])]["annotations"].append(ann)

    def get(self, file_name: str, height: int, width: int):
        """(masks (M, H, W) bool, category ids (M,), scores (M,)) of an image, or None if the JSON lacks it."""
        entry = self._images.get(os.path.basename(file_name))
        if entry is None:
            return None
        im = entry["image"]
        if (im.get("height", height), im.get("width", width)) != (height, width):
            raise UserError(
                f"--object-masks {self.path}: {im['file_name']} is {im.get('height')}×{im.get('width')} there but "
                f"{height}×{width} on disk; give masks for the image as it is."
            )
        anns = entry["annotations"]
        masks = np.zeros((len(anns), height, width), dtype=bool)
        for j, ann in enumerate(anns):
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
            elif isinstance(seg.get("counts"), list):
                rle = mask_util.frPyObjects(seg, height, width)
            else:
                rle = seg
            masks[j] = mask_util.decode(rle).astype(bool)
        classes = np.array([int(a.get("category_id", -1)) for a in anns], dtype=np.int64)
        scores = np.array([float(a.get("score", 1.0)) for a in anns], dtype=np.float32)
        return masks, classes, scores


def _bbox_xywh(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def prediction_record(file_name, prediction: dict, labels, legend, picture: str, category_names=None) -> dict:
    """One image's entry of the demo's ``predictions.json`` (masks as compressed COCO RLE)."""
    objects, parts = prediction["objects"], prediction["parts"]
    names = category_names or {}
    h, w = objects.image_size
    record = {
        "file_name": file_name,
        "height": int(h),
        "width": int(w),
        "object_source": prediction["object_source"],
        "class_agnostic": bool(prediction["class_agnostic"]),
        "visualization": picture,
        "legend": legend,
        "objects": [],
        "parts": [],
    }
    for j in range(len(objects)):
        m = objects.pred_masks[j].numpy()
        c = int(objects.pred_classes[j])
        record["objects"].append(
            {
                "id": j,
                "category_id": c,
                "category_name": names.get(c),
                "score": float(objects.scores[j]),
                "bbox": _bbox_xywh(m),
                "segmentation": encode_mask(m),
            }
        )
    for i in range(len(parts)):
        m = parts.pred_masks[i].numpy()
        record["parts"].append(
            {
                "object_id": int(parts.object_index[i]),
                "part_class": int(parts.pred_classes[i]),
                "label": labels[i],
                "score": float(parts.scores[i]),
                "bbox": _bbox_xywh(m),
                "segmentation": encode_mask(m),
            }
        )
    return record
