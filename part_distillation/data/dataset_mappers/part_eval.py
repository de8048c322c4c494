"""Evaluation mapper for part datasets: the resized image plus one mask per *object* of the image.

Part proposals are evaluated conditioned on the objects (spec §1.4/§4.4; the reference multiplies mask
logits by the union of the GT object masks): the model needs the objects, the evaluator reads the GT
parts itself (from ``DatasetCatalog``), so the mapper outputs no part annotations.

Objects of a record, in this order of preference:

* ``object_annotations`` (Pascal-Part / panoptic-parts ``*_parts_*`` views): the dataset's own object
  masks;
* otherwise the parts grouped by ``object_id`` (toyparts ``*_parts_*``, PartImageNet ``*_parts_*``:
  one object per image); an object's mask is the union of its parts. Parts without ``object_id`` form
  one object together.

Crowd annotations are ignored, as the AR evaluator ignores them. Output::

    {"file_name", "image_id", "height", "width",   # height/width: the record's (original) size,
     "image": uint8 3×h×w,                           #   the resolution predictions are made at
     "objects": Instances((h, w)) with gt_masks (M×h×w bool, at the *resized image's* size) and
                gt_classes (the object's category id, -1 when unknown)}

:func:`part_distillation.data.gt_parts.gt_part_records` turns the same records into pseudo-label store
records (objects with their GT parts), e.g. for a GT-part "oracle" stage-2 training set.
"""
import copy
import logging
from collections import OrderedDict

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ...structures.masks import decode_segmentation
from ...utils.errors import ConfigError
from ..skips import note_skip
from .instance_lsj import read_image_or_none
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["PartEvalDatasetMapper", "decode_segmentation", "group_parts_by_object"]

logger = logging.getLogger(__name__)


def group_parts_by_object(record: dict):
    """``[(object key, object annotation or None, [part annotations])]`` of a part-dataset record.

    With ``object_annotations`` every object is listed (also one without parts) with the parts whose
    ``object_id`` is its ``object_id`` (or ``id``); otherwise objects are the distinct ``object_id`` values
    of the parts, in order of first appearance. Crowd annotations are left out.
    """
    parts = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    groups = OrderedDict()
    objects = record.get("object_annotations")
    if objects is not None:
        for i, obj in enumerate(objects):
            if obj.get("iscrowd", 0):
                continue
            key = obj.get("object_id", obj.get("id", i))
            groups[key] = (obj, [])
        for part in parts:
            key = part.get("object_id")
            if key in groups:
                groups[key][1].append(part)
    else:
        for part in parts:
            groups.setdefault(part.get("object_id"), (None, []))[1].append(part)
    return [(key, obj, members) for key, (obj, members) in groups.items()]


def _object_mask(obj, members, height, width) -> np.ndarray:
    if obj is not None and obj.get("segmentation"):
        return decode_segmentation(obj["segmentation"], height, width)
    mask = np.zeros((height, width), dtype=bool)
    for part in members:
        mask |= decode_segmentation(part["segmentation"], height, width)
    return mask


@DATASET_MAPPER_REGISTRY.register()
class PartEvalDatasetMapper:
    """Part-dataset dict → ``{"image", "objects", "height", "width", ...}`` (see module doc)."""

    @configurable
    def __init__(self, *, augmentations: list, image_format: str, part_to_object=None):
        """
        Args:
            augmentations: deterministic resizes (e.g. ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``).
            image_format: ``INPUT.FORMAT``.
            part_to_object: the dataset's part class → object class table (metadata); objects without an
                annotation of their own (e.g. toyparts' part views) take the class of their parts.
        """
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.part_to_object = list(part_to_object) if part_to_object else None
        logger.info("%s (test): %s", type(self).__name__, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        if is_train:
            raise ConfigError(
                "PartEvalDatasetMapper is an evaluation mapper: set it as INPUT.TEST_DATASET_MAPPER_NAME, "
                "not INPUT.DATASET_MAPPER_NAME."
            )
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        return {
            "augmentations": [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
            "image_format": cfg.INPUT.FORMAT,
            "part_to_object": meta.get("part_to_object", None) if meta is not None else None,
        }

    def _object_class(self, obj, members) -> int:
        if obj is not None and "category_id" in obj:
            return int(obj["category_id"])
        if self.part_to_object and members:
            owner = self.part_to_object[int(members[0]["category_id"])]
            if isinstance(owner, (list, tuple)):  # a part class shared by several objects: ambiguous
                return int(owner[0]) if len(owner) == 1 else -1
            return int(owner)
        return -1

    def __call__(self, dataset_dict: dict):
        record = copy.deepcopy(dataset_dict)
        image = read_image_or_none(record, self.image_format)
        if image is None:
            return None
        orig_h, orig_w = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        new_hw = image.shape[:2]

        groups = group_parts_by_object(record)
        masks = np.zeros((len(groups),) + tuple(new_hw), dtype=bool)
        classes = []
        for i, (_, obj, members) in enumerate(groups):
            try:
                mask = _object_mask(obj, members, orig_h, orig_w)
            except ValueError as e:  # an RLE of another size: the GT cannot be placed on this image
                note_skip("mask_size_mismatch", record["file_name"], str(e))
                return None
            masks[i] = transforms.apply_segmentation(mask.astype(np.uint8)).astype(bool)
            classes.append(self._object_class(obj, members))
        objects = Instances(tuple(new_hw))
        objects.gt_masks = torch.from_numpy(masks)
        objects.gt_classes = torch.tensor(classes, dtype=torch.int64)

        out = {k: record[k] for k in ("file_name", "image_id", "class_code") if k in record}
        out["height"] = record.get("height", orig_h)
        out["width"] = record.get("width", orig_w)
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["objects"] = objects
        return out
