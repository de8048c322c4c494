"""Lazy detectron2 registration of CUB-200-2011 (birds: bbox, 15 keypoints, foreground masks).

Registers ``cub_train`` (5,994 images) and ``cub_test`` (5,794 images): the official split of
``train_test_split.txt`` (1 = train), which is what the part-discovery papers use for training and
evaluation (MPAE supp. A.1 "5,994 ... for training and 5,794 ... for
testing"; Choudhury et al. 2021 appendix "We use the official train split for training").

Expected layout (``root`` defaults to ``$DETECTRON2_DATASETS/CUB_200_2011``)::

    CUB_200_2011/
      images.txt  train_test_split.txt  bounding_boxes.txt  image_class_labels.txt  classes.txt
      parts/parts.txt  parts/part_locs.txt
      images/<class>/<image>.jpg
      segmentations/<class>/<image>.png   (separate official download; may also sit next to
                                           CUB_200_2011/, as the archive extracts)

Each record has ``file_name``, ``image_id`` (CUB's 1-based id), ``class_code`` (the class folder),
``class_id`` (0-based species index; names in the metadata ``species``, set at load time),
``bbox`` ([x, y, w, h] as in ``bounding_boxes.txt``) with ``bbox_mode`` XYWH_ABS, ``keypoints`` (15
``[x, y, visible]`` in ``parts.txt`` order, raw pixel values of ``part_locs.txt`` without any offset,
visible ∈ {0, 1}), ``fg_mask_file`` (the soft 0–255 mask PNG; absent with a warning when the
segmentations are not installed) and ``annotations``: one "bird" instance with the same box and the
keypoints flattened in detectron2/COCO convention (v = 2 visible, 0 not).

``height``/``width`` are not stored (CUB lists no sizes and opening 11,788 images at load time is
what this avoids); detectron2's ``check_image_size``, called by the project's mappers, fills them in
when the image is read. Nothing is read at import time.
"""

import logging
import os

from detectron2.structures import BoxMode

from .common import dataset_root, first_existing, readme_hint, register_splits, require, sync_metadata

__all__ = ["CUB_KEYPOINT_NAMES", "CUB_KEYPOINT_FLIP_MAP", "register_cub", "default_cub_root"]

logger = logging.getLogger(__name__)

_README = "datasets/README.md#cub-200-2011"
_HINT = readme_hint(_README)
_SPLITS = {"train": 1, "test": 0}  # value of is_training_image in train_test_split.txt

CUB_KEYPOINT_NAMES = [
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
    "nape", "right eye", "right leg", "right wing", "tail", "throat",
]  # fmt: skip
CUB_KEYPOINT_FLIP_MAP = [
    ("left eye", "right eye"),
    ("left leg", "right leg"),
    ("left wing", "right wing"),
]


def default_cub_root():
    return dataset_root("CUB_200_2011")


def _metadata(root, split):
    return {
        "thing_classes": ["bird"],
        "keypoint_names": list(CUB_KEYPOINT_NAMES),
        "keypoint_flip_map": list(CUB_KEYPOINT_FLIP_MAP),
        "image_root": os.path.join(root, "images"),
        "evaluator_type": "part_keypoints",
        "split": split,
        "dataset_root": root,
    }


def _read_table(root, rel_path):
    """Rows of a whitespace-separated CUB text file, keyed by their first (integer) column."""
    path = require(os.path.join(root, rel_path), "CUB-200-2011 file", _HINT, os.path.isfile)
    rows = {}
    with open(path) as f:
        for line in f:
            fields = line.split(None, 1)
            if fields:
                rows[int(fields[0])] = fields[1].strip() if len(fields) > 1 else ""
    return rows


def _segmentation_dir(root):
    candidates = (os.path.join(root, "segmentations"), os.path.join(os.path.dirname(root), "segmentations"))
    return first_existing(candidates, os.path.isdir)


def _read_keypoints(root, num_parts):
    path = require(os.path.join(root, "parts", "part_locs.txt"), "CUB-200-2011 file", _HINT, os.path.isfile)
    keypoints = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5:
                continue
            image_id, part = int(fields[0]), int(fields[1]) - 1
            kps = keypoints.setdefault(image_id, [[0.0, 0.0, 0] for _ in range(num_parts)])
            kps[part] = [float(fields[2]), float(fields[3]), int(float(fields[4]) > 0)]
    return keypoints


def _load(name, split, root):
    root = require(root or default_cub_root(), "CUB-200-2011", _HINT, os.path.isdir)
    images = _read_table(root, "images.txt")
    is_train = _read_table(root, "train_test_split.txt")
    boxes = _read_table(root, "bounding_boxes.txt")
    labels = _read_table(root, "image_class_labels.txt")
    classes = _read_table(root, "classes.txt")
    parts = _read_table(root, os.path.join("parts", "parts.txt"))
    part_names = [parts[i] for i in sorted(parts)]
    if part_names != CUB_KEYPOINT_NAMES:
        logger.warning(
            "CUB parts.txt lists %s, expected %s; keypoints follow parts.txt ids",
            part_names,
            CUB_KEYPOINT_NAMES,
        )
    keypoints = _read_keypoints(root, len(CUB_KEYPOINT_NAMES))
    seg_dir = _segmentation_dir(root)
    if seg_dir is None:
        logger.warning(
            "CUB segmentations not found under %s (or next to it): records get no fg_mask_file",
            root,
        )

    meta = _metadata(root, split)
    meta["species"] = [classes[i] for i in sorted(classes)]
    sync_metadata(name, meta)

    records = []
    for image_id in sorted(images):
        if int(is_train[image_id]) != _SPLITS[split]:
            continue
        rel = images[image_id]
        bbox = [float(v) for v in boxes[image_id].split()]
        kps = keypoints.get(image_id, [[0.0, 0.0, 0] for _ in CUB_KEYPOINT_NAMES])
        record = {
            "file_name": os.path.join(root, "images", rel),
            "image_id": image_id,
            "class_code": os.path.dirname(rel),
            "class_id": int(labels[image_id]) - 1,
            "bbox": bbox,
            "bbox_mode": BoxMode.XYWH_ABS,
            "keypoints": kps,
            "annotations": [
                {
                    "bbox": list(bbox),
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 0,
                    "iscrowd": 0,
                    "keypoints": [v for x, y, vis in kps for v in ((x, y, 2) if vis else (0.0, 0.0, 0))],
                }
            ],
        }
        if seg_dir is not None:
            record["fg_mask_file"] = os.path.join(seg_dir, os.path.splitext(rel)[0] + ".png")
        records.append(record)
    return records


def register_cub(root=None):
    """Register ``cub_{train,test}``; ``root=None`` resolves ``$DETECTRON2_DATASETS`` at load time."""
    register_splits("cub", _SPLITS, root, default_cub_root, _load, _metadata)


register_cub()
