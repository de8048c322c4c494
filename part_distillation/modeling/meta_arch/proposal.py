"""Stage 2: the class-agnostic part-proposal model D^p (PartDistillation supp. §2 "Part-proposal learning").

A :class:`Mask2Former` with one foreground class (N_c = 1: "part"), trained with Hungarian matching on
part pseudo-labels (every target's class is 0) and, per PartDistillation supp. §2, with the mask losses on 12544
*uniformly random* points (``MODEL.MASK_FORMER.POINT_SAMPLING: "uniform"``) instead of importance
sampling. Freezing (``MODEL.MASK_FORMER.FREEZE_KEYS``, reference ["backbone", "encoder"]) is done by the
optimizer builder, as for every stage.

Initialisation (``MODEL.PROPOSAL.INIT_FROM``): the pixel decoder and transformer decoder tensors
(``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``) of a stage-0 instance checkpoint, where
the shapes match; the class head (N_c + 1 = 2 outputs instead of the instance model's) never does and
keeps its fresh initialisation. The file is read when the model is built, so ``MODEL.WEIGHTS`` (loaded
afterwards by the checkpointer) overrides it wherever it holds the same tensors, and ``--resume``
overrides both.

Inference (``instances``: ``pred_masks``, ``scores``, ``pred_classes`` (all 0), ``pred_boxes``):

1. s_j = P(part | q_j) = softmax(class logits)[0]; the top ``TEST.DETECTIONS_PER_IMAGE`` queries by s_j.
2. Mask logits m_j are resized to the input's ``height``×``width`` (as Mask2Former does).
3. Object conditioning, when the input carries ``objects`` (``gt_masks``, e.g. from
   :class:`PartEvalDatasetMapper`) and ``MODEL.PROPOSAL.APPLY_OBJECT_MASK`` (as the reference code):
   m_j ← m_j · M_o with M_o the union of the object masks (logits outside become 0 = "off"). With
   ``MODEL.PROPOSAL.PER_PIXEL_ASSIGNMENT`` a pixel x goes to argmax_j s_j·sigmoid(m_j(x)) only, inside
   the support O = {x : max_j m_j(x) > 0} (the reference's ``_unique_assignment``); otherwise masks are
   m_j > 0 and may overlap. Predictions left empty are dropped.
4. score_j = s_j × mean sigmoid(m_j) over the final mask, as Mask2Former scores instances.

Without ``objects`` the output is plain Mask2Former instance inference with one class. Pre-processing, the
forward and query features are :class:`PartMask2Former`'s; steps 1-4 are :meth:`ProposalModel.inference_single`
with the pure functions of :mod:`.postprocessing`. The reference's
evaluation-only shortcut that drops predictions not overlapping any GT part (reference code) is not
implemented: the model never sees GT parts.
"""

import logging
import os
import pickle

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch.nn import functional as F

from ...utils.errors import ConfigError
from .part_mask2former import PartMask2Former
from .postprocessing import assign_pixels, masks_to_boxes, object_union

__all__ = ["ProposalModel", "load_decoder_weights", "proposal_inference", "INIT_PREFIXES"]

logger = logging.getLogger(__name__)

# Tensors that MODEL.PROPOSAL.INIT_FROM may initialise (everything but the backbone).
INIT_PREFIXES = ("sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")


def _read_checkpoint(path: str) -> dict:
    """The ``{name: tensor}`` state dict in a detectron2 checkpoint (.pth) or model-zoo pickle (.pkl)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(state, dict):
        raise ConfigError(f"MODEL.PROPOSAL.INIT_FROM={path!r} holds no state dict (a {type(state).__name__}).")
    out = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            out[name] = value
    return out


def load_decoder_weights(
    model: torch.nn.Module,
    path: str,
    prefixes=INIT_PREFIXES,
    key: str = "MODEL.PROPOSAL.INIT_FROM",
    expected: str = "a stage-0 instance checkpoint (e.g. output/stage0_instance/model_final.pth)",
) -> dict:
    """Copy the tensors under ``prefixes`` from checkpoint ``path`` into ``model`` where shapes match.

    ``key`` names the config key that gave ``path`` and ``expected`` what it should be, for the messages.
    Returns ``{"loaded": [...], "shape_mismatch": [(name, checkpoint shape, model shape)], "missing": [...]}``
    (``missing``: model tensors under ``prefixes`` that the checkpoint lacks) and logs a summary.

    Raises:
        ConfigError: ``path`` does not exist, or no tensor could be loaded from it.
    """
    if not os.path.isfile(path):
        raise ConfigError(f'{key}={path!r} does not exist; give {expected} or set it to "".')
    checkpoint = _read_checkpoint(path)
    own = model.state_dict()
    loaded, mismatch, missing, update = [], [], [], {}
    for name, target in own.items():
        if not name.startswith(tuple(prefixes)):
            continue
        if name not in checkpoint:
            missing.append(name)
        elif tuple(checkpoint[name].shape) != tuple(target.shape):
            mismatch.append((name, tuple(checkpoint[name].shape), tuple(target.shape)))
        else:
            update[name] = checkpoint[name].to(dtype=target.dtype)
            loaded.append(name)
    if not loaded:
        raise ConfigError(
            f"{key}={path!r}: no tensor under {', '.join(prefixes)} matches this model "
            "(is it a Mask2Former checkpoint of the same size?)."
        )
    with torch.no_grad():
        for name, value in update.items():
            own[name].copy_(value)  # state_dict() tensors share storage with the parameters/buffers
    logger.info("Initialised %d tensors from %s (%s).", len(loaded), path, key)
    for name, theirs, ours in mismatch:
        logger.info(
            "Skipped %s: shape %s in the checkpoint, %s in the model (kept its initialisation).", name, theirs, ours
        )
    if missing:
        logger.warning("%d tensors are not in %s and keep their initialisation: %s", len(missing), path, missing)
    return {"loaded": loaded, "shape_mismatch": mismatch, "missing": missing}


def proposal_inference(mask_cls, mask_pred, topk: int, object_mask=None, per_pixel_assignment: bool = True):
    """Class-agnostic instances of one image (module doc, steps 1, 3 and 4).

    Args:
        mask_cls: [Q, 2] class logits (part, no-object).
        mask_pred: [Q, H, W] mask logits at the output resolution.
        topk: queries kept, by P(part).
        object_mask: optional bool [H, W] union of the object masks; None = no conditioning.
        per_pixel_assignment: with ``object_mask``, make masks disjoint by argmax_j s_j·sigmoid(m_j).
    Returns:
        Instances sorted by descending score.
    """
    part_prob = F.softmax(mask_cls.float(), dim=-1)[:, 0]
    topk = min(int(topk), part_prob.numel())
    part_prob, index = part_prob.topk(topk)  # sorted, descending
    logits = mask_pred[index].float()
    if object_mask is None:
        masks = logits > 0
    else:
        logits = logits * object_mask.to(logits)
        masks = assign_pixels(part_prob, logits, per_pixel_assignment)
        keep = masks.flatten(1).any(dim=1)
        part_prob, logits, masks = part_prob[keep], logits[keep], masks[keep]
    area = masks.flatten(1).sum(dim=1)
    mean_prob = (logits.sigmoid().flatten(1) * masks.flatten(1)).sum(dim=1) / (area + 1e-6)
    scores = part_prob * mean_prob
    order = torch.argsort(scores, descending=True, stable=True)
    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = masks[order].float()
    result.scores = scores[order]
    result.pred_classes = torch.zeros(len(order), dtype=torch.int64, device=scores.device)
    result.pred_boxes = masks_to_boxes(masks[order])
    return result


@META_ARCH_REGISTRY.register()
class ProposalModel(PartMask2Former):
    """Mask2Former with one class ("part") for class-agnostic part proposals (module doc)."""

    objectness_head = True  # pseudo-parts are class-agnostic: every target label 0

    @configurable
    def __init__(
        self, *, per_pixel_assignment: bool = True, apply_object_mask: bool = True, init_from: str = "", **kwargs
    ):
        """
        Args:
            per_pixel_assignment: ``MODEL.PROPOSAL.PER_PIXEL_ASSIGNMENT``.
            apply_object_mask: ``MODEL.PROPOSAL.APPLY_OBJECT_MASK``.
            init_from: ``MODEL.PROPOSAL.INIT_FROM``, a stage-0 checkpoint for the decoder tensors ("" = none).
            kwargs: :class:`PartMask2Former`'s (Mask2Former's) arguments.
        """
        super().__init__(**kwargs)
        self.per_pixel_assignment = per_pixel_assignment
        self.apply_object_mask = apply_object_mask
        self.init_report = load_decoder_weights(self, init_from) if init_from else None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        proposal = cfg.MODEL.PROPOSAL
        ret.update(
            per_pixel_assignment=proposal.PER_PIXEL_ASSIGNMENT,
            apply_object_mask=proposal.APPLY_OBJECT_MASK,
            init_from=proposal.INIT_FROM,
        )
        return ret

    def inference_single(self, mask_cls, mask_pred, query_feats, objects, image_size):
        object_mask = None
        if self.apply_object_mask and objects is not None:
            object_mask = object_union(objects, image_size, mask_pred.shape[-2:], mask_pred.device)
        return {
            "instances": proposal_inference(
                mask_cls, mask_pred, self.test_topk_per_image, object_mask, self.per_pixel_assignment
            )
        }
