"""Evaluation mapper for part datasets: the resized image plus one mask per *object* of the image.

Part proposals are evaluated conditioned on the objects (reference code: it multiplies mask
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
from ..object_classes import model_class_codes, synset_class_map
from ...utils.errors import ConfigError
from ..skips import note_skip
from .instance_lsj import read_image_or_none
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["PartEvalDatasetMapper", "decode_segmentation", "group_parts_by_object"]

logger = logging.getLogger(__name__)


def _model_codes(cfg):
    """The model's class list when TEST.OBJECT_CLASS_MAP needs it ("predicted" only for class_code predictions)."""
    mode = cfg.TEST.OBJECT_CLASS_MAP
    if not mode:
        return None
    try:
        return model_class_codes(cfg.TEST.MODEL_CLASS_CODES, cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
    except ConfigError:
        if mode == "synset":
            raise
        return None  # "predicted" with category_id predictions needs no class list


def load_object_predictions(path: str) -> dict:
    """image_id → predicted objects of a COCO results JSON (``TEST.OBJECT_PREDICTIONS_JSON``)."""
    from ...utils.io import read_user_json

    results = read_user_json(path, "TEST.OBJECT_PREDICTIONS_JSON")
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and "image_id" in r and "segmentation" in r for r in results
    ):
        raise ConfigError(
            f"{path}: expected a COCO results list of {{image_id, segmentation, score, class_code or category_id}}}}."
        )
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


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
    def __init__(
        self,
        *,
        augmentations: list,
        image_format: str,
        part_to_object=None,
        object_class_map: str = "",
        model_class_codes=None,
        object_class_names=None,
        object_predictions=None,
    ):
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
        if object_class_map not in ("", "synset", "predicted"):
            raise ConfigError(
                f'TEST.OBJECT_CLASS_MAP={object_class_map!r}: use "" (the dataset\'s ids), "synset" or "predicted".'
            )
        if object_class_map == "predicted" and not object_predictions:
            raise ConfigError(
                "TEST.OBJECT_CLASS_MAP 'predicted' needs TEST.OBJECT_PREDICTIONS_JSON (a COCO results file)."
            )
        self._predictions_path = object_predictions
        self._predictions = None
        self.object_class_map = object_class_map
        self.model_class_codes = list(model_class_codes or [])
        self.object_class_names = list(object_class_names) if object_class_names else None
        self._synset_ids = {}  # target synset/name → model class id (WordNet is read once, when first needed)
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
            "object_class_map": cfg.TEST.OBJECT_CLASS_MAP,
            "model_class_codes": _model_codes(cfg),
            "object_predictions": cfg.TEST.OBJECT_PREDICTIONS_JSON or None,
            "object_class_names": meta.get("object_classes", None) if meta is not None else None,
        }

    def _model_class(self, record, dataset_class: int) -> int:
        """The model's class id of an object (``object_class_map`` "synset"), -1 when it has none."""
        if not self.model_class_codes:
            raise ConfigError(
                "a wnid object class needs the model's class list: set TEST.MODEL_CLASS_CODES to the "
                "object_classes.json of its training store."
            )
        name = record.get("class_code")
        if name is None and self.object_class_names and 0 <= dataset_class < len(self.object_class_names):
            name = self.object_class_names[dataset_class]
        if name is None:
            return -1
        if name not in self._synset_ids:
            self._synset_ids[name] = synset_class_map(self.model_class_codes, [name])[0]
        return self._synset_ids[name]

    def _predicted_class(self, record, mask) -> int:
        """Class of the predicted object with the best IoU (≥ 0.5) with ``mask`` (original resolution), else -1."""
        if self._predictions is None:
            self._predictions = load_object_predictions(self._predictions_path)
        best, best_iou = None, 0.5
        for pred in self._predictions.get(record["image_id"], []):
            pm = decode_segmentation(pred["segmentation"], *mask.shape)
            union = np.logical_or(pm, mask).sum()
            iou = np.logical_and(pm, mask).sum() / union if union else 0.0
            if iou >= best_iou:
                best, best_iou = pred, iou
        if best is None:
            return -1
        if "class_code" in best:
            return self._model_class({"class_code": best["class_code"]}, -1)
        return int(best.get("category_id", -1))

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
            if self.object_class_map == "predicted":
                classes.append(self._predicted_class(record, mask))
            else:
                classes.append(self._object_class(obj, members))
        if self.object_class_map == "synset":
            classes = [self._model_class(record, c) for c in classes]
        objects = Instances(tuple(new_hw))
        objects.gt_masks = torch.from_numpy(masks)
        objects.gt_classes = torch.tensor(classes, dtype=torch.int64)

        out = {k: record[k] for k in ("file_name", "image_id", "class_code") if k in record}
        out["height"] = record.get("height", orig_h)
        out["width"] = record.get("width", orig_w)
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["objects"] = objects
        return out
