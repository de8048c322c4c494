"""Run a part model on one image: :class:`PartPredictor`, the counterpart of detectron2's ``DefaultPredictor``.

``PartPredictor(cfg)(bgr_image, object_masks=...)`` builds the model of ``cfg`` once, loads
``MODEL.WEIGHTS``, and returns the objects and parts of one image at its original size, whatever the
meta-architecture:

* stage 1 (:class:`PixelGroupingModel`, no training): K-means segments of backbone features inside each
  object; it needs no ``MODEL.WEIGHTS`` (the backbone's own pretrained weights, e.g. the bundled ImageNet
  EfficientNet-Lite0, are loaded when the model is built);
* stage 3/4 and the one-stage baselines: the ``part_instances`` the model returns (part classes per object);
* stage 2 (:class:`ProposalModel`): its class-agnostic proposals, each attributed to the object it
  overlaps most.

Objects come from (in this order) the caller (``object_masks``), the model itself (a stage-1 model with
``MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE model``/``detic``), or the whole image as one object; the
result says which (``object_source``).
"""

import logging

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..utils.errors import ConfigError

__all__ = ["PartPredictor", "TRAINING_FREE_META_ARCHS"]

logger = logging.getLogger(__name__)

# meta-architectures whose predictions need no trained checkpoint (their backbone loads its own weights)
TRAINING_FREE_META_ARCHS = ("PixelGroupingModel",)

OBJECTS_GIVEN = "given object masks"
OBJECTS_MODEL = "object model"
OBJECTS_WHOLE_IMAGE = "whole image as one object"


class PartPredictor:
    """cfg + weights → callable on one BGR ``uint8`` array (H, W, 3), like detectron2's ``DefaultPredictor``.

    Calling it returns a dict with

    * ``objects``: :class:`Instances` (``pred_masks`` bool [M, H, W], ``scores``, ``pred_classes``;
      -1 = unknown class);
    * ``parts``: :class:`Instances` (``pred_masks`` bool [P, H, W], ``scores``, ``pred_classes`` — the part
      class, 0 for class-agnostic models —, ``object_index`` into ``objects``);
    * ``object_source``: where the objects came from (given / object model / whole image);
    * ``class_agnostic``: True when part classes carry no meaning across objects (stages 1 and 2);
    * ``raw``: the model's own output dict.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.cfg.freeze()
        arch = cfg.MODEL.META_ARCHITECTURE
        if arch == "ClassPixelGroupingModel":  # one-stage labels: prototypes instead of weights
            if not cfg.MODEL.ONE_STAGE.PROTOTYPES:
                raise ConfigError(
                    "ClassPixelGroupingModel needs MODEL.ONE_STAGE.PROTOTYPES (written by tools/rank_parts.py "
                    "--stage onestage) to label parts."
                )
        elif not cfg.MODEL.WEIGHTS and arch not in TRAINING_FREE_META_ARCHS:
            raise ConfigError(
                f"MODEL.WEIGHTS is empty but {arch} must be trained first: add `MODEL.WEIGHTS path/to/model_final.pth` "
                "to the options, or use a stage-1 config (META_ARCHITECTURE PixelGroupingModel), which needs no "
                "weights."
            )
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.meta_arch = arch
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT={self.input_format!r}: PartPredictor reads 'RGB' or 'BGR' models.")
        grouping = arch in TRAINING_FREE_META_ARCHS or arch == "ClassPixelGroupingModel"
        self.longest_side = cfg.INPUT.IMAGE_SIZE if grouping else None
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.model_finds_objects = getattr(self.model, "object_model", None) is not None

    def _resize(self, image: np.ndarray):
        h, w = image.shape[:2]
        if self.longest_side:  # as PixelGroupingDatasetMapper: longer side = INPUT.IMAGE_SIZE
            scale = self.longest_side / max(h, w)
            return T.ResizeTransform(h, w, max(1, int(round(h * scale))), max(1, int(round(w * scale))))
        return self.aug.get_transform(image)

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray, object_masks=None, object_classes=None, object_scores=None) -> dict:
        """Parts of one BGR image.

        Args:
            original_image: uint8 array (H, W, 3) in BGR order (as ``cv2.imread`` gives).
            object_masks: optional bool array (M, H, W) of the objects to find parts in.
            object_classes: optional (M,) object class ids (-1 = unknown); stage-4 models need them.
            object_scores: optional (M,) scores (default 1).
        """
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(f"PartPredictor expects an (H, W, 3) BGR image, got shape {original_image.shape}")
        height, width = original_image.shape[:2]
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        transform = self._resize(image)
        resized = transform.apply_image(np.ascontiguousarray(image))
        inputs = {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
        }
        if object_masks is None and self.model_finds_objects:
            source = OBJECTS_MODEL
        else:
            if object_masks is None:
                source = OBJECTS_WHOLE_IMAGE
                object_masks = np.ones((1, height, width), dtype=bool)
            else:
                source = OBJECTS_GIVEN
                object_masks = np.asarray(object_masks, dtype=bool)
                if object_masks.ndim != 3 or object_masks.shape[1:] != (height, width):
                    raise ValueError(f"object_masks must be (M, {height}, {width}), got {object_masks.shape}")
            inputs["objects"] = _objects_instances(object_masks, object_classes, object_scores, transform)
        raw = self.model([inputs])[0]
        objects, parts = _standardise(
            raw, inputs.get("objects"), object_masks, object_classes, object_scores, (height, width)
        )
        # stage 1 segments, stage 2 proposals and stage 3 without prototypes carry no part classes
        class_agnostic = (
            self.meta_arch == "PixelGroupingModel"
            or "part_instances" not in raw
            or not raw["part_instances"].has("pred_classes")
        )
        return {
            "objects": objects,
            "parts": parts,
            "object_source": source,
            "class_agnostic": class_agnostic,
            "raw": raw,
        }


def _objects_instances(masks: np.ndarray, classes, scores, transform) -> Instances:
    """Object masks at the original size → the ``objects`` input (``gt_masks`` at the resized size)."""
    resized = [transform.apply_segmentation(m.astype(np.uint8)) for m in masks]
    new_hw = (
        resized[0].shape[:2]
        if resized
        else transform.apply_image(np.zeros((masks.shape[1], masks.shape[2], 3), np.uint8)).shape[:2]
    )
    inst = Instances(tuple(new_hw))
    inst.gt_masks = (
        torch.from_numpy(np.stack(resized).astype(bool)) if resized else torch.zeros((0, *new_hw), dtype=torch.bool)
    )
    n = len(masks)
    inst.gt_classes = torch.as_tensor(
        np.asarray(classes if classes is not None else [-1] * n, dtype=np.int64).reshape(n)
    )
    inst.scores = torch.as_tensor(np.asarray(scores if scores is not None else [1.0] * n, dtype=np.float32).reshape(n))
    return inst


def _bool_masks(masks: torch.Tensor) -> torch.Tensor:
    return masks if masks.dtype == torch.bool else masks > 0.5


def _standardise(raw: dict, objects_in, object_masks, object_classes, object_scores, hw):
    """The model's output → (objects, parts) Instances at the original size, on the CPU."""
    if "part_instances" in raw and not raw["instances"].has("pred_object_index"):
        # stages 1/3 return the objects they used (filtered and re-ordered, or found by an object model);
        # the parts' object_index points into those
        obj = raw["instances"].to("cpu")
        objects = Instances(
            hw, pred_masks=_bool_masks(obj.pred_masks), scores=obj.scores.float(), pred_classes=obj.pred_classes.long()
        )
    else:
        n = len(object_masks)
        objects = Instances(hw)
        objects.pred_masks = torch.from_numpy(np.asarray(object_masks, dtype=bool))
        objects.scores = torch.as_tensor(
            np.asarray(object_scores if object_scores is not None else [1.0] * n, np.float32).reshape(n)
        )
        objects.pred_classes = torch.as_tensor(
            np.asarray(object_classes if object_classes is not None else [-1] * n, np.int64).reshape(n)
        )
    if "part_instances" in raw:
        p = raw["part_instances"].to("cpu")
        masks = _bool_masks(p.pred_masks)
        classes = p.pred_classes.long() if p.has("pred_classes") else torch.zeros(len(p), dtype=torch.long)
        owner = p.object_index.long()
        scores = p.scores.float() if p.has("scores") else torch.ones(len(p))
    else:  # class-agnostic proposals: each goes to the object it overlaps most (dropped if none)
        p = raw["instances"].to("cpu")
        masks = _bool_masks(p.pred_masks)
        inter = (
            (masks.flatten(1).float() @ objects.pred_masks.flatten(1).float().T)
            if len(objects)
            else torch.zeros(len(p), 0)
        )
        keep = inter.amax(1) > 0 if inter.shape[1] else torch.zeros(len(p), dtype=torch.bool)
        owner = inter.argmax(1)[keep] if inter.shape[1] else torch.zeros(0, dtype=torch.long)
        masks = masks[keep]
        classes = torch.zeros(len(masks), dtype=torch.long)
        scores = p.scores.float()[keep]
    # models mask parts with the object at their working resolution; clip to the object at the image's
    # own resolution so that every part lies inside its object, and drop parts left empty
    if len(masks):
        masks = masks & objects.pred_masks[owner]
        keep = masks.flatten(1).any(1)
        masks, scores, classes, owner = masks[keep], scores[keep], classes[keep], owner[keep]
    parts = Instances(hw, pred_masks=masks, scores=scores, pred_classes=classes, object_index=owner)
    return objects, parts
