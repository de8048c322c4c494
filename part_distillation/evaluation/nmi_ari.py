"""NMI / ARI of discovered parts against GT part labels: mask-based and keypoint-based (×100).

Definitions (Choudhury et al. 2021 §4.1 "NMI and ARI ... on the full image, but also on
foreground pixels only (FG-NMI, FG-ARI)"): NMI is scikit-learn's ``normalized_mutual_info_score`` with
the arithmetic-mean normaliser, ARI its ``adjusted_rand_score``; labels are **pooled over the whole
split** (one contingency table per dataset, not a per-image average).

Pooling millions of pixels as label arrays does not fit in memory, so the evaluator accumulates the
contingency table (GT label × predicted label counts), which determines both scores exactly:

* NMI = MI / ((H(gt) + H(pred)) / 2), MI from ``sklearn.metrics.mutual_info_score(None, None,
  contingency=table)``, entropies from the table's marginals; scikit-learn's limit cases are kept (1 when
  both labelings have one label, 0 when MI = 0);
* ARI from the 2×2 pair-confusion matrix computed from the table with Python integers (the reference code's
  "overflow-safe ARI"; no rescaling needed): ``2(tp·tn − fn·fp) / ((tp+fn)(fn+tn) + (tp+fp)(fp+tn))``,
  1 when fn = fp = 0 — scikit-learn's formula.

The tests check both against direct scikit-learn calls on the flattened label arrays.

Predictions (the project's canonical layout): ``outputs[i]["part_seg"]`` long
[H, W], 0 = background, 1..K = parts; optionally ``outputs[i]["part_probs"]`` [K+1, H, W]. Without
``part_seg``, ``outputs[i]["part_instances"]`` is painted into one: masks in their order, **later masks
overwrite earlier ones**, pixel label = ``pred_classes + 1`` (no argmax over scores), so PartDistillation
outputs (``part_instances``) and the discovery heads (``part_seg``) are both accepted.

Mask-based GT (evaluator type ``part_nmi_ari``; PartImageNet-Seg, DeepFashion, part-annotated datasets):
``inputs[i]["sem_seg"]`` when the mapper provides it, else the record's ``sem_seg_file_name`` PNG, its
DeepFashion ``parsing_file_name``, or its part annotations painted in order (label = category id + 1,
background 0). The background label is the metadata ``background_label`` (PartImageNet-Seg 40,
DeepFashion 0; painted annotations 0); ``ignore_label`` (default 255) pixels are left out.
* NMI/ARI: all non-ignored pixels, predicted labels as they are (background included);
* FG-NMI/ARI: GT-foreground pixels only; the predicted label is the argmax over the K part scores
  (background impossible; Choudhury et al. 2021 §4.1, "on foreground pixels only"): of
  ``part_fg_probs`` [K, H, W] when given (the part distribution before any fg mask, which the discovery
  meta-architecture returns), else of the foreground channels of ``part_probs``, else ``part_seg`` (a
  foreground pixel predicted as background keeps label 0). Masked ``part_probs`` alone would send every
  pixel outside the mask to part 1 (all K channels 0 there).
Predictions are compared at GT resolution (nearest resize of the prediction), or, with ``eval_size``,
both are resized (nearest) to that square grid (protocol B/C: 128). When the input was cropped around an
object (the view mappers' ``crop_box`` (x0, y0, x1, y1), original pixels), the GT is cropped to the same box
first, and the box's pixels outside the image are ignored: NMI/ARI and FG-NMI/ARI are computed inside the crop
(Choudhury et al. 2021 appendix, PASCAL-Part: "we also crop the image to the target objects' bounding boxes
for NMI/ARI calculation (but evaluate *with* background pixels in this case)").

Keypoint-based GT (evaluator type ``part_keypoints``; CUB, CelebA/MAFL; the reference evaluation code): each visible
landmark (visibility > 0.5) is one sample with GT label = its landmark index; its predicted label is the
part map at the landmark, nearest-neighbour sampled as ``grid_sample(mode="nearest", align_corners=False)``
at ``(x/W, y/H)`` does: the pixel whose span [j, j+1) contains ``x·W_pred/W`` (``floor``). That is
grid_sample's pixel everywhere except exactly on a pixel boundary, where grid_sample's float rounding of
``u − 0.5`` picks either neighbour (integer CUB coordinates at full resolution are all such ties); the
floor rule is deterministic there. Samples are pooled over
the split. Full variant: ``part_seg`` (background possible); FG variant: argmax over the foreground
channels of ``part_probs`` (else ``part_seg``, as above). Landmarks come from ``inputs[i]["keypoints"]``
(``KeypointDatasetMapper``: K×3 in output pixels, image size = ``inputs[i]`` height/width), else from the
record (original pixels; size ``orig_size`` / record height/width); points outside the image are skipped.
Which crop/resize defines "FG" vs "full" (e.g. Choudhury's bbox crop for FG) is the mapper's choice.
"""

import logging
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from sklearn.metrics import mutual_info_score

from ..data.dataset_mappers.part_eval import decode_segmentation
from ..utils.errors import ConfigError
from .build import register_evaluator
from .distributed import gather_on_main

__all__ = [
    "PartNMIARIEvaluator",
    "ContingencyTable",
    "nmi_from_contingency",
    "ari_from_contingency",
    "paint_part_instances",
    "predicted_part_maps",
    "sample_at_points",
    "crop_labels",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Scores from a contingency table
# --------------------------------------------------------------------------------------------


def _compact(table: np.ndarray) -> np.ndarray:
    """Drop all-zero rows and columns (labels that never occur)."""
    table = np.asarray(table, dtype=np.int64)
    return table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi_from_contingency(table) -> float:
    """scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean) from a GT × pred count table."""
    table = _compact(table)
    if table.size == 0 or table.shape[0] == table.shape[1] == 1:
        return 1.0
    mi = mutual_info_score(None, None, contingency=table.astype(np.float64))
    if mi == 0:
        return 0.0
    normaliser = (_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))) / 2.0
    return float(mi / normaliser)


def ari_from_contingency(table) -> float:
    """scikit-learn's ``adjusted_rand_score`` from a GT × pred count table, in exact integer arithmetic."""
    table = _compact(table)
    n = int(table.sum())
    sum_squares = int((table.astype(object) ** 2).sum()) if table.size else 0
    rows = [int(v) for v in table.sum(axis=1)]
    cols = [int(v) for v in table.sum(axis=0)]
    # Ordered pairs of distinct samples: tp = same GT & same pred, fn = same GT only, fp = same pred only.
    tp = sum_squares - n
    fn = sum(r * r for r in rows) - sum_squares
    fp = sum(c * c for c in cols) - sum_squares
    tn = n * n - tp - fn - fp - n
    if fn == 0 and fp == 0:
        return 1.0
    return float(2 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


class ContingencyTable:
    """Growing dense GT-label × predicted-label count table of non-negative integer labels."""

    def __init__(self):
        self.table = np.zeros((0, 0), dtype=np.int64)

    def add(self, gt, pred):
        gt = np.asarray(gt, dtype=np.int64).ravel()
        pred = np.asarray(pred, dtype=np.int64).ravel()
        if gt.size == 0:
            return
        if gt.min() < 0 or pred.min() < 0:
            raise ValueError("labels must be non-negative")
        rows, cols = max(int(gt.max()) + 1, self.table.shape[0]), max(int(pred.max()) + 1, self.table.shape[1])
        if (rows, cols) != self.table.shape:
            grown = np.zeros((rows, cols), dtype=np.int64)
            grown[: self.table.shape[0], : self.table.shape[1]] = self.table
            self.table = grown
        self.table += np.bincount(gt * cols + pred, minlength=rows * cols).reshape(rows, cols)

    def merge(self, tables):
        for other in tables:
            other = np.asarray(other)
            if other.size == 0:
                continue
            rows, cols = max(other.shape[0], self.table.shape[0]), max(other.shape[1], self.table.shape[1])
            grown = np.zeros((rows, cols), dtype=np.int64)
            grown[: self.table.shape[0], : self.table.shape[1]] += self.table
            grown[: other.shape[0], : other.shape[1]] += other
            self.table = grown
        return self


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def paint_part_instances(instances, height: int = None, width: int = None) -> torch.Tensor:
    """``part_instances`` → long [H, W] part map: 0 background, ``pred_classes + 1`` where a mask is set.

    Masks are painted in their order, so a later mask overwrites an earlier one where they overlap (no
    argmax over scores). Float masks are thresholded at 0.5.
    """
    masks = torch.as_tensor(instances.pred_masks).cpu()
    h, w = (height, width) if height is not None else tuple(instances.image_size)
    out = torch.zeros((h, w), dtype=torch.long)
    if masks.shape[0] == 0:
        return out
    masks = masks if masks.dtype == torch.bool else masks > 0.5
    if tuple(masks.shape[-2:]) != (h, w):
        masks = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
    labels = torch.as_tensor(instances.pred_classes).cpu().long() + 1
    for mask, label in zip(masks, labels):
        out[mask] = label
    return out


def predicted_part_maps(output: dict):
    """(full map, FG map) long [H, W] of one image's outputs (see module docstring)."""
    if "part_seg" in output:
        full = torch.as_tensor(output["part_seg"]).cpu().long()
    elif "part_instances" in output:
        full = paint_part_instances(output["part_instances"])
    else:
        raise KeyError("outputs carry neither 'part_seg' nor 'part_instances'")
    fg_probs = output.get("part_fg_probs")
    probs = output.get("part_probs")
    if fg_probs is not None:  # unmasked part scores (module docstring)
        fg = torch.as_tensor(fg_probs).detach().cpu().argmax(dim=0) + 1
        if tuple(fg.shape) != tuple(full.shape):
            fg = _resize_labels(fg, full.shape)
    elif probs is not None and probs.shape[0] > 1:
        fg = torch.as_tensor(probs).detach().cpu()[1:].argmax(dim=0) + 1
        if tuple(fg.shape) != tuple(full.shape):
            fg = _resize_labels(fg, full.shape)
    else:
        fg = full
    return full, fg


def crop_labels(labels: np.ndarray, box, fill: int) -> np.ndarray:
    """``labels[y0:y1, x0:x1]`` for an integer box (x0, y0, x1, y1) that may extend past the image; the part
    outside the image is ``fill``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = labels.shape[:2]
    out = np.full((max(y1 - y0, 1), max(x1 - x0, 1)), fill, dtype=labels.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = labels[sy0:sy1, sx0:sx1]
    return out


def _resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def sample_at_points(label_map: torch.Tensor, xy: np.ndarray, frame_hw) -> tuple:
    """Labels of ``label_map`` [H, W] at continuous points ``xy`` [N, 2] of a (frame_h, frame_w) image.

    Nearest neighbour: column ``floor(x·W/frame_w)`` (the pixel containing the point), which is
    ``grid_sample(mode="nearest", align_corners=False)``'s choice except exactly on pixel boundaries, where
    grid_sample's float rounding is arbitrary. Returns (labels [M], kept [N] bool); points outside the
    frame are dropped.
    """
    h, w = label_map.shape[-2:]
    xy = torch.as_tensor(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    fh, fw = float(frame_hw[0]), float(frame_hw[1])
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < fw) & (xy[:, 1] >= 0) & (xy[:, 1] < fh)
    cols = torch.floor(xy[:, 0] * (w / fw)).long().clamp_(0, w - 1)
    rows = torch.floor(xy[:, 1] * (h / fh)).long().clamp_(0, h - 1)
    return label_map[rows[inside], cols[inside]], inside.numpy()


def _keypoints_array(keypoints) -> np.ndarray:
    kps = keypoints.detach().cpu().numpy() if torch.is_tensor(keypoints) else np.asarray(keypoints, dtype=np.float64)
    return kps.reshape(-1, 3).astype(np.float64)


def input_keypoints(inp: dict, record: dict, pred_hw):
    """(K×3 keypoints (x, y, visible), frame (h, w)) of one image: the mapper's, else the record's."""
    if inp.get("keypoints") is not None:
        frame = (inp.get("height", pred_hw[0]), inp.get("width", pred_hw[1]))
        return _keypoints_array(inp["keypoints"]), frame
    if record is None or record.get("keypoints") is None:
        raise KeyError(f"no keypoints for image {inp.get('image_id')!r} (neither inputs nor dataset record)")
    if inp.get("orig_size") is not None:
        frame = tuple(inp["orig_size"])
    elif "height" in record and "width" in record:
        frame = (record["height"], record["width"])
    else:  # detectron2's convention: outputs at the input's (original) height/width
        frame = (inp.get("height", pred_hw[0]), inp.get("width", pred_hw[1]))
    return _keypoints_array(record["keypoints"]), frame


class PartNMIARIEvaluator(DatasetEvaluator):
    """(FG-)NMI and (FG-)ARI ×100 of predicted part maps, pooled over the split (module docstring)."""

    def __init__(self, dataset_name: str, target: str = "masks", eval_size: int = 0, distributed: bool = True):
        """
        Args:
            target: "masks" (per-pixel GT part labels) or "keypoints" (landmark ids at visible landmarks).
            eval_size: masks only: 0 = compare at GT resolution; > 0 = resize GT and prediction (nearest) to
                eval_size × eval_size first.
        """
        if target not in ("masks", "keypoints"):
            raise ConfigError(f"PartNMIARIEvaluator: target={target!r} must be 'masks' or 'keypoints'.")
        self.dataset_name = dataset_name
        self.target = target
        self.eval_size = int(eval_size or 0)
        self.distributed = distributed
        self._records = None
        self._warned_no_probs = False

    def _record(self, image_id):
        if self._records is None:
            self._records = {r["image_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        return self._records.get(image_id)

    def reset(self):
        self._full = ContingencyTable()
        self._fg = ContingencyTable()
        self._num_images = 0

    # ------------------------------------------------------------------ GT label maps

    def _gt_label_map(self, inp):
        """(labels int64 [H, W], background label, ignore label)."""
        meta = MetadataCatalog.get(self.dataset_name)
        ignore = int(meta.get("ignore_label", 255))
        background = int(meta.get("background_label", 0))
        if inp.get("sem_seg") is not None:
            return torch.as_tensor(inp["sem_seg"]).cpu().numpy().astype(np.int64), background, ignore
        record = self._record(inp["image_id"])
        if record is None:
            raise KeyError(f"image {inp['image_id']!r} is not in dataset {self.dataset_name!r}")
        if record.get("sem_seg_file_name"):
            from PIL import Image

            with Image.open(record["sem_seg_file_name"]) as im:
                labels = np.asarray(im).astype(np.int64)
            if labels.ndim == 3:
                labels = labels[..., 0]
            return labels, background, ignore
        if record.get("parsing_file_name"):
            from ..data.datasets.deepfashion import decode_parsing

            return decode_parsing(record["parsing_file_name"]).astype(np.int64), background, ignore
        parts = record.get("part_annotations", record.get("annotations"))
        if parts is None or "height" not in record:
            raise KeyError(f"record {inp['image_id']!r} of {self.dataset_name!r} has no part labels")
        h, w = int(record["height"]), int(record["width"])
        labels = np.zeros((h, w), dtype=np.int64)
        for ann in parts:  # later parts overwrite earlier ones
            if ann.get("iscrowd", 0):
                continue
            labels[decode_segmentation(ann["segmentation"], h, w)] = int(ann["category_id"]) + 1
        return labels, 0, ignore

    # ------------------------------------------------------------------ evaluator API

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            full, fg = predicted_part_maps(out)
            if out.get("part_probs") is None and not self._warned_no_probs:
                logger.info("PartNMIARIEvaluator: no part_probs; FG scores use part_seg (background kept as label 0).")
                self._warned_no_probs = True
            if self.target == "masks":
                self._process_masks(inp, full, fg)
            else:
                self._process_keypoints(inp, full, fg)
            self._num_images += 1

    def _process_masks(self, inp, full, fg):
        gt, background, ignore = self._gt_label_map(inp)
        if inp.get("crop_box") is not None:
            gt = crop_labels(gt, inp["crop_box"], ignore)
        gt = torch.from_numpy(gt)
        size = (self.eval_size, self.eval_size) if self.eval_size > 0 else tuple(gt.shape)
        gt = _resize_labels(gt, size).numpy()
        full, fg = _resize_labels(full, size).numpy(), _resize_labels(fg, size).numpy()
        valid = gt != ignore
        foreground = valid & (gt != background)
        self._full.add(gt[valid], full[valid])
        self._fg.add(gt[foreground], fg[foreground])

    def _process_keypoints(self, inp, full, fg):
        record = self._record(inp["image_id"]) if inp.get("keypoints") is None else None
        kps, frame = input_keypoints(inp, record, full.shape)
        visible = kps[:, 2] > 0.5
        ids = np.nonzero(visible)[0]
        labels_full, kept = sample_at_points(full, kps[visible, :2], frame)
        labels_fg, _ = sample_at_points(fg, kps[visible, :2], frame)
        self._full.add(ids[kept], labels_full.numpy())
        self._fg.add(ids[kept], labels_fg.numpy())

    def evaluate(self):
        tables = gather_on_main([(self._full.table, self._fg.table, self._num_images)], self.distributed)
        if tables is None:
            return {}
        full = ContingencyTable().merge(t[0] for t in tables).table
        fg = ContingencyTable().merge(t[1] for t in tables).table
        num_images = sum(t[2] for t in tables)
        if num_images == 0:
            logger.warning("PartNMIARIEvaluator on %s received no predictions.", self.dataset_name)
            return {}
        results = OrderedDict()
        results["NMI"] = 100.0 * nmi_from_contingency(full) if full.sum() else float("nan")
        results["ARI"] = 100.0 * ari_from_contingency(full) if full.sum() else float("nan")
        results["FG-NMI"] = 100.0 * nmi_from_contingency(fg) if fg.sum() else float("nan")
        results["FG-ARI"] = 100.0 * ari_from_contingency(fg) if fg.sum() else float("nan")
        results["num_images"] = int(num_images)
        results["num_samples"] = int(full.sum())
        results["num_fg_samples"] = int(fg.sum())
        logger.info(
            "Part NMI/ARI (%s) on %s (%d images): NMI %.2f | ARI %.2f | FG-NMI %.2f | FG-ARI %.2f",
            self.target,
            self.dataset_name,
            num_images,
            results["NMI"],
            results["ARI"],
            results["FG-NMI"],
            results["FG-ARI"],
        )
        return {f"part_nmi_ari_{self.target}": results}


@register_evaluator("part_nmi_ari")
def build_part_nmi_ari_evaluator(cfg, dataset_name, output_folder):
    """Mask-based (FG-)NMI/ARI (PartImageNet-Seg, DeepFashion, part-annotated datasets)."""
    return PartNMIARIEvaluator(dataset_name, target="masks", eval_size=cfg.TEST.PART_NMI_ARI.EVAL_SIZE)


@register_evaluator("part_keypoints")
def build_part_keypoints_evaluator(cfg, dataset_name, output_folder):
    """Keypoint-based (FG-)NMI/ARI at the visible landmarks (CUB, CelebA/MAFL)."""
    return PartNMIARIEvaluator(dataset_name, target="keypoints")
