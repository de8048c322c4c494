"""Class-agnostic average recall (AR@k) of part masks against ground-truth parts.

Used for stage 1 (pixel-grouping pseudo-labels, PartDistillation supp. Tab. 1/4) and stage 2 (part proposals).
Matching follows pycocotools' COCOeval exactly (so numbers can be cross-checked against it): for each
IoU threshold t in 0.50:0.05:0.95, predictions are visited in descending score order and each one
takes the still-unmatched GT part with the highest mask IoU ≥ t. Recall@k counts GT parts matched by
one of the image's top-k predictions; AR@k is recall averaged over the 10 thresholds, ×100, pooled
over all GT parts of the dataset, and reported per object class too.

Bookkeeping (one rule for stage-1 pseudo-labels and stage-2 proposals): an image that could not be read
is left out (its GT parts too; stage 1 stores no record for it, stage-2 evaluation skips it through
``engine/skip_aware.py``) and reported as ``num_images_skipped``; a GT part whose mask is empty, lies
outside the image or has another size than its image can be recalled by no prediction, so it is left out
of the denominator and reported as ``num_gt_parts_unusable``.

Differences from the reference implementation, on purpose: the reference matches greedily
by IoU once (detectron2's box-proposal recall) and skips images without predictions; COCOeval's protocol
counts such GT parts as missed, which is what a recall should do.
"""

import logging
from collections import OrderedDict, defaultdict

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..structures.masks import segmentation_to_rle
from .build import register_evaluator
from .distributed import gather_on_main

__all__ = ["ProposalAREvaluator", "match_ranks", "IOU_THRESHOLDS", "DEFAULT_MAX_DETS"]

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
DEFAULT_MAX_DETS = (1, 10, 50, 100, 200)
_UNMATCHED = np.iinfo(np.int64).max


def match_ranks(ious: np.ndarray, thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """COCO-style greedy matching; returns, per threshold and GT, the score rank of its matched prediction.

    Args:
        ious: [D, G] IoU of predictions (already sorted by descending score) with GT.
    Returns:
        int64 [T, G]; ``_UNMATCHED`` where the GT is not matched.
    """
    num_dt, num_gt = ious.shape
    ranks = np.full((len(thresholds), num_gt), _UNMATCHED, dtype=np.int64)
    for ti, t in enumerate(thresholds):
        taken = np.zeros(num_gt, dtype=bool)
        for d in range(num_dt):
            best, best_iou = -1, min(t, 1 - 1e-10)  # COCOeval's tie/threshold convention
            for g in range(num_gt):
                if not taken[g] and ious[d, g] >= best_iou:
                    best, best_iou = g, ious[d, g]
            if best >= 0:
                taken[best] = True
                ranks[ti, best] = d
    return ranks


def _masks_to_rles(masks: torch.Tensor):
    masks = np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))
    return mask_util.encode(masks)


class ProposalAREvaluator(DatasetEvaluator):
    """AR@k of class-agnostic part predictions (``instances.pred_masks`` + ``scores``) vs GT parts.

    GT parts come from the dataset's annotations (part category ids; ``part_to_object`` metadata maps
    them to object classes for per-class AR). With ``merge_same_class_parts`` all GT parts of the same
    class within one object (same ``object_id``) are merged into one mask, as the reference code evaluates.
    """

    def __init__(
        self,
        dataset_name: str,
        max_dets=DEFAULT_MAX_DETS,
        merge_same_class_parts: bool = True,
        predictions_key: str = "instances",
        distributed: bool = True,
    ):
        self.dataset_name = dataset_name
        self.max_dets = tuple(sorted(max_dets))
        self.merge_same_class_parts = merge_same_class_parts
        self.predictions_key = predictions_key
        self.distributed = distributed
        meta = MetadataCatalog.get(dataset_name)
        self._object_classes = meta.get("object_classes", None)
        self._part_to_object = meta.get("part_to_object", None)
        self._gt_by_image = None  # loaded lazily on first use

    def reset(self):
        self._per_image = []  # (ranks [T, G], gt object class [G]) per image
        self._unusable_gt = 0  # GT parts left out (module doc)

    def _gt(self, image_id):
        if self._gt_by_image is None:
            self._gt_by_image = {r["image_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        return self._gt_by_image[image_id]

    def _gt_parts(self, record):
        """RLEs and object-class ids of the image's GT parts (merged per object and part class)."""
        h, w = record["height"], record["width"]
        groups = OrderedDict()
        for i, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            key = (ann.get("object_id", i), ann["category_id"]) if self.merge_same_class_parts else (i,)
            groups.setdefault(key, []).append(segmentation_to_rle(ann["segmentation"], h, w))
        rles, obj_classes = [], []
        for key, parts in groups.items():
            if any(list(p["size"]) != [h, w] for p in parts):
                self._unusable_gt += 1
                continue
            rle = parts[0] if len(parts) == 1 else mask_util.merge(parts)
            if int(mask_util.area(rle)) == 0:
                self._unusable_gt += 1
                continue
            rles.append(rle)
            category = key[-1] if self.merge_same_class_parts else record["annotations"][key[0]]["category_id"]
            obj_classes.append(self._part_to_object[category] if self._part_to_object else -1)
        return rles, np.asarray(obj_classes, dtype=np.int64)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            record = self._gt(inp["image_id"])
            gt_rles, gt_obj = self._gt_parts(record)
            instances = out[self.predictions_key].to("cpu")
            if len(instances) and len(gt_rles):
                order = torch.argsort(-instances.scores, stable=True)[: self.max_dets[-1]]
                dt_rles = _masks_to_rles(instances.pred_masks[order] > 0.5)
                ious = np.asarray(mask_util.iou(dt_rles, gt_rles, [0] * len(gt_rles))).reshape(len(order), -1)
                ranks = match_ranks(ious)
            else:
                ranks = np.full((len(IOU_THRESHOLDS), len(gt_rles)), _UNMATCHED, dtype=np.int64)
            self._per_image.append((ranks, gt_obj))

    def evaluate(self):
        per_image = gather_on_main(self._per_image, self.distributed)
        unusable = gather_on_main([self._unusable_gt], self.distributed)
        if per_image is None:
            return {}
        unusable = sum(unusable)
        if not per_image:
            logger.warning("ProposalAREvaluator on %s received no predictions.", self.dataset_name)
            return {}
        ranks = np.concatenate([r for r, _ in per_image], axis=1)  # [T, total GT]
        gt_obj = np.concatenate([o for _, o in per_image])
        results = OrderedDict()
        for k in self.max_dets:
            results[f"AR@{k}"] = self._ar(ranks, k)
        if self._object_classes is not None and self._part_to_object is not None:
            by_class = defaultdict(list)
            for c in np.unique(gt_obj):
                by_class[self._object_classes[c]] = gt_obj == c
            for name, sel in by_class.items():
                for k in self.max_dets:
                    results[f"AR@{k}-{name}"] = self._ar(ranks[:, sel], k)
        results["num_gt_parts"] = int(ranks.shape[1])
        results["num_images"] = len(per_image)
        results["num_gt_parts_unusable"] = int(unusable)
        self._log_table(results)
        return {"part_proposals": results}

    @staticmethod
    def _ar(ranks, k):
        if ranks.shape[1] == 0:
            return float("nan")
        return float(100.0 * (ranks < k).mean(axis=1).mean())

    def _log_table(self, results):
        header = " | ".join(f"AR@{k}" for k in self.max_dets)
        values = " | ".join(f"{results[f'AR@{k}']:.2f}" for k in self.max_dets)
        logger.info(
            "Part proposals on %s (%d images, %d GT parts):\n| %s |\n| %s |",
            self.dataset_name,
            results["num_images"],
            results["num_gt_parts"],
            header,
            values,
        )


@register_evaluator("part_proposal")
def build_proposal_ar_evaluator(cfg, dataset_name, output_folder):
    return ProposalAREvaluator(dataset_name, distributed=True)
