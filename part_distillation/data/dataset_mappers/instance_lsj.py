"""Instance (object or part) mapper with Large-Scale Jittering, as Mask2Former trains on COCO.

Training: random flip → resize by a factor in [MIN_SCALE, MAX_SCALE] of IMAGE_SIZE → crop/pad to
IMAGE_SIZE². Evaluation: shortest-edge resize to MIN_SIZE_TEST (capped at MAX_SIZE_TEST). Masks are
rasterised (as RLE) at the image's own size *before* augmentation, so COCO RLE and polygon annotations
(PartImageNet ships polygons) take the same path: detectron2 crops polygons with shapely, which is not a
dependency here and fails on the self-intersecting polygons real annotations contain.
"""

import copy
import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ...structures.masks import segmentation_to_rle
from ..image_io import read_image
from ..skips import note_skip, reason_key
from ..validation import ERROR, MAX_ASPECT_RATIO, check_image_file
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["InstanceLSJDatasetMapper", "read_image_checked", "read_image_or_none", "mask_size_mismatch"]

logger = logging.getLogger(__name__)


def read_image_checked(dataset_dict: dict, image_format: str):
    """``(image, None)``, or ``(None, reason)`` when the file is missing, corrupt or degenerate.

    The validator's checks name *why* a read failed (truncated, 0 bytes, EXIF size mismatch, ...);
    they only run on failure, so good images cost nothing extra. Every PIL mode is decoded to 8 bits
    (16-bit images are rescaled, not clipped; see ``part_distillation.data.image_io``).
    """
    from PIL import Image

    file_name = dataset_dict["file_name"]
    try:
        image = read_image(file_name, format=image_format)
        utils.check_image_size(dataset_dict, image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for broken files
        expected_hw = (dataset_dict.get("height"), dataset_dict.get("width"))
        reasons = [f"{f.check}: {f.detail}" for f in check_image_file(file_name, expected_hw) if f.severity == ERROR]
        return None, "; ".join(reasons) or f"unreadable_image: {type(e).__name__}: {e}"
    if min(image.shape[:2]) < 2:
        return None, "degenerate_image: {}x{} (HxW)".format(*image.shape[:2])
    return image, None


def read_image_or_none(dataset_dict: dict, image_format: str):
    """The image of ``dataset_dict``; on a bad file log why and return None.

    Returning None makes detectron2's ``MapDataset`` draw another sample, so one corrupt JPEG in a
    large dataset costs a warning instead of a crash inside PIL.
    """
    image, reason = read_image_checked(dataset_dict, image_format)
    if image is None:
        note_skip(reason_key(reason), dataset_dict["file_name"], reason.split(":", 1)[-1].strip())
    return image


def mask_size_mismatch(annotations, height: int, width: int):
    """A reason (str) if an annotation's RLE size is not ``(height, width)`` (the masks then belong to
    another image or resolution: no crop or broadcast can place them), else None."""
    for i, obj in enumerate(annotations):
        segm = obj.get("segmentation")
        if isinstance(segm, dict) and "size" in segm and [int(v) for v in segm["size"]] != [height, width]:
            return f"annotation {i}: RLE size {list(segm['size'])} on a {height}x{width} image"
    return None


@DATASET_MAPPER_REGISTRY.register()
class InstanceLSJDatasetMapper:
    """Dataset dict → ``{"image", "instances" (gt_classes, gt_masks as an N×H×W bool tensor)}``."""

    @configurable
    def __init__(self, *, is_train: bool, augmentations: list, image_format: str, class_agnostic: bool = False):
        """``class_agnostic``: every instance gets class 0 (``INPUT.CLASS_AGNOSTIC``; supervised part proposals)."""
        self.is_train = is_train
        self.class_agnostic = class_agnostic
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info("%s (%s): %s", type(self).__name__, "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_lsj_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "class_agnostic": cfg.INPUT.get("CLASS_AGNOSTIC", False),
        }

    def __call__(self, dataset_dict: dict):
        dataset_dict = copy.deepcopy(dataset_dict)  # the loader reuses the dict across epochs
        image = read_image_or_none(dataset_dict, self.image_format)
        if image is None:
            return None
        height, width = image.shape[:2]
        if self.is_train:
            mismatch = mask_size_mismatch(dataset_dict.get("annotations", []), height, width)
            if mismatch:
                note_skip("mask_size_mismatch", dataset_dict["file_name"], mismatch)
                return None
            if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:  # same rule as stage 1
                note_skip("extreme_aspect_ratio", dataset_dict["file_name"], f"{height}x{width} (HxW)")
                return None
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        rasterized = [
            _rasterized(obj, height, width) for obj in dataset_dict.pop("annotations", []) if not obj.get("iscrowd", 0)
        ]
        empty = [obj for obj in rasterized if "segmentation" in obj and not mask_util.area(obj["segmentation"])]
        for _ in empty:  # empty or entirely outside the image before any augmentation: a data problem, counted
            note_skip(
                "empty_object_mask", dataset_dict["file_name"], "annotation dropped", what="Dropping an object of"
            )
        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in rasterized
            if not any(obj is e for e in empty)
        ]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        if not instances.has("gt_masks"):  # no annotation left: an image of background only
            from detectron2.structures import BitMasks

            instances.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
        # Boxes are recomputed from the cropped masks so empty (cropped-away) instances are dropped.
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances = utils.filter_empty_instances(instances)
        instances.gt_masks = instances.gt_masks.tensor
        if self.class_agnostic:
            instances.gt_classes = torch.zeros_like(instances.gt_classes)
        dataset_dict["instances"] = instances
        return dataset_dict


def _rasterized(obj: dict, height: int, width: int) -> dict:
    """``obj`` with its polygon/RLE ``segmentation`` as one compressed RLE, rasterised at the image's size
    (module doc: why). Detectron2 decodes an RLE and crops the mask like the image."""
    if "segmentation" in obj:
        obj = dict(obj, segmentation=segmentation_to_rle(obj["segmentation"], height, width))
    return obj


def build_lsj_augmentations(cfg, is_train: bool) -> list:
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    size = cfg.INPUT.IMAGE_SIZE
    augs = []
    if cfg.INPUT.RANDOM_FLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=cfg.INPUT.RANDOM_FLIP_PROB, horizontal=True))
    augs += [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size
        ),
        # masks are padded with 0 (background), not detectron2's default 255 which would read as "object"
        T.FixedSizeCrop(crop_size=(size, size), seg_pad_value=0),
    ]
    return augs
