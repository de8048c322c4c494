"""Stage 4: part distillation (self-training) with per-object-class part classifiers (PartDistillation supp. Eq. 6).

:class:`PartDistillationModel` is a :class:`Mask2Former` whose class prediction is factorised in two:

* **objectness** — the decoder's own class head with ``MODEL.SEM_SEG_HEAD.NUM_CLASSES 1`` (logits
  (part, no-part), exactly the stage-2 :class:`ProposalModel` head, so ``INIT_FROM`` a proposal checkpoint
  loads it too);
* **part class within the object** — :class:`PerObjectPartClassifier`, a table of N_c^o classifiers of
  N_c^p × D weights (+ N_c^p biases) stored as ``nn.Embedding(N_c^o, N_c^p·D)``. For a query embedding f
  (the decoder's LayerNorm-ed query, the class head's input) of an object of class o, the part logits are
  ``W[o] f + b[o]`` (N_c^p values): only the rows of o are gathered, so 21K object classes never build a dense
  N_c^o·N_c^p-way layer (the reference computes all 176,001 logits and slices). With
  N_c^o = 21000, N_c^p = 8, D = 256 the table holds 43M parameters.

Loss (:class:`PartDistillationCriterion`, a subclass of Mask2Former's ``SetCriterion`` reusing its matcher,
``loss_labels`` and ``loss_masks``): per prediction set (final + every auxiliary one, deep supervision)

1. Hungarian matching on objectness + mask costs (all targets labelled 0 = "part"), as stage 2;
2. ``loss_ce`` — objectness CE with the no-object weight ``NO_OBJECT_WEIGHT``; ``loss_mask``/``loss_dice``
   — Mask2Former's point losses; all with the same indices;
3. ``loss_part_ce`` — CE over the N_c^p part logits of the GT object's classifier, on matched queries only
   (target: the pseudo-label's ``part_class``), summed and divided by the number of target masks like the
   mask losses, weighted by ``MODEL.PART_DISTILLATION.PART_CLASS_WEIGHT``.

The gradient of ``loss_part_ce`` therefore reaches only the classifier rows of object classes present in the
batch (others get exactly zero gradient). The table is an ``nn.Embedding``, so the optimizer builder gives it
``SOLVER.WEIGHT_DECAY_EMBED`` (0.0): classifiers of object classes absent from a batch are not decayed. This
differs from the reference, which uses one (N_c^p+1)-way softmax with a shared no-object row (reference code);
here "no part" is the objectness head's job and the part softmax runs over the N_c^p parts only,
as in PartDistillation supp. Eq. 6.

Targets: ``instances.gt_classes`` = part class in [0, N_c^p) (``INPUT.PSEUDO_LABELS.USE_PART_CLASSES True``)
and ``instances.gt_object_classes`` = the object class in [0, N_c^o) of each part's object (set by
:class:`PseudoLabelDatasetMapper` from the store object's ``category_id``).

Initialisation (``MODEL.PART_DISTILLATION.INIT_FROM``): every ``backbone.*``/``sem_seg_head.*`` tensor of a
checkpoint (e.g. the stage-2 proposal model) whose shape matches; the part classifier is always new. Loaded
and skipped tensors are logged and kept in ``model.init_report``. ``MODEL.WEIGHTS`` (loaded afterwards by the
checkpointer) overrides it where it holds the same tensors.

Inference needs the object masks and classes (``objects``: ``gt_masks``, ``gt_classes``, e.g. from
:class:`PartEvalDatasetMapper`). For each object m of class o (:func:`object_part_inference`):

1. score_{j,k} = P(part | q_j) · softmax_k(W[o] f_j + b[o]); each query keeps its best part k_j;
   the top ``TEST.DETECTIONS_PER_IMAGE`` queries by that score are kept;
2. mask logits × the object's mask; with ``PER_PIXEL_ASSIGNMENT`` a pixel of the object goes to
   argmax_j score_j·sigmoid(m_j(x)) inside the support {max_j m_j > 0} (as :class:`ProposalModel`);
3. with ``MERGE_SAME_CLASS`` masks sharing a part class are OR-ed and keep the best score (reference);
   empty predictions are dropped.

Output ``instances``: ``pred_masks``, ``scores`` (in [0, 1]), ``pred_classes`` (part class in [0, N_c^p)),
``pred_object_index`` (row of ``objects``), ``pred_object_classes``, ``pred_boxes``, ``pred_features`` (the
query embedding of each prediction's best query, [K, D]), and the same parts as ``part_instances``
(``object_index``, ``features``; the format of :mod:`.postprocessing`) for the part-metric evaluators.
``part_query_instances`` holds the parts of step 2, one per query, before the same-class merge: what
mIoU-clustered clusters (PartDistillation, Cho et al. 2023, supp. "Zero-shot evaluation", clusters the predictions; the
evaluator reads it in its clustered mode, mIoU-mapped reads the merged ``part_instances``). Objects whose
class is outside [0, N_c^o) get no parts (a counted ``object_without_class`` skip; a split where no object has a
class is refused before inference, ``engine/checks.check_object_classes``). Without ``objects`` the output is the
class-agnostic proposal inference of :class:`ProposalModel` (``pred_classes`` all 0). The reference evaluates with
the GT object class (PartDistillation supp. §2 says the predicted one): here the class is whatever
``objects.gt_classes`` holds.
"""

import logging
import math

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F

from ...data.skips import note_skip
from ...utils.errors import ConfigError
from .mask2former import SetCriterion
from .part_mask2former import PartMask2Former
from .postprocessing import assign_pixels, cat_instances, masks_to_boxes, object_masks
from .postprocessing import merge_same_class as merge_same_class_masks
from .proposal import load_decoder_weights, proposal_inference

__all__ = [
    "PartDistillationModel",
    "PartDistillationCriterion",
    "PerObjectPartClassifier",
    "object_part_inference",
    "DISTILLATION_INIT_PREFIXES",
]

logger = logging.getLogger(__name__)

# Tensors MODEL.PART_DISTILLATION.INIT_FROM may initialise: everything but the part classifier.
DISTILLATION_INIT_PREFIXES = ("backbone.", "sem_seg_head.")


class PerObjectPartClassifier(nn.Module):
    """N_c^o linear classifiers of N_c^p parts over D-dim query embeddings, looked up per object class."""

    def __init__(self, num_object_classes: int, num_part_classes: int, hidden_dim: int):
        super().__init__()
        self.num_object_classes = num_object_classes
        self.num_part_classes = num_part_classes
        self.hidden_dim = hidden_dim
        self.weight = nn.Embedding(num_object_classes, num_part_classes * hidden_dim)
        self.bias = nn.Embedding(num_object_classes, num_part_classes)
        # as nn.Linear(D, N_c^p) initialises each classifier's weight; biases start at 0
        bound = 1.0 / math.sqrt(hidden_dim)
        nn.init.uniform_(self.weight.weight, -bound, bound)
        nn.init.zeros_(self.bias.weight)

    def forward(self, feats: torch.Tensor, object_classes: torch.Tensor) -> torch.Tensor:
        """Part logits [N, N_c^p] of N query embeddings ``feats`` [N, D], each with its object class [N]."""
        n = feats.shape[0]
        w = self.weight(object_classes).view(n, self.num_part_classes, self.hidden_dim)
        return torch.einsum("npd,nd->np", w.to(feats.dtype), feats) + self.bias(object_classes).to(feats.dtype)

    def logits_for_class(self, feats: torch.Tensor, object_class: int) -> torch.Tensor:
        """Part logits [Q, N_c^p] of queries ``feats`` [Q, D] under one object class's classifier."""
        index = torch.full((feats.shape[0],), int(object_class), dtype=torch.int64, device=feats.device)
        return self(feats, index)


class PartDistillationCriterion(SetCriterion):
    """SetCriterion (objectness + masks, num_classes 1) plus ``loss_part_ce`` on the matched queries."""

    def __init__(self, *args, part_class_weight: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        sets = [""] + [f"_{i}" for i in range(sum(1 for k in self.weight_dict if k.startswith("loss_ce_")))]
        for suffix in sets:
            self.weight_dict["loss_part_ce" + suffix] = part_class_weight

    @classmethod
    def from_set_criterion(cls, base: SetCriterion, part_class_weight: float):
        """The same criterion (matcher, weights, point sampling) as ``base`` with the part-class loss."""
        num_layers = sum(1 for k in base.weight_dict if k.startswith("loss_ce_"))
        return cls(
            base.num_classes,
            matcher=base.matcher,
            class_weight=base.weight_dict["loss_ce"],
            mask_weight=base.weight_dict["loss_mask"],
            dice_weight=base.weight_dict["loss_dice"],
            num_layers=num_layers,
            eos_coef=base.eos_coef,
            losses=list(base.losses),
            num_points=base.num_points,
            oversample_ratio=base.oversample_ratio,
            importance_sample_ratio=base.importance_sample_ratio,
            part_class_weight=part_class_weight,
        )

    def loss_part_classes(self, outputs, targets, indices, num_masks, classifier):
        batch_idx, src_idx = self._get_src_permutation_idx(indices)
        feats = outputs["query_feats"][batch_idx, src_idx]
        parts = torch.cat([t["part_labels"][J] for t, (_, J) in zip(targets, indices)])
        objects = torch.cat([t["object_classes"][J] for t, (_, J) in zip(targets, indices)])
        logits = classifier(feats, objects).float()  # an empty batch still touches the table (zero gradient)
        return {"loss_part_ce": F.cross_entropy(logits, parts, reduction="sum") / num_masks}

    def forward(self, outputs, targets, classifier):
        """Losses of every prediction set; ``outputs`` (and each aux set) carry ``query_feats`` [B, Q, D]."""
        num_masks = sum(len(t["labels"]) for t in targets)
        num_masks = torch.as_tensor([num_masks], dtype=torch.float, device=outputs["pred_logits"].device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        num_masks = torch.clamp(num_masks, min=1).item()
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        sets = [(final, "")] + [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses = {}
        for out, suffix in sets:
            indices = self.matcher({"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}, targets)
            for loss in self.losses:
                losses.update({k + suffix: v for k, v in self.get_loss(loss, out, targets, indices, num_masks).items()})
            part = self.loss_part_classes(out, targets, indices, num_masks, classifier)
            losses.update({k + suffix: v for k, v in part.items()})
        return losses


def load_shared_tensors(model: nn.Module, path: str, prefixes=DISTILLATION_INIT_PREFIXES) -> dict:
    """Copy the tensors under ``prefixes`` of checkpoint ``path`` into ``model`` where shapes match
    (:func:`load_decoder_weights` with this stage's key; the part classifiers never match and stay fresh)."""
    return load_decoder_weights(
        model,
        path,
        prefixes,
        key="MODEL.PART_DISTILLATION.INIT_FROM",
        expected="a stage-2 proposal checkpoint (e.g. output/stage2_proposals/model_final.pth)",
    )


def object_part_inference(
    objectness_logits,
    part_logits,
    mask_pred,
    object_mask,
    topk: int,
    per_pixel_assignment=True,
    merge_same_class=True,
    return_queries=False,
):
    """Part predictions inside one object (module doc, inference steps 1-3).

    Args:
        objectness_logits: [Q, 2] (part, no-part) logits.
        part_logits: [Q, P] part logits of the object's class classifier.
        mask_pred: [Q, H, W] mask logits at the output resolution.
        object_mask: bool [H, W].
        topk: queries kept by score.
        return_queries: also return the query behind each prediction (for merged classes, the best-scoring one).
    Returns:
        (masks bool [K, H, W], scores [K] in [0, 1], part classes int64 [K][, query indices int64 [K]]) sorted
        by descending score.
    """
    objectness = F.softmax(objectness_logits.float(), dim=-1)[:, 0]
    part_prob = F.softmax(part_logits.float(), dim=-1)
    score, label = (objectness[:, None] * part_prob).max(dim=-1)
    topk = min(int(topk), score.numel())
    score, index = score.topk(topk)
    label = label[index]
    logits = mask_pred[index].float() * object_mask.to(mask_pred.device, torch.float32)
    masks = assign_pixels(score, logits, per_pixel_assignment)
    keep = masks.flatten(1).any(dim=1)
    masks, score, label, index = masks[keep], score[keep], label[keep], index[keep]
    if merge_same_class:
        masks, score, label, index = merge_same_class_masks(masks, score, label, index)
    # score is sorted descending (top-k, then order-preserving filters and merge)
    result = masks, score, label
    return result + (index,) if return_queries else result


@META_ARCH_REGISTRY.register()
class PartDistillationModel(PartMask2Former):
    """Mask2Former with objectness × per-object-class part classification (module doc)."""

    objectness_head = True
    objectness_hint = "; part classes are MODEL.PART_DISTILLATION.NUM_PART_CLASSES"

    @configurable
    def __init__(
        self,
        *,
        num_object_classes: int,
        num_part_classes: int = 8,
        part_class_weight: float = 2.0,
        init_from: str = "",
        per_pixel_assignment: bool = True,
        merge_same_class: bool = True,
        **kwargs,
    ):
        """
        Args:
            num_object_classes: ``MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES`` (N_c^o).
            num_part_classes: ``MODEL.PART_DISTILLATION.NUM_PART_CLASSES`` (N_c^p).
            part_class_weight: ``MODEL.PART_DISTILLATION.PART_CLASS_WEIGHT``.
            init_from: ``MODEL.PART_DISTILLATION.INIT_FROM`` ("" = none).
            per_pixel_assignment / merge_same_class: inference switches (module doc).
            kwargs: :class:`Mask2Former`'s arguments.
        """
        super().__init__(**kwargs)
        if num_object_classes < 1 or num_part_classes < 1:
            raise ConfigError(
                "MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES and NUM_PART_CLASSES must be >= 1 "
                f"(got {num_object_classes}, {num_part_classes})."
            )
        predictor = self.sem_seg_head.predictor
        self.part_classifier = PerObjectPartClassifier(
            num_object_classes, num_part_classes, predictor.class_embed.in_features
        )
        self.criterion = PartDistillationCriterion.from_set_criterion(self.criterion, part_class_weight)
        self.per_pixel_assignment = per_pixel_assignment
        self.merge_same_class = merge_same_class
        self.init_report = load_shared_tensors(self, init_from) if init_from else None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        group = cfg.MODEL.PART_DISTILLATION
        ret.update(
            num_object_classes=group.NUM_OBJECT_CLASSES,
            num_part_classes=group.NUM_PART_CLASSES,
            part_class_weight=group.PART_CLASS_WEIGHT,
            init_from=group.INIT_FROM,
            per_pixel_assignment=group.PER_PIXEL_ASSIGNMENT,
            merge_same_class=group.MERGE_SAME_CLASS,
        )
        return ret

    def prepare_targets(self, targets, images):
        """Padded masks, objectness labels (0, by the base class), part labels and object classes of each image."""
        new_targets = super().prepare_targets(targets, images)
        num_o, num_p = self.part_classifier.num_object_classes, self.part_classifier.num_part_classes
        for t, inst in zip(new_targets, targets):
            if not inst.has("gt_object_classes"):
                raise ConfigError(
                    "PartDistillationModel needs instances.gt_object_classes (PseudoLabelDatasetMapper sets it "
                    "from the store objects' category_id)."
                )
            parts, objects = inst.gt_classes.long(), inst.gt_object_classes.long()
            if len(parts) and (parts.min() < 0 or parts.max() >= num_p):
                raise ConfigError(
                    f"part classes {parts.unique().tolist()} outside [0, {num_p}) (MODEL.PART_DISTILLATION."
                    "NUM_PART_CLASSES; train with INPUT.PSEUDO_LABELS.USE_PART_CLASSES True on a store with part_class)"
                )
            if len(objects) and (objects.min() < 0 or objects.max() >= num_o):
                raise ConfigError(
                    f"object classes {objects.unique().tolist()} outside [0, {num_o}) "
                    "(MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES; the store objects need a category_id)"
                )
            t["part_labels"] = parts
            t["object_classes"] = objects
        return new_targets

    def criterion_inputs(self) -> tuple:
        """The part classifier, for ``loss_part_ce`` (module doc); ``outputs`` carry the decoder's ``query_feats``."""
        return (self.part_classifier,)

    def inference_single(self, mask_cls, mask_pred, query_feats, objects, image_size):
        if objects is None:
            return {"instances": proposal_inference(mask_cls, mask_pred, self.test_topk_per_image)}
        per_query, merged = self._object_inference(mask_cls, query_feats, mask_pred, objects, image_size)
        # the part-metric evaluators read per-object parts (format: .postprocessing); mIoU-clustered reads
        # one part per query (part_query_instances), the other metrics the merged parts
        return {
            "instances": merged,
            "part_instances": _as_part_instances(merged),
            "part_query_instances": _as_part_instances(per_query),
        }

    def _object_inference(self, mask_cls, feats, mask_pred, objects, image_size):
        """(per-query, merged) predictions of every object (module doc); without the merge both are the same."""
        out_size = tuple(mask_pred.shape[-2:])
        device = mask_pred.device
        masks_per_object = object_masks(objects, image_size, out_size, device)
        classes = objects.gt_classes.tolist() if objects.has("gt_classes") else [-1] * len(objects)
        names = ("pred_masks", "scores", "pred_classes", "pred_object_index", "pred_object_classes", "pred_features")
        per_query = {k: [] for k in names}
        merged = {k: [] for k in names}
        for m, object_class in enumerate(classes):
            if not 0 <= object_class < self.part_classifier.num_object_classes:
                # counted and rate-limited (a split without object classes is refused before inference,
                # engine/checks.check_object_classes)
                note_skip(
                    "object_without_class",
                    f"object {m}",
                    f"class {object_class} outside [0, {self.part_classifier.num_object_classes})",
                    what="No part predictions for",
                )
                continue
            part_logits = self.part_classifier.logits_for_class(feats, object_class)
            single = object_part_inference(
                mask_cls,
                part_logits,
                mask_pred,
                masks_per_object[m],
                self.test_topk_per_image,
                self.per_pixel_assignment,
                merge_same_class=False,
                return_queries=True,
            )
            sets = [(per_query, single)]
            if self.merge_same_class:
                sets.append((merged, merge_same_class_masks(*single)))
            for store, (masks, scores, labels, queries) in sets:
                store["pred_masks"].append(masks.float())
                store["scores"].append(scores)
                store["pred_classes"].append(labels)
                store["pred_object_index"].append(torch.full_like(labels, m))
                store["pred_object_classes"].append(torch.full_like(labels, object_class))
                store["pred_features"].append(feats[queries].float())
        empty_long = torch.zeros(0, dtype=torch.int64, device=device)
        empty = {
            "pred_masks": torch.zeros((0,) + out_size, device=device),
            "scores": torch.zeros(0, device=device),
            "pred_classes": empty_long,
            "pred_object_index": empty_long,
            "pred_object_classes": empty_long,
            "pred_features": feats.new_zeros((0, feats.shape[-1]), dtype=torch.float32),
        }
        results = []
        for store in (per_query, merged) if self.merge_same_class else (per_query,):
            result = cat_instances(out_size, store, empty)
            result.pred_boxes = masks_to_boxes(result.pred_masks > 0)
            results.append(result)
        return results[0], results[-1]


def _as_part_instances(result: Instances) -> Instances:
    """Part predictions (``instances`` of :class:`PartDistillationModel`) in the ``part_instances`` format."""
    return Instances(
        result.image_size,
        pred_masks=result.pred_masks > 0.5,
        scores=result.scores,
        pred_classes=result.pred_classes,
        object_index=result.pred_object_index,
        features=result.pred_features,
    )
