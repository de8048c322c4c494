"""Mapper for pseudo-label datasets (``<source>_pseudo_<stage>``, see data/pseudo_labels/).

Training: the same Large-Scale Jittering as :class:`InstanceLSJDatasetMapper`, applied to the image,
its part masks and the masks of the objects the parts belong to; then parts smaller than
``min_part_area_ratio`` of their (augmented) object are dropped, as the reference's proposal mapper
does after augmentation (reference code, stage-2 mapper). If no part survives, the augmentation is redrawn
(up to ``max_retries`` times) before the image is skipped.

Output ``instances``: ``gt_masks`` (N×H×W bool), ``gt_classes`` (0, or the part's ``part_class`` when
``use_part_classes``), ``gt_boxes``, ``gt_scores`` (pseudo-label confidence) and ``gt_object_index``
(row of ``object_masks``); ``object_masks`` (M×H×W bool) holds the objects that kept a part.
Also ``gt_object_classes``: the ``category_id`` of each part's object (-1 = unknown; stage 4).

Pseudo-labels may be stored at a resized resolution (e.g. longer side 640 for ImageNet); the image
is first resized to the record's ``height``×``width`` so that it matches its masks.
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ...structures.masks import decode_segmentation
from ...utils.errors import ConfigError
from .instance_lsj import build_lsj_augmentations, read_image_or_none
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["PseudoLabelDatasetMapper"]

logger = logging.getLogger(__name__)

# Relative aspect-ratio difference tolerated between an image file and its pseudo-labels' size
# (rounding of the resized side); larger differences mean the labels belong to another image.
_ASPECT_TOLERANCE = 0.02


@DATASET_MAPPER_REGISTRY.register()
class PseudoLabelDatasetMapper:
    """Pseudo-label dataset dict → ``{"image", "instances", "object_masks"}`` (see module doc)."""

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: list,
        image_format: str,
        use_part_classes: bool = False,
        min_part_area_ratio: float = 0.05,
        min_object_area_ratio: float = 0.0,
        max_retries: int = 10,
    ):
        """
        Args:
            use_part_classes: ``gt_classes`` = the stored ``part_class`` (stage-3 labels) instead of 0.
            min_part_area_ratio: keep a part only if its area after augmentation is more than this
                fraction of its object's (reference code: 0.05, the reference's ``PROPOSAL_LEARNING.MIN_AREA_RATIO``;
                config key ``INPUT.PSEUDO_LABELS.MIN_PART_AREA_RATIO``); <= 0 keeps all.
            min_object_area_ratio: keep (in training) only the objects whose stored mask covers more than this
                fraction of the image, with their parts (``INPUT.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO``; reference code,
                stage-2 script: 0.05); <= 0 keeps all.
            max_retries: redraws of the random augmentation when no part survives (reference: 100).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.use_part_classes = use_part_classes
        self.min_part_area_ratio = min_part_area_ratio
        self.min_object_area_ratio = min_object_area_ratio
        self.max_retries = max_retries
        logger.info("%s (%s): %s", type(self).__name__, "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = {
            "is_train": is_train,
            "augmentations": build_lsj_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }
        # Without INPUT.PSEUDO_LABELS (a bare detectron2 config), the constructor defaults apply.
        if "PSEUDO_LABELS" in cfg.INPUT:
            group = cfg.INPUT.PSEUDO_LABELS
            ret["use_part_classes"] = group.USE_PART_CLASSES
            if "MIN_PART_AREA_RATIO" in group:
                ret["min_part_area_ratio"] = group.MIN_PART_AREA_RATIO
            if "MIN_OBJECT_AREA_RATIO" in group:
                ret["min_object_area_ratio"] = group.MIN_OBJECT_AREA_RATIO
        return ret

    def _read_image(self, dataset_dict):
        """The image resized to the pseudo-labels' height×width, or None (logged) if unusable."""
        # A dict without height/width: read_image_or_none then does not insist on the file's size.
        image = read_image_or_none({"file_name": dataset_dict["file_name"]}, self.image_format)
        if image is None:
            return None
        h, w = dataset_dict["height"], dataset_dict["width"]
        ih, iw = image.shape[:2]
        if (ih, iw) == (h, w):
            return image
        if abs((ih / iw) / (h / w) - 1) > _ASPECT_TOLERANCE:
            logger.warning(
                "Skipping %s: the image is %dx%d but its pseudo-labels are %dx%d (another aspect ratio)",
                dataset_dict["file_name"],
                iw,
                ih,
                w,
                h,
            )
            return None
        return T.ResizeTransform(ih, iw, h, w).apply_image(image)

    def __call__(self, dataset_dict: dict):
        dataset_dict = copy.deepcopy(dataset_dict)  # the loader reuses the dict across epochs
        parts = dataset_dict.pop("annotations", [])
        objects = dataset_dict.pop("objects", [])
        if self.is_train and self.min_object_area_ratio > 0 and objects:
            parts, objects = self._large_objects(parts, objects, (dataset_dict["height"], dataset_dict["width"]))
        if self.is_train and not parts:
            return None  # an image without pseudo-labels teaches nothing; the loader draws another
        image = self._read_image(dataset_dict)
        if image is None:
            return None
        if not self.is_train:
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            dataset_dict["image"] = _to_tensor(aug_input.image)
            return dataset_dict
        if self.use_part_classes and any("part_class" not in p for p in parts):
            raise ConfigError(
                f"INPUT.PSEUDO_LABELS.USE_PART_CLASSES is on, but the pseudo-labels of {dataset_dict['file_name']} "
                "have parts without part_class (a class-agnostic stage such as 'grouping'); train on a store "
                "with part classes (e.g. stage 'ranking') or turn the key off"
            )
        for _ in range(self.max_retries + 1):
            aug_input = T.AugInput(image)
            transforms = self.augmentations(aug_input)
            targets = self._targets(parts, objects, transforms, aug_input.image.shape[:2])
            if targets is not None:
                break
        else:
            logger.warning("Skipping %s: no pseudo-label part survives augmentation", dataset_dict["file_name"])
            return None
        dataset_dict["image"] = _to_tensor(aug_input.image)
        dataset_dict["instances"], dataset_dict["object_masks"] = targets
        return dataset_dict

    def _large_objects(self, parts, objects, dataset_dict_hw):
        """(parts, objects) of the objects covering more than ``min_object_area_ratio`` of the image."""
        from pycocotools import mask as mask_util

        def area(segmentation):
            if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
                return float(mask_util.area(segmentation))  # the store's compressed RLE
            h, w = dataset_dict_hw
            return float(decode_segmentation(segmentation, h, w).sum())

        image_area = max(dataset_dict_hw[0] * dataset_dict_hw[1], 1)
        kept = [o for o in objects if area(o["segmentation"]) / image_area > self.min_object_area_ratio]
        ids = {o["object_id"] for o in kept}
        return [p for p in parts if p["object_id"] in ids], kept

    def _targets(self, parts, objects, transforms, image_shape):
        """(instances, object_masks) after ``transforms``, or None when no part survives."""

        def masks_of(annos):
            # transform_instance_annotations rewrites the dict it gets: hand it a copy
            out = [
                utils.transform_instance_annotations(dict(a), transforms, image_shape)["segmentation"] for a in annos
            ]
            return np.stack(out).astype(bool) if out else np.zeros((0,) + tuple(image_shape), dtype=bool)

        part_masks, object_masks = masks_of(parts), masks_of(objects)
        part_area = part_masks.reshape(len(parts), -1).sum(axis=1)
        object_area = object_masks.reshape(len(objects), -1).sum(axis=1)
        row_of = {o["object_id"]: j for j, o in enumerate(objects)}
        keep = []
        for i, part in enumerate(parts):
            obj_area = object_area[row_of[part["object_id"]]]
            if part_area[i] == 0 or obj_area == 0:
                continue
            if part_area[i] / obj_area > self.min_part_area_ratio or self.min_part_area_ratio <= 0:
                keep.append(i)
        if not keep:
            return None
        used = sorted({row_of[parts[i]["object_id"]] for i in keep})
        new_row = {j: r for r, j in enumerate(used)}
        instances = Instances(tuple(image_shape))
        masks = torch.from_numpy(part_masks[keep])
        instances.gt_masks = masks
        instances.gt_boxes = BitMasks(masks).get_bounding_boxes()
        classes = [parts[i]["part_class"] if self.use_part_classes else 0 for i in keep]
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_scores = torch.tensor([float(parts[i].get("score", 1.0)) for i in keep], dtype=torch.float32)
        instances.gt_object_index = torch.tensor(
            [new_row[row_of[parts[i]["object_id"]]] for i in keep], dtype=torch.int64
        )
        # object class of each part's object (the store object's category_id, -1 = unknown; stage 4's
        # per-object-class part classifiers)
        instances.gt_object_classes = torch.tensor(
            [int(objects[row_of[parts[i]["object_id"]]].get("category_id", -1)) for i in keep], dtype=torch.int64
        )
        return instances, torch.from_numpy(object_masks[used])


def _to_tensor(image):
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
