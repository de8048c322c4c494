"""Landmark regression error (NME) from discovered part centroids (CUB, CelebA/MAFL).

Protocol (Choudhury et al. 2021 appendix "fit a linear regression model (using the training set) to
map predicted keypoints to ground truth keypoints ... we use the mask centers as keypoints"; PartFormer paper Eq. (10)):

1. **Centroids.** Per image, the centroid of every foreground part k = 1..K in coordinates normalised by the
   prediction's width/height (pixel centres at (j + 0.5)/W): the soft centroid of ``part_probs[k]`` when the
   outputs carry it (papers A and B use probability maps), else the centroid of ``part_seg == k`` (or of the
   painted ``part_instances``, see :mod:`.nmi_ari`). A part absent from an image (no pixel / zero mass) is
   filled with ``missing_fill``: "mean" = that part's mean centroid over the fit split's images where it is
   present (0.5 if never present), or "center" = (0.5, 0.5). Features X = the K×2 centroids, flattened.
2. **Regression.** For every landmark l separately, on the fit-split images where l is visible: standardise X
   and the landmark's (x, y) (scikit-learn ``StandardScaler``: mean, population std, std 0 → 1), solve
   least squares without intercept (``numpy.linalg.lstsq``, the minimum-norm solution, = sklearn
   ``LinearRegression(fit_intercept=False)`` as A; equals B's (XᵀX)⁻¹XᵀY whenever XᵀX is invertible), and
   undo the scaling on prediction. With every landmark visible (CelebA) this is exactly B's joint fit.
3. **Error.** ``NME = Σ_{visible} ‖(ŷ − y) / d‖ / #visible`` pooled over the evaluated split's visible landmarks
   (A's Σ err·vis / Σ vis; B's mean over images and points when all are visible), ×100 (%), with the
   normaliser ``d``:
   * "inter_ocular" (CelebA/MAFL/AFLW, PartFormer paper and code): the GT distance between landmarks 0 and 1
     (left eye, right eye; found by name in the ``keypoint_names`` metadata), in image pixels;
   * "bbox" (CUB, PartFormer paper: "the annotated bounding box as d_norm"): the error's x by the GT box width and
     its y by the box height (the SCOPS-style per-axis normalisation of A's code; how B reduces the box
     to d is not released), the box mapped into the prediction frame;
   * "image": the error's x by the image width and y by its height. With the CMR crop (square GT box + 5 %,
     ``KeypointDatasetMapper`` defaults) this is A's unit, "% of the padded, squared bbox side".

**Fit / evaluate splits.** The papers fit on the training split (CUB train, MAFL-train) and report on the
test split. Every evaluator stores its split's (centroids, landmarks) in memory (and, with ``output_dir``, as
``landmark_centroids.pth`` there); an evaluator given ``fit_dataset`` fits on that dataset's stored data,
found in memory (evaluate it first, e.g. ``DATASETS.TEST: ("mafl_train", "mafl_test")``) or in
``<output_dir>/../<fit_dataset>/landmark_centroids.pth`` (``OUTPUT_DIR/inference/<dataset>`` siblings, so
an earlier run works too). ``fit_on_same_split=True`` instead fits and evaluates on the same split (not the
papers' protocol; marked ``fit_on_same_split`` = 1 in the results). The evaluator of the fit dataset itself
reports its training error.

Landmarks: ``inputs[i]["keypoints"]`` (``KeypointDatasetMapper``, K×3 output pixels, frame = inputs'
height/width; the GT box is mapped with ``inputs[i]["transform"]``), else the record's ``keypoints``
(original pixels, frame = ``orig_size`` / record height/width). Visibility > 0.5.
"""

import itertools
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode

from ..utils.errors import ConfigError
from .build import register_evaluator
from .distributed import gather_on_main
from .nmi_ari import input_keypoints, paint_part_instances

__all__ = [
    "KeypointNMEEvaluator",
    "NORMALIZERS",
    "part_centroids",
    "fill_missing",
    "fit_landmark_regressor",
    "predict_landmarks",
    "normalized_errors",
    "FIT_DATA",
]

logger = logging.getLogger(__name__)

NORMALIZERS = ("inter_ocular", "bbox", "image")
FIT_FILE = "landmark_centroids.pth"
# dataset name → per-image data of its latest evaluation (what a later evaluator with fit_dataset fits on)
FIT_DATA = {}


# --------------------------------------------------------------------------------------------
# Centroids and regression (numpy; used by the evaluator and the tests)
# --------------------------------------------------------------------------------------------


def part_centroids(part_seg: torch.Tensor = None, part_probs: torch.Tensor = None, num_parts: int = None):
    """Normalised (x, y) centroids of parts 1..K of one image and whether each part is present.

    Args:
        part_seg: long [H, W], 0 = background, k = part k (hard centroids), or
        part_probs: [K+1, H, W] probabilities, channel 0 = background (soft centroids of channels 1..K).
        num_parts: K; default: the largest label in ``part_seg`` (or K of ``part_probs``).
    Returns:
        (float64 [K, 2] centroids in [0, 1], NaN where absent; bool [K] present).
    """
    if part_probs is not None:
        weights = torch.as_tensor(part_probs).detach().cpu().double()[1:]
    else:
        seg = torch.as_tensor(part_seg).cpu().long()
        k = int(seg.max()) if num_parts is None and seg.numel() else int(num_parts or 0)
        weights = (seg[None] == torch.arange(1, k + 1)[:, None, None]).double()
    if num_parts is not None and weights.shape[0] != num_parts:
        pad = torch.zeros((max(num_parts - weights.shape[0], 0),) + tuple(weights.shape[1:]), dtype=weights.dtype)
        weights = torch.cat([weights[:num_parts], pad])
    h, w = weights.shape[-2:]
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    mass = weights.sum(dim=(1, 2))
    present = mass > 1e-12
    cx = (weights.sum(dim=1) * xs).sum(dim=1) / mass.clamp(min=1e-12)
    cy = (weights.sum(dim=2) * ys).sum(dim=1) / mass.clamp(min=1e-12)
    centroids = torch.stack([cx, cy], dim=1).numpy()
    centroids[~present.numpy()] = np.nan
    return centroids, present.numpy()


def fill_missing(centroids: np.ndarray, fill_values: np.ndarray) -> np.ndarray:
    """Replace NaN centroids ([N, K, 2]) by ``fill_values`` ([K, 2])."""
    out = centroids.copy()
    missing = np.isnan(out)
    out[missing] = np.broadcast_to(fill_values, out.shape)[missing]
    return out


def _missing_fill_values(centroids: np.ndarray, mode: str) -> np.ndarray:
    if mode == "center":
        return np.full(centroids.shape[1:], 0.5)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(centroids)).sum(axis=0)
        means = np.nansum(centroids, axis=0) / np.maximum(counts, 1)
    return np.where(counts > 0, means, 0.5)


def _standardise_fit(a: np.ndarray):
    mean = a.mean(axis=0)
    scale = a.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return mean, scale


def fit_landmark_regressor(features: np.ndarray, landmarks: np.ndarray, visible: np.ndarray):
    """Per-landmark no-intercept least squares on standardised data (module docstring, step 2).

    Args:
        features: [N, F] (flattened centroids), landmarks: [N, L, 2], visible: [N, L] bool.
    Returns:
        list over landmarks of (x_mean, x_scale, y_mean, y_scale, beta [F, 2]) or None (never visible).
    """
    regressors = []
    for lm in range(landmarks.shape[1]):
        rows = visible[:, lm]
        if not rows.any():
            regressors.append(None)
            continue
        x, y = features[rows], landmarks[rows, lm]
        x_mean, x_scale = _standardise_fit(x)
        y_mean, y_scale = _standardise_fit(y)
        beta = np.linalg.lstsq((x - x_mean) / x_scale, (y - y_mean) / y_scale, rcond=None)[0]
        regressors.append((x_mean, x_scale, y_mean, y_scale, beta))
    return regressors


def predict_landmarks(regressors, features: np.ndarray) -> np.ndarray:
    """[N, L, 2] landmark predictions (NaN for landmarks without a regressor)."""
    out = np.full((features.shape[0], len(regressors), 2), np.nan)
    for lm, reg in enumerate(regressors):
        if reg is None:
            continue
        x_mean, x_scale, y_mean, y_scale, beta = reg
        out[:, lm] = ((features - x_mean) / x_scale) @ beta * y_scale + y_mean
    return out


def normalized_errors(pred, gt, frame_hw, normalizer: str, eye_indices=(0, 1), boxes_wh=None) -> np.ndarray:
    """‖(ŷ − y) / d‖ per image and landmark ([N, L]) for normalised coordinates ``pred``/``gt`` ([N, L, 2]).

    ``frame_hw`` [N, 2] is each image's (h, w) in pixels; ``boxes_wh`` [N, 2] the GT box size in the same
    pixels (normalizer "bbox").
    """
    scale = np.asarray(frame_hw, dtype=np.float64)[:, None, ::-1]  # (w, h) per image
    diff = (pred - gt) * scale  # pixels
    if normalizer == "image":
        return np.linalg.norm(diff / scale, axis=-1)
    if normalizer == "bbox":
        return np.linalg.norm(diff / np.asarray(boxes_wh, dtype=np.float64)[:, None, :], axis=-1)
    if normalizer == "inter_ocular":
        eyes = (gt[:, eye_indices[0]] - gt[:, eye_indices[1]]) * scale[:, 0]
        return np.linalg.norm(diff, axis=-1) / np.linalg.norm(eyes, axis=-1)[:, None]
    raise ValueError(f"unknown NME normalizer {normalizer!r}; expected one of {NORMALIZERS}")


def _eye_indices(keypoint_names):
    names = [str(n).lower() for n in keypoint_names or []]
    if "left eye" in names and "right eye" in names:
        return names.index("left eye"), names.index("right eye")
    return None


class KeypointNMEEvaluator(DatasetEvaluator):
    """Landmark NME (%) of a linear regression from part centroids to GT landmarks (module docstring)."""

    def __init__(
        self,
        dataset_name: str,
        fit_dataset: str = None,
        fit_on_same_split: bool = False,
        normalizer: str = "",
        eye_indices=None,
        missing_fill: str = "mean",
        num_parts: int = 0,
        use_probs: bool = True,
        distributed: bool = True,
        output_dir: str = None,
    ):
        """
        Args:
            fit_dataset: dataset whose stored predictions fit the regressor (see module docstring).
            fit_on_same_split: fit on the evaluated split itself (explicit opt-in; not the papers' protocol).
            normalizer: one of :data:`NORMALIZERS`; "" = "inter_ocular" when the metadata names a left and a
                right eye, else "bbox" when the records have a ``bbox``, else "image".
            eye_indices: inter-ocular landmark indices; default from ``keypoint_names``, else (0, 1).
            missing_fill: "mean" or "center" (absent parts).
            num_parts: K; 0 = largest part id over the fit and evaluated data.
            use_probs: soft centroids from ``part_probs`` when the outputs carry it.
        """
        if normalizer not in ("",) + NORMALIZERS:
            raise ConfigError(f"KeypointNMEEvaluator: normalizer={normalizer!r} must be one of {NORMALIZERS} or ''.")
        if missing_fill not in ("mean", "center"):
            raise ConfigError(f"KeypointNMEEvaluator: missing_fill={missing_fill!r} must be 'mean' or 'center'.")
        self.dataset_name = dataset_name
        self.fit_dataset = fit_dataset or None
        self.fit_on_same_split = bool(fit_on_same_split) or self.fit_dataset == dataset_name
        if not self.fit_dataset and not self.fit_on_same_split:
            raise ConfigError(
                f"KeypointNMEEvaluator on {dataset_name!r}: set the regression fit split "
                "(TEST.LANDMARK_NME.FIT_DATASET, e.g. 'mafl_train' / 'cub_train', evaluated before this dataset) "
                "or opt in to TEST.LANDMARK_NME.FIT_ON_SAME_SPLIT."
            )
        self.missing_fill = missing_fill
        self.num_parts = int(num_parts or 0)
        self.use_probs = use_probs
        self.distributed = distributed
        self.output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        if eye_indices is None:
            eye_indices = _eye_indices(meta.get("keypoint_names", None)) or (0, 1)
        self.eye_indices = tuple(eye_indices)
        self._normalizer = normalizer
        self._keypoint_names = meta.get("keypoint_names", None)
        self._records = None

    def _record(self, image_id):
        if self._records is None:
            self._records = {r["image_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        return self._records.get(image_id)

    @property
    def normalizer(self) -> str:
        if self._normalizer:
            return self._normalizer
        if _eye_indices(self._keypoint_names) is not None:
            return "inter_ocular"
        records = self._records if self._records is not None else {}
        if any("bbox" in r for r in itertools.islice(records.values(), 1)):
            return "bbox"
        return "image"

    def reset(self):
        self._images = []

    # ------------------------------------------------------------------ per image

    def _box_wh(self, inp, record, frame_hw):
        """GT box (w, h) in the landmark frame's pixels, or None."""
        if record is None or record.get("bbox") is None:
            return None
        mode = record.get("bbox_mode", BoxMode.XYWH_ABS)
        x0, y0, x1, y1 = BoxMode.convert(list(record["bbox"]), mode, BoxMode.XYXY_ABS)
        corners = np.array([[x0, y0], [x1, y1]], dtype=np.float64)
        if inp.get("transform") is not None:
            t = torch.as_tensor(inp["transform"]).double().numpy()
            corners = corners @ t[:, :2].T + t[:, 2]
        elif inp.get("keypoints") is not None and inp.get("orig_size") is not None:
            oh, ow = inp["orig_size"]
            corners = corners * np.array([frame_hw[1] / ow, frame_hw[0] / oh])
        return np.abs(corners[1] - corners[0])

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            probs = out.get("part_probs") if self.use_probs else None
            if probs is not None:
                seg = None
                pred_hw = tuple(probs.shape[-2:])
            else:
                seg = out["part_seg"] if "part_seg" in out else paint_part_instances(out["part_instances"])
                pred_hw = tuple(seg.shape[-2:])
            centroids, _ = part_centroids(seg, probs)
            needs_record = inp.get("keypoints") is None or self._normalizer in ("", "bbox")
            record = self._record(inp["image_id"]) if needs_record else None
            kps, frame = input_keypoints(inp, record, pred_hw)
            frame = (float(frame[0]), float(frame[1]))
            landmarks = kps[:, :2] / np.array([frame[1], frame[0]])
            visible = kps[:, 2] > 0.5
            self._images.append(
                {
                    "centroids": centroids,
                    "landmarks": landmarks,
                    "visible": visible,
                    "frame_hw": np.array(frame),
                    "box_wh": self._box_wh(inp, record, frame),
                    "image_id": inp.get("image_id"),
                }
            )

    # ------------------------------------------------------------------ evaluation

    def _gathered(self):
        return gather_on_main(self._images, self.distributed)

    def _fit_images(self, own):
        if self.fit_on_same_split:
            return own
        if self.fit_dataset in FIT_DATA:
            return FIT_DATA[self.fit_dataset]
        if self.output_dir:
            path = os.path.join(os.path.dirname(os.path.normpath(self.output_dir)), self.fit_dataset, FIT_FILE)
            if os.path.isfile(path):
                return torch.load(path, weights_only=False)
        raise ConfigError(
            f"KeypointNMEEvaluator on {self.dataset_name!r}: no predictions of the fit dataset {self.fit_dataset!r}; "
            f"evaluate it first (put it before {self.dataset_name!r} in DATASETS.TEST) or in an earlier run with the "
            "same OUTPUT_DIR."
        )

    def evaluate(self):
        images = self._gathered()
        if images is None:
            return {}
        if not images:
            logger.warning("KeypointNMEEvaluator on %s received no predictions.", self.dataset_name)
            return {}
        FIT_DATA[self.dataset_name] = images
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            torch.save(images, os.path.join(self.output_dir, FIT_FILE))
        fit = self._fit_images(images)
        num_parts = self.num_parts or max(len(im["centroids"]) for im in itertools.chain(fit, images))
        num_landmarks = max(len(im["landmarks"]) for im in images)

        def stack(data):
            cents = np.full((len(data), num_parts, 2), np.nan)
            for i, im in enumerate(data):
                k = min(num_parts, len(im["centroids"]))
                cents[i, :k] = im["centroids"][:k]
            landmarks = np.stack([im["landmarks"] for im in data])
            visible = np.stack([im["visible"] for im in data])
            return cents, landmarks, visible

        fit_cents, fit_landmarks, fit_visible = stack(fit)
        eval_cents, eval_landmarks, eval_visible = stack(images)
        if fit_landmarks.shape[1] != num_landmarks:
            raise ValueError(f"fit dataset has {fit_landmarks.shape[1]} landmarks, {self.dataset_name} {num_landmarks}")
        fill = _missing_fill_values(fit_cents, self.missing_fill)
        fit_features = fill_missing(fit_cents, fill).reshape(len(fit), -1)
        regressors = fit_landmark_regressor(fit_features, fit_landmarks, fit_visible)
        pred = predict_landmarks(regressors, fill_missing(eval_cents, fill).reshape(len(images), -1))

        normalizer = self.normalizer
        boxes = None
        if normalizer == "bbox":
            if any(im["box_wh"] is None for im in images):
                raise ConfigError(f"NME normalizer 'bbox' needs a 'bbox' in every record of {self.dataset_name!r}.")
            boxes = np.stack([im["box_wh"] for im in images])
        frames = np.stack([im["frame_hw"] for im in images])
        errors = normalized_errors(pred, eval_landmarks, frames, normalizer, self.eye_indices, boxes)
        valid = eval_visible & ~np.isnan(errors)
        results = OrderedDict()
        results["NME"] = 100.0 * float(errors[valid].mean()) if valid.any() else float("nan")
        names = list(self._keypoint_names) if self._keypoint_names else [str(lm) for lm in range(num_landmarks)]
        for lm in range(num_landmarks):
            sel = valid[:, lm]
            name = names[lm] if lm < len(names) else str(lm)
            results[f"NME-{name}"] = 100.0 * float(errors[sel, lm].mean()) if sel.any() else float("nan")
        results["num_images"] = len(images)
        results["num_fit_images"] = len(fit)
        results["num_parts"] = int(num_parts)
        results["fit_on_same_split"] = int(fit is images)
        logger.info(
            "Landmark NME (%s) on %s: %.2f%% (%d images; regressor fitted on %s, %d images, K = %d)",
            normalizer,
            self.dataset_name,
            results["NME"],
            len(images),
            self.dataset_name if fit is images else self.fit_dataset,
            len(fit),
            num_parts,
        )
        return {"part_landmark_nme": results}


@register_evaluator("part_landmark_nme")
def build_keypoint_nme_evaluator(cfg, dataset_name, output_folder):
    c = cfg.TEST.LANDMARK_NME
    return KeypointNMEEvaluator(
        dataset_name,
        fit_dataset=c.FIT_DATASET,
        fit_on_same_split=c.FIT_ON_SAME_SPLIT,
        normalizer=c.NORMALIZER,
        missing_fill=c.MISSING_FILL,
        num_parts=c.NUM_PARTS,
        output_dir=output_folder,
    )
