"""Class-specific part mIoU of unsupervised part predictions: mIoU-mapped and mIoU-clustered.

Protocol (PartDistillation supp. §4, "Evaluation metrics" and "Zero-shot evaluation"; reference code): the
evaluation unit is one *object instance*; its predicted parts carry ids that are not part classes
(cluster ids), so the ids are first mapped to GT part classes by majority vote, per object class, on
the evaluated split itself, and the mapped predictions are scored with the standard IoU.

* **mIoU-mapped** (``mode="mapped"``; evaluator type ``part_miou_mapped``): the predicted ids are used
  as they are (e.g. the stage-3/4 cluster ids).
* **mIoU-clustered** (``mode="clustered"``, the paper's main number; evaluator type ``part_miou``
  with ``TEST.PART_MIOU.MODE`` "clustered"): every predicted part carries a feature vector
  (``part_instances.features``, [P, D]; a model that merges same-class parts, e.g. PartDistillationModel,
  gives its per-query parts as ``part_query_instances``, which this mode reads instead, as PartDistillation
  (Cho et al. 2023) clusters per-query features); per object class all features of the split are clustered with
  :func:`~part_distillation.clustering.prototypes.cluster_features_per_class` (K = ``TEST.PART_MIOU.NUM_CLUSTERS``
  = 8, 10 k-means++ restarts, seed 0, L2-normalised features as the reference's
  ``PROPOSAL_FEATURE_NORM``), and the cluster ids become the predicted ids.
* ``mode="direct"``: the predicted ids already are GT part class ids (supervised models); no mapping.
* ``mode="within_object"``: the predicted ids are part indices *within the object's class* — what
  :class:`~part_distillation.modeling.meta_arch.distillation.PartDistillationModel` predicts after supervised
  or few-shot training on GT parts
  (:class:`~part_distillation.data.dataset_mappers.part_supervised.PartSupervisedDatasetMapper`).
  Id k of an object of class o becomes the dataset part id ``object_part_lists(meta)[o][k]``, the k-th part
  category p (ascending) with ``part_to_object[p]`` = o (:mod:`part_distillation.data.gt_parts`); then it is
  scored as "direct". An index k that object class o does not have (k ≥ its number of parts, e.g. an
  untrained output of an N_c^p = 8 classifier for a 4-part class) or an object of unknown class counts as
  *background*: its pixels are misses on the GT parts they cover, never a part prediction.
  Example (toyparts): a Car (o = 1, parts 4-6) predicted with id 1 is scored as part 5, "Car Window".

Per evaluation instance, predicted masks are painted into a label map in their order (later masks
overwrite earlier ones, as the reference rasterises), the GT parts likewise (background = G, the number
of part classes). Everything the metric needs is the overlap of every predicted *part instance*
region with every GT label, so ``process`` stores exactly that: a (P + 1) × (G + 1) pixel-count table
per object (row 0 = pixels predicted as background), the instances' ids and, for clustering, their
features. This is exact for any later relabelling of the instances (painting by cluster id in the same
order gives the same map as painting by instance) and far smaller than masks or RLEs.

``evaluate`` (after gathering from all processes):

1. Confusion per object class o, rows = predicted ids p, columns = GT part 0..G−1 and background G.
2. Majority vote (reference code): ``map_o[p] = argmax_{g < G} C_o[p, g]``, **background column excluded**, so
   a cluster mostly on background still maps to its most-overlapping part; ties and all-zero rows go to
   the lowest id (part 0), as in the reference.
3. Mapped confusion M_o ((G+1)², prediction × GT). With ``tp_c`` = M_o[c, c], ``gt_c`` = column sum,
   ``pred_c`` = row sum (both including background; reference code):
   ``IoU_c = tp_c / (gt_c + pred_c − tp_c)`` for classes with ``gt_c > 0``;
   ``mIoU_o = Σ_{c: gt_c>0} IoU_c / #{c < G : gt_c + pred_c > 0}`` — a part predicted but absent from the
   GT of that object class counts as 0 in the denominator; background is never averaged.
4. ``C-mIoU`` = mean over object classes of mIoU_o (class-balanced, the paper's number);
   ``A-mIoU`` = mean over all (object class, part class) entries with ``gt_c > 0``. Analogously
   ``C-/A-mACC`` (tp/gt) and ``C-/A-mIoPred`` (tp/pred, precision; 0 when never predicted). All ×100.

Deliberate differences from the reference: per-entry results are keyed by the dataset's
``part_classes`` (prefixed with the object name when a part class is shared by several object classes),
not by ``thing_classes`` — the reference's keys made ``A-mIoU`` cover only the first
len(thing_classes) part ids on Pascal-Part / Cityscapes-Part and collapsed duplicate names (a bug
in the reference code). Object classes with at most K features get ``min(K, #distinct features)`` clusters
(each feature its own cluster) instead of the reference's random-normal centroids (reference code).

Inputs: GT parts come from the dataset's records (``DatasetCatalog``, loaded lazily): the part
annotations grouped by ``object_id`` (``*_parts_*`` views; ``object_annotations`` give the object class,
else the ``part_to_object`` metadata; object views with ``part_annotations`` work too). Predictions, per
image, either ``outputs[i]["part_instances"]`` (``pred_masks``, ``pred_classes`` = predicted id,
``object_index`` = index of the part's object, optional ``features``) or ``outputs[i]["part_seg"]``
(long, 0 = background, k ≥ 1 = predicted id k − 1): [H, W] for the whole image (with several GT objects
each gets the map restricted to its GT mask) or [M, H, W], one map per object. Object indices refer to
the GT objects in :func:`~part_distillation.data.dataset_mappers.part_eval.group_parts_by_object` order
(the order of ``inputs[i]["objects"]`` from ``PartEvalDatasetMapper``), or, with
``object_matching="iou"``, to ``outputs[i]["instances"]`` whose masks are matched one-to-one to the GT
objects (IoU ≥ 0.5, greedy by IoU). Predictions are resized (nearest) to the GT size if needed.
"""

import json
import logging
import os
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..clustering.prototypes import cluster_features_per_class
from ..data.dataset_mappers.part_eval import decode_segmentation, group_parts_by_object
from ..utils.errors import ConfigError
from .build import register_evaluator
from .distributed import gather_on_main
from .filters import drop_object_like_parts

__all__ = [
    "PartMIoUEvaluator",
    "MIOU_MODES",
    "majority_vote_mapping",
    "mapped_confusion",
    "miou_from_confusion",
    "cluster_features_per_class",
]

logger = logging.getLogger(__name__)

MIOU_MODES = ("mapped", "clustered", "direct", "within_object")


# --------------------------------------------------------------------------------------------
# Metric helpers (pure numpy; used by the evaluator and by the tests)
# --------------------------------------------------------------------------------------------


def majority_vote_mapping(confusion: np.ndarray, num_parts: int) -> np.ndarray:
    """``map[p] = argmax_{g < num_parts} confusion[p, g]`` (background column ``num_parts`` excluded).

    Args:
        confusion: [P, G + 1] pixel counts, rows = predicted ids, columns = GT parts + background.
    Returns:
        int64 [P]; ties and rows without part overlap map to the lowest part id (0), as the reference.
    """
    if confusion.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(confusion[:, :num_parts], axis=1).astype(np.int64)


def mapped_confusion(confusion: np.ndarray, background_row: np.ndarray, mapping: np.ndarray, num_parts: int):
    """(G+1)×(G+1) confusion (rows = mapped prediction, background G) from per-id rows and a mapping."""
    out = np.zeros((num_parts + 1, num_parts + 1), dtype=np.int64)
    if len(mapping):
        np.add.at(out, mapping, confusion)
    out[num_parts] += background_row
    return out


def miou_from_confusion(confusion: np.ndarray):
    """Per-part IoU / accuracy / precision and the per-object means of a (G+1)² confusion (reference code).

    Returns:
        dict with ``iou``, ``acc``, ``prec`` ([G] float, NaN where ``gt_c == 0``), ``gt``, ``pred`` ([G]),
        and ``miou``, ``macc``, ``mprec``: Σ over parts with gt > 0 divided by #{c : gt_c + pred_c > 0}
        (NaN when that set is empty).
    """
    num_parts = confusion.shape[0] - 1
    tp = np.diag(confusion)[:num_parts].astype(np.float64)
    gt = confusion.sum(axis=0)[:num_parts].astype(np.float64)
    pred = confusion.sum(axis=1)[:num_parts].astype(np.float64)
    has_gt = gt > 0
    iou = np.full(num_parts, np.nan)
    acc = np.full(num_parts, np.nan)
    prec = np.full(num_parts, np.nan)
    iou[has_gt] = tp[has_gt] / (gt[has_gt] + pred[has_gt] - tp[has_gt])
    acc[has_gt] = tp[has_gt] / gt[has_gt]
    prec[has_gt] = np.divide(tp[has_gt], pred[has_gt], out=np.zeros(int(has_gt.sum())), where=pred[has_gt] > 0)
    denominator = int(((gt + pred) > 0).sum())

    def mean(values):
        return float(values[has_gt].sum() / denominator) if denominator else float("nan")

    return {
        "iou": iou,
        "acc": acc,
        "prec": prec,
        "gt": gt,
        "pred": pred,
        "miou": mean(iou),
        "macc": mean(acc),
        "mprec": mean(prec),
    }


# --------------------------------------------------------------------------------------------
# Prediction / GT rasterisation
# --------------------------------------------------------------------------------------------


def _resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """Bool [N, h, w] → bool [N, H, W] (nearest)."""
    if tuple(masks.shape[-2:]) == tuple(size) or masks.shape[0] == 0:
        return masks.reshape(masks.shape[0], *size) if masks.shape[0] == 0 else masks
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5


def _as_bool_masks(masks: torch.Tensor) -> torch.Tensor:
    masks = torch.as_tensor(masks).cpu()
    return masks if masks.dtype == torch.bool else masks > 0.5


def _label_map_to_parts(label_map: torch.Tensor):
    """Long [H, W] (0 = background, k ≥ 1 → id k − 1) → (bool masks [P, H, W], ids [P]) by increasing k."""
    values = torch.unique(label_map)
    values = values[values > 0]
    masks = label_map[None] == values[:, None, None]
    return masks, (values - 1).long()


def _greedy_object_matching(pred_masks: torch.Tensor, gt_masks: np.ndarray, threshold: float = 0.5) -> dict:
    """Predicted object index → GT object index, one-to-one, greedy by IoU ≥ ``threshold``."""
    if pred_masks.shape[0] == 0 or len(gt_masks) == 0:
        return {}
    pred = pred_masks.reshape(pred_masks.shape[0], -1).double()
    gt = torch.as_tensor(np.asarray(gt_masks)).reshape(len(gt_masks), -1).double()
    inter = pred @ gt.T
    union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - inter
    iou = (inter / union.clamp(min=1)).numpy()
    matches, used_p, used_g = {}, set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        p, g = divmod(int(flat), iou.shape[1])
        if iou[p, g] < threshold:
            break
        if p not in used_p and g not in used_g:
            matches[p] = g
            used_p.add(p)
            used_g.add(g)
    return matches


class PartMIoUEvaluator(DatasetEvaluator):
    """mIoU-mapped / mIoU-clustered / direct part mIoU per object class (see module docstring)."""

    def __init__(
        self,
        dataset_name: str,
        mode: str = "mapped",
        num_clusters: int = 8,
        n_init: int = 10,
        seed: int = 0,
        normalize_features: bool = True,
        object_matching: str = "index",
        predictions_key: str = "part_instances",
        distributed: bool = True,
        output_dir: str = None,
        drop_object_like_iou: float = 0.0,
    ):
        """
        Args:
            mode: "mapped", "clustered", "direct" or "within_object" (see module docstring).
            num_clusters, n_init, seed, normalize_features: K-means of the clustered mode (PartDistillation supp. §4 /
                reference code: K = 8, 10 restarts, ``random_state=0``, unit-norm features).
            object_matching: "index" (``object_index`` = GT object index) or "iou" (through
                ``outputs[i]["instances"].pred_masks``).
            output_dir: when set, the per-object-class id → part mapping is written there as JSON.
            drop_object_like_iou: when > 0, predicted parts whose IoU with their GT object's mask exceeds it are
                dropped before scoring (PartDistillation supp. "Manual evaluation" drops parts with IoU > 50 %
                with the object; :func:`~part_distillation.evaluation.filters.drop_object_like_parts`). The number
                dropped is logged and returned as ``num_dropped_object_like``. 0 = keep every part.
        """
        if mode not in MIOU_MODES:
            raise ConfigError(f"PartMIoUEvaluator: mode={mode!r} must be one of {MIOU_MODES} (TEST.PART_MIOU.MODE).")
        if object_matching not in ("index", "iou"):
            raise ConfigError(f"PartMIoUEvaluator: object_matching={object_matching!r} must be 'index' or 'iou'.")
        if int(num_clusters) < 1:
            raise ConfigError(
                f"PartMIoUEvaluator: num_clusters={num_clusters} must be ≥ 1 (TEST.PART_MIOU.NUM_CLUSTERS)."
            )
        self.dataset_name = dataset_name
        self.mode = mode
        self.num_clusters = int(num_clusters)
        self.n_init = int(n_init)
        self.seed = int(seed)
        self.normalize_features = bool(normalize_features)
        self.object_matching = object_matching
        self.predictions_key = predictions_key
        self.distributed = distributed
        self.output_dir = output_dir
        if not 0.0 <= float(drop_object_like_iou) <= 1.0:
            raise ConfigError(
                f"PartMIoUEvaluator: drop_object_like_iou={drop_object_like_iou} must be in [0, 1] "
                "(TEST.PART_MIOU.DROP_OBJECT_LIKE_IOU; the paper's manual evaluation uses 0.5, 0 = off)."
            )
        self.drop_object_like_iou = float(drop_object_like_iou)
        self._read_class_metadata()
        self._object_parts = None  # object class → its dataset part ids (mode "within_object"), built lazily
        self._records = None  # image_id → record, loaded lazily

    # ------------------------------------------------------------------ GT

    def _read_class_metadata(self):
        """Part classes (``part_classes``, or ``thing_classes`` of a part dataset), object classes and the
        part → object map from the dataset's metadata (None where absent: some are set by loading it)."""
        meta = MetadataCatalog.get(self.dataset_name)
        names = meta.get("part_classes", None)
        if names is None and meta.get("is_part_dataset", False):
            names = meta.get("thing_classes", None)
        self._part_classes = list(names) if names is not None else None
        self._object_classes = meta.get("object_classes", None)
        self._part_to_object = meta.get("part_to_object", None)

    def _ensure_loaded(self):
        """Load the records (and metadata completed by loading) on first use."""
        if self._records is not None:
            return
        self._records = {r["image_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        if self._part_classes is None:
            self._read_class_metadata()
        if self._part_classes is None:
            raise ConfigError(
                f"PartMIoUEvaluator: dataset {self.dataset_name!r} has no 'part_classes' metadata (nor "
                "'thing_classes' with is_part_dataset); the number of part classes is unknown."
            )

    def _object_class(self, obj, members) -> int:
        if obj is not None and "category_id" in obj:
            return int(obj["category_id"])
        if self._part_to_object is not None and members:
            owner = self._part_to_object[members[0]["category_id"]]
            if isinstance(owner, (int, np.integer)):
                return int(owner)
        return -1

    def _gt_objects(self, record):
        """[(object class, GT label map int64 [H, W] with background G, object mask bool [H, W])]."""
        h, w = record_hw = int(record["height"]), int(record["width"])
        if "part_annotations" in record:  # objects view: annotations are the objects
            record = {"annotations": record["part_annotations"], "object_annotations": record.get("annotations", [])}
        num_parts = len(self._part_classes)
        objects = []
        for _, obj, members in group_parts_by_object(record):
            labels = np.full(record_hw, num_parts, dtype=np.int64)
            obj_mask = np.zeros(record_hw, dtype=bool)
            for part in members:  # later parts overwrite earlier ones (reference rasterisation)
                mask = decode_segmentation(part["segmentation"], h, w)
                labels[mask] = int(part["category_id"])
                obj_mask |= mask
            if obj is not None and obj.get("segmentation"):
                obj_mask = decode_segmentation(obj["segmentation"], h, w)
            objects.append((self._object_class(obj, members), labels, obj_mask))
        return objects

    # ------------------------------------------------------------------ predictions

    def _predicted_parts(self, output, gt_objects, size):
        """Per GT object: (bool masks [P, H, W], ids [P] long, features [P, D] or None)."""
        num_objects = len(gt_objects)
        per_object = [[] for _ in range(num_objects)]
        key = self.predictions_key
        if self.mode == "clustered" and key == "part_instances" and "part_query_instances" in output:
            # one part per query, before any same-class merge (modeling/meta_arch/postprocessing.py)
            key = "part_query_instances"
        if key in output:
            parts = output[key]
            masks = _resize_masks(_as_bool_masks(parts.pred_masks), size)
            ids = torch.as_tensor(parts.pred_classes).cpu().long()
            feats = parts.get("features").detach().cpu().float() if parts.has("features") else None
            if parts.has("object_index"):
                owner = torch.as_tensor(parts.object_index).cpu().long().tolist()
            elif num_objects <= 1:
                owner = [0] * len(ids)
            else:
                raise ValueError(
                    f"{self.predictions_key} without object_index for an image with {num_objects} GT objects"
                )
            if self.object_matching == "iou":
                pred_objects = _resize_masks(_as_bool_masks(output["instances"].pred_masks), size)
                matches = _greedy_object_matching(pred_objects, [o[2] for o in gt_objects])
                owner = [matches.get(o, -1) for o in owner]
            for j, o in enumerate(owner):
                if 0 <= o < num_objects:
                    per_object[o].append(j)
            return [
                (masks[idx], ids[idx], feats[idx] if feats is not None else None)
                for idx in (torch.tensor(sel, dtype=torch.long) for sel in per_object)
            ]
        if "part_seg" in output:
            seg = torch.as_tensor(output["part_seg"]).cpu().long()
            single = seg.dim() == 2
            if tuple(seg.shape[-2:]) != tuple(size):
                seg = F.interpolate(seg.view(-1, 1, *seg.shape[-2:]).float(), size=tuple(size), mode="nearest")
                seg = seg[0, 0].long() if single else seg[:, 0].long()
            if single:
                result = []
                for _, _, obj_mask in gt_objects:
                    obj_seg = seg if num_objects == 1 else seg * torch.from_numpy(obj_mask)
                    masks, ids = _label_map_to_parts(obj_seg)
                    result.append((masks, ids, None))
                return result
            if seg.shape[0] != num_objects:
                raise ValueError(f"part_seg has {seg.shape[0]} object maps for {num_objects} GT objects")
            return [(*_label_map_to_parts(s), None) for s in seg]
        raise KeyError(f"PartMIoUEvaluator: outputs carry neither {self.predictions_key!r} nor 'part_seg'")

    # ------------------------------------------------------------------ evaluator API

    def reset(self):
        self._objects = []  # per GT object: dict(object_class, background_row, rows, ids, features)
        self._num_dropped = 0  # parts dropped as object-like (drop_object_like_iou)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._ensure_loaded()
            record = self._records[inp["image_id"]]
            gt_objects = self._gt_objects(record)
            if not gt_objects:
                continue
            num_labels = len(self._part_classes) + 1
            predictions = self._predicted_parts(out, gt_objects, gt_objects[0][1].shape)
            for (object_class, gt, obj_mask), (masks, ids, feats) in zip(gt_objects, predictions):
                if self.drop_object_like_iou > 0 and len(ids):
                    owner = np.zeros(len(ids), dtype=np.int64)
                    keep = drop_object_like_parts(masks, obj_mask[None], owner, self.drop_object_like_iou)
                    self._num_dropped += int((~keep).sum())
                    keep = torch.from_numpy(keep)
                    masks, ids = masks[keep], ids[keep]
                    feats = feats[keep] if feats is not None else None
                if self.mode == "clustered" and len(ids) and feats is None:
                    raise ValueError(
                        "mIoU-clustered needs part features: outputs[i]['part_instances'].features ([P, D])."
                    )
                region = np.full(gt.shape, -1, dtype=np.int64)
                for j in range(masks.shape[0]):  # later masks overwrite earlier ones
                    region[masks[j].numpy()] = j
                counts = np.bincount(
                    ((region + 1) * num_labels + gt).ravel(), minlength=(masks.shape[0] + 1) * num_labels
                ).reshape(masks.shape[0] + 1, num_labels)
                self._objects.append(
                    {
                        "object_class": object_class,
                        "background_row": counts[0],
                        "rows": counts[1:],
                        "ids": ids.numpy().astype(np.int64),
                        "features": feats.numpy() if (feats is not None and self.mode == "clustered") else None,
                    }
                )

    def evaluate(self):
        objects = gather_on_main(self._objects, self.distributed)
        dropped = gather_on_main([self._num_dropped], self.distributed)
        if objects is None:
            return {}
        dropped = sum(dropped)
        if not objects:
            logger.warning("PartMIoUEvaluator on %s received no objects.", self.dataset_name)
            return {}
        self._ensure_loaded()
        num_parts = len(self._part_classes)
        by_class = defaultdict(list)
        for obj in objects:
            by_class[obj["object_class"]].append(obj)
        ids_by_class = {c: [o["ids"] for o in objs] for c, objs in by_class.items()}
        if self.mode == "clustered":
            feats = {}
            for c, objs in by_class.items():
                with_parts = [o["features"] for o in objs if o["features"] is not None and len(o["ids"])]
                feats[c] = np.concatenate(with_parts) if with_parts else np.zeros((0, 1), np.float32)
            labels = cluster_features_per_class(
                feats, self.num_clusters, self.n_init, self.seed, self.normalize_features
            )
            for c, objs in by_class.items():
                sizes = [len(o["ids"]) for o in objs]
                ids_by_class[c] = np.split(labels[c], np.cumsum(sizes)[:-1]) if objs else []

        per_class, mappings = OrderedDict(), {}
        for c in sorted(by_class):
            objs = by_class[c]
            ids = np.concatenate(ids_by_class[c]) if objs else np.zeros(0, np.int64)
            rows = np.concatenate([o["rows"] for o in objs]) if objs else np.zeros((0, num_parts + 1), np.int64)
            background_row = np.sum([o["background_row"] for o in objs], axis=0)
            num_ids = int(ids.max()) + 1 if len(ids) else 0
            confusion = np.zeros((num_ids, num_parts + 1), dtype=np.int64)
            np.add.at(confusion, ids, rows)
            if self.mode == "direct":
                if num_ids > num_parts:
                    raise ValueError(f"direct mIoU: predicted id {num_ids - 1} ≥ number of part classes {num_parts}")
                mapping = np.arange(num_ids, dtype=np.int64)
            elif self.mode == "within_object":
                mapping = self._within_object_mapping(c, num_ids, num_parts)
            else:
                mapping = majority_vote_mapping(confusion, num_parts)
            mappings[c] = mapping
            scores = miou_from_confusion(mapped_confusion(confusion, background_row, mapping, num_parts))
            per_class[c] = (scores, len(objs))
        results = self._summarise(per_class)
        if self.drop_object_like_iou > 0:
            results["num_dropped_object_like"] = int(dropped)
            logger.info(
                "PartMIoUEvaluator: dropped %d part predictions with IoU > %.2f with their object.",
                dropped,
                self.drop_object_like_iou,
            )
        self._write_mapping(mappings)
        self._log(results, len(objects))
        return {f"part_miou_{self.mode}": results}

    def _within_object_mapping(self, object_class: int, num_ids: int, num_parts: int) -> np.ndarray:
        """Within-object index k of class ``object_class`` → dataset part id; unknown → background (``num_parts``)."""
        from ..data.gt_parts import object_part_lists

        if self._part_to_object is None:
            raise ConfigError(
                f"PartMIoUEvaluator mode 'within_object' needs the 'part_to_object' metadata of {self.dataset_name!r} "
                "to turn within-object part indices into dataset part ids."
            )
        if self._object_parts is None:
            self._object_parts = object_part_lists(self._part_to_object)
        parts = self._object_parts[object_class] if 0 <= object_class < len(self._object_parts) else []
        mapping = np.full(num_ids, num_parts, dtype=np.int64)
        mapping[: min(num_ids, len(parts))] = parts[:num_ids]
        if num_ids > len(parts):
            logger.info(
                "within_object mIoU: object class %s has %d part classes; predicted indices %d..%d count as "
                "background.",
                self._object_name(object_class),
                len(parts),
                len(parts),
                num_ids - 1,
            )
        return mapping

    # ------------------------------------------------------------------ reporting

    def _object_name(self, c):
        if c >= 0 and self._object_classes is not None and c < len(self._object_classes):
            return str(self._object_classes[c])
        return str(c)

    def _entry_name(self, c, g):
        part = str(self._part_classes[g])
        owner = self._part_to_object[g] if self._part_to_object is not None and g < len(self._part_to_object) else None
        return part if isinstance(owner, (int, np.integer)) else f"{self._object_name(c)}/{part}"

    def _summarise(self, per_class):
        results = OrderedDict()
        metrics = (("mIoU", "miou", "iou"), ("mACC", "macc", "acc"), ("mIoPred", "mprec", "prec"))
        for label, mean_key, entry_key in metrics:
            class_means = [m[mean_key] for m, _ in per_class.values() if not np.isnan(m[mean_key])]
            entries = np.concatenate([m[entry_key][m["gt"] > 0] for m, _ in per_class.values()] or [np.zeros(0)])
            results[f"C-{label}"] = 100.0 * float(np.mean(class_means)) if class_means else float("nan")
            results[f"A-{label}"] = 100.0 * float(np.mean(entries)) if len(entries) else float("nan")
        for c, (m, _) in per_class.items():
            results[f"mIoU-{self._object_name(c)}"] = 100.0 * m["miou"]
        for c, (m, _) in per_class.items():
            for g in np.nonzero(m["gt"] > 0)[0]:
                results[f"IoU-{self._entry_name(c, int(g))}"] = 100.0 * float(m["iou"][g])
        results["num_objects"] = int(sum(n for _, n in per_class.values()))
        results["num_object_classes"] = len(per_class)
        return results

    def _write_mapping(self, mappings):
        if not self.output_dir:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"part_miou_{self.mode}_mapping.json")
        payload = {
            self._object_name(c): {
                str(p): str(self._part_classes[g]) if g < len(self._part_classes) else "background"
                for p, g in enumerate(m.tolist())
            }
            for c, m in mappings.items()
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)

    def _log(self, results, num_objects):
        logger.info(
            "Part mIoU-%s on %s (%d objects): C-mIoU %.2f | A-mIoU %.2f | C-mACC %.2f | A-mACC %.2f",
            self.mode,
            self.dataset_name,
            num_objects,
            results["C-mIoU"],
            results["A-mIoU"],
            results["C-mACC"],
            results["A-mACC"],
        )


def _miou_evaluator_from_cfg(cfg, dataset_name, output_folder, mode):
    c = cfg.TEST.PART_MIOU
    return PartMIoUEvaluator(
        dataset_name,
        mode=mode,
        num_clusters=c.NUM_CLUSTERS,
        n_init=c.N_INIT,
        normalize_features=c.NORMALIZE_FEATURES,
        object_matching=c.OBJECT_MATCHING,
        distributed=True,
        output_dir=output_folder,
        drop_object_like_iou=c.DROP_OBJECT_LIKE_IOU,
    )


@register_evaluator("part_miou")
def build_part_miou_evaluator(cfg, dataset_name, output_folder):
    """mIoU in the mode ``TEST.PART_MIOU.MODE`` (default "clustered", the paper's reported number)."""
    return _miou_evaluator_from_cfg(cfg, dataset_name, output_folder, cfg.TEST.PART_MIOU.MODE)


@register_evaluator("part_miou_mapped")
def build_part_miou_mapped_evaluator(cfg, dataset_name, output_folder):
    """mIoU-mapped: the predictions' own ids, majority-vote mapped (PartDistillation supp. Tab. 3)."""
    return _miou_evaluator_from_cfg(cfg, dataset_name, output_folder, "mapped")
