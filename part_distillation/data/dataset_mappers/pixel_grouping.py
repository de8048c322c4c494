"""Mapper for stage 1 (pixel grouping): the image resized so its longer side is INPUT.IMAGE_SIZE, plus
the object masks to group inside, taken from the record's annotations (an object-view dataset), from a
COCO-format results JSON, or from the ``objects`` of a pseudo-label store record (source "store": e.g.
stage 3 ranks the parts inside the objects stage 1 stored, with their ``category_id``). With an object *model* as the
source the model finds the objects
and this mapper only prepares the image.
"""

import copy
import logging
from collections import defaultdict

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ...structures.masks import decode_segmentation
from ...utils.errors import ConfigError
from ...utils.io import read_user_json
from ..skips import note_skip, reason_key
from ..validation import MAX_ASPECT_RATIO
from .instance_lsj import read_image_checked
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["PixelGroupingDatasetMapper", "load_object_results", "object_filter_args"]

logger = logging.getLogger(__name__)


def object_filter_args(cfg) -> dict:
    """``{score_thresh, min_area_ratio, topk}`` from ``MODEL.PIXEL_GROUPING``: the keyword arguments of the grouping
    model's ``modeling.meta_arch.object_source.filter_objects``, whose drops the mapper counts."""
    pg = cfg.MODEL.PIXEL_GROUPING
    return {
        "score_thresh": pg.OBJECT_SCORE_THRESH,
        "min_area_ratio": pg.OBJECT_MIN_AREA_RATIO,
        "topk": pg.OBJECT_TOPK,
    }


def load_object_results(path: str) -> dict:
    """image_id → list of {segmentation, score, category_id} from a COCO results JSON."""
    results = read_user_json(path, "MODEL.PIXEL_GROUPING.OBJECT_MASKS_JSON")
    if not isinstance(results, list) or not all("segmentation" in r and "image_id" in r for r in results):
        raise ConfigError(
            f"{path}: expected a COCO results list of {{image_id, category_id, segmentation, score}}, "
            "as detectron2's COCOEvaluator writes to coco_instances_results.json."
        )
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    return by_image


@DATASET_MAPPER_REGISTRY.register()
class PixelGroupingDatasetMapper:
    """Dataset dict → ``{"image", "objects" (gt_masks, gt_classes, scores; absent for model sources), ...}``.

    An unreadable image maps to ``{"skipped": reason, ...}`` instead of None: during labelling every
    dataset index must produce exactly one output (detectron2 would silently substitute another image).
    """

    @configurable
    def __init__(
        self, *, image_size: int, image_format: str, object_source: str, object_results=None, object_filter=None
    ):
        """``object_filter``: ``{score_thresh, min_area_ratio, topk}`` of the grouping model, only to *count*
        the objects it will drop, by reason (the model does the dropping)."""
        self.image_size = image_size
        self.object_filter = object_filter
        self.image_format = image_format
        self.object_source = object_source
        self._object_results_path = object_results
        self._object_results = None

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        pg = cfg.MODEL.PIXEL_GROUPING
        return {
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "image_format": cfg.INPUT.FORMAT,
            "object_source": pg.OBJECT_MASK_SOURCE,
            "object_results": pg.OBJECT_MASKS_JSON or None,
            "object_filter": object_filter_args(cfg),
        }

    def _objects_of(self, record, orig_hw):
        if self.object_source == "gt":
            if "annotations" not in record and "class_id" in record:
                raise ConfigError(
                    f"MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE='gt' but {record['file_name']} has an image-level label "
                    "only (no object annotations): use OBJECT_MASK_SOURCE model (a stage-0 checkpoint), detic or json."
                )
            anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
            scores = [1.0] * len(anns)
        elif self.object_source == "store":  # a pseudo-label dataset: the objects an earlier stage stored
            anns = list(record.get("objects", []))
            scores = [float(a.get("score", 1.0)) for a in anns]
        elif self.object_source == "json":
            if self._object_results is None:
                self._object_results = load_object_results(self._object_results_path)
            anns = self._object_results.get(record["image_id"], [])
            scores = [float(a.get("score", 1.0)) for a in anns]
        else:
            return None  # the model finds the objects
        h, w = orig_hw
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for i, a in enumerate(anns):
            masks[i] = decode_segmentation(a["segmentation"], h, w)  # ValueError: RLE of another size
        classes = [int(a.get("category_id", -1)) for a in anns]
        return masks, np.asarray(classes, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def __call__(self, dataset_dict: dict):
        record = copy.deepcopy(dataset_dict)
        image, reason = read_image_checked(record, self.image_format)
        if image is None:
            # labelling must account for every image, so a bad one becomes a counted, named skip
            return self._skipped(record, reason_key(reason), reason.split(":", 1)[-1].strip())
        h, w = image.shape[:2]
        if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:  # the resized short side would be a few pixels
            return self._skipped(record, "extreme_aspect_ratio", f"{h}x{w} (HxW) exceeds {MAX_ASPECT_RATIO:g}:1")
        try:
            objects = self._objects_of(record, (h, w))
        except ValueError as e:
            if isinstance(e, ConfigError):  # e.g. an unusable OBJECT_MASKS_JSON: a config problem, not this image's
                raise
            return self._skipped(record, "mask_size_mismatch", str(e))
        scale = self.image_size / max(h, w)
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        resize = T.ResizeTransform(h, w, new_h, new_w)
        out = {k: record[k] for k in ("file_name", "image_id", "height", "width") if k in record}
        out.setdefault("height", h)
        out.setdefault("width", w)
        for key in ("dataset_index", "class_code", "class_id"):
            if key in record:
                out[key] = record[key]
        out["image"] = torch.as_tensor(np.ascontiguousarray(resize.apply_image(image).transpose(2, 0, 1)))
        if objects is not None:
            masks, classes, scores = objects
            resized = (
                np.stack([resize.apply_segmentation(m.astype(np.uint8)) for m in masks])
                if len(masks)
                else (np.zeros((0, new_h, new_w), np.uint8))
            )
            inst = Instances((new_h, new_w))
            inst.gt_masks = torch.from_numpy(resized.astype(bool))
            inst.gt_classes = torch.from_numpy(classes)
            inst.scores = torch.from_numpy(scores)
            out["objects"] = inst
            out["dropped"] = self._drop_counts(inst, masks)
        return out

    @staticmethod
    def _skipped(record, reason, detail):
        note_skip(reason, record["file_name"], detail)
        keep = ("file_name", "image_id", "dataset_index")
        return {"skipped": f"{reason}: {detail}", **{k: record[k] for k in keep if k in record}}

    def _drop_counts(self, inst, original_masks) -> dict:
        """Objects the grouping model's filter will drop, by reason (same rule as
        ``modeling.meta_arch.object_source.filter_objects``, on the same resized masks)."""
        if self.object_filter is None or len(inst) == 0:
            return {}
        f = self.object_filter
        h, w = inst.image_size
        area = inst.gt_masks.flatten(1).sum(1).float() / float(h * w)
        empty = torch.from_numpy(~original_masks.reshape(len(original_masks), -1).any(1))
        low_score = ~empty & (inst.scores < f["score_thresh"])
        small = ~empty & ~low_score & ((area < f["min_area_ratio"]) | (area == 0))
        kept = int((~(empty | low_score | small)).sum())
        counts = {
            "empty_object_mask": int(empty.sum()),
            "object_below_score": int(low_score.sum()),
            "object_below_min_area": int(small.sum()),
            "object_beyond_topk": max(0, kept - max(f["topk"], 0)),
        }
        return {k: v for k, v in counts.items() if v}
