"""Stage 3: class-specific part ranking (PartDistillation supp. §2 "Class-specific part ranking", Tab. 5).

:class:`PartRankingModel` is the stage-2 :class:`ProposalModel` (same config, ``MODEL.WEIGHTS`` = a stage-2
checkpoint), run per object instance of the input (``objects``: ``gt_masks``, ``gt_classes``, from an
evaluation mapper with GT objects or a pseudo-label mapper with pseudo objects):

1. s_j = P(part | q_j) = softmax(class logits)[0]; the top ``TEST.DETECTIONS_PER_IMAGE`` queries.
2. Mask logits m_j resized to the input's ``height``×``width`` and multiplied by the object mask M_o.
3. Per-pixel prediction: x ∈ M_o with some m_j(x) > 0 goes to argmax_j s_j·sigmoid(m_j(x)), giving the
   disjoint masks M̃_j (queries that win nothing disappear).
4. Filters of PartDistillation supp. Eq. (3): keep j iff r_j = |M̃_j| / |M_o| > τr
(``MODEL.PART_RANKING.MIN_AREA_RATIO``)
   and s_j > τs (``MODEL.PART_RANKING.MIN_SCORE``). The denominator is the object mask as in supp. Eq. (2)
   (the reference divides by the any-query-positive support instead; docs/differences.md); both filters are
   strict and applied as written (no "keep if nothing survives" fallback): an object may keep no part.
5. Query features f_j: the last decoder layer's LayerNorm-ed output (the reference's ``decoder_output``,
   which feeds the class head and the mask MLP), L2-normalised with ``MODEL.PART_RANKING.FEATURE_NORM``;
   the decoder returns them with its predictions (:class:`QueryFeatureTransformerDecoder`).

Outputs ``{"instances": objects (pred_masks, scores = 1, pred_classes = object class),
"part_instances": parts (pred_masks, scores = s_j, object_index, ratios, features = f_j, pred_classes)}``
(the format of :mod:`.postprocessing`; mIoU-clustered clusters ``features``). Without prototypes (the
cluster pass) ``pred_classes`` are 0; with prototypes set (:meth:`PartRankingModel.set_prototypes`) they
are the nearest prototype of the part's object class (−1 for a class without prototypes) and the parts
also carry ``soft_scores`` = softmax_k(−‖f_j − μ_k‖₂ / T) (supp. Eq. (4), plain Euclidean distance,
T = ``MODEL.PART_RANKING.TEMPERATURE``; prototypes a class does not have, e.g. a class with fewer than K
parts, get probability 0).
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch.nn import functional as F

from ...clustering.prototypes import prototype_soft_scores  # noqa: F401 (also re-exported from here)
from .postprocessing import assign_pixels, cat_instances, object_masks
from .proposal import ProposalModel

__all__ = ["PartRankingModel", "rank_object_parts", "prototype_soft_scores"]

logger = logging.getLogger(__name__)


def rank_object_parts(part_prob, logits, object_mask, min_area_ratio: float, min_score: float, per_pixel: bool = True):
    """The kept parts of one object (module doc, steps 3–4).

    Args:
        part_prob: [Q] s_j.
        logits: [Q, H, W] mask logits at the output resolution (not yet masked).
        object_mask: bool [H, W] M_o.
        min_area_ratio: τr; keep r_j > τr.
        min_score: τs; keep s_j > τs.
        per_pixel: per-pixel argmax (PartDistillation supp. Tab. 5 "Per-pixel Pred."); False: masks m_j > 0 inside M_o.
    Returns:
        (index [P] long into the queries, masks bool [P, H, W], ratios [P] float), in query order.
    """
    q = logits.shape[0]
    obj = object_mask.to(device=logits.device, dtype=torch.bool)
    obj_area = obj.sum()
    if q == 0 or int(obj_area) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return (
            empty,
            torch.zeros((0,) + tuple(logits.shape[-2:]), dtype=torch.bool, device=logits.device),
            empty.float(),
        )
    masked = logits.float() * obj.float()
    masks = assign_pixels(part_prob.float(), masked, per_pixel)
    ratios = masks.flatten(1).sum(dim=1).float() / obj_area.float()
    keep = (ratios > min_area_ratio) & (part_prob.float() > min_score) & masks.flatten(1).any(dim=1)
    index = torch.nonzero(keep).flatten()
    return index, masks[index], ratios[index]


@META_ARCH_REGISTRY.register()
class PartRankingModel(ProposalModel):
    """Object-conditioned, filtered part proposals with their query features (module doc)."""

    @configurable
    def __init__(
        self, *, min_area_ratio: float, min_score: float, feature_norm: bool = True, temperature: float = 1.0, **kwargs
    ):
        """
        Args:
            min_area_ratio: τr, ``MODEL.PART_RANKING.MIN_AREA_RATIO``.
            min_score: τs, ``MODEL.PART_RANKING.MIN_SCORE``.
            feature_norm: L2-normalise the query features (``MODEL.PART_RANKING.FEATURE_NORM``).
            temperature: T of the soft scores (``MODEL.PART_RANKING.TEMPERATURE``).
            kwargs: :class:`ProposalModel`'s arguments.
        """
        super().__init__(**kwargs)
        self.min_area_ratio = float(min_area_ratio)
        self.min_score = float(min_score)
        self.feature_norm = bool(feature_norm)
        self.temperature = float(temperature)
        # Buffers (not saved) so that .to(device) moves prototypes loaded before the model is moved.
        self.register_buffer("prototypes", None, persistent=False)  # [C, K, D]
        self.register_buffer("num_clusters", None, persistent=False)  # [C]

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ranking = cfg.MODEL.PART_RANKING
        ret.update(
            min_area_ratio=ranking.MIN_AREA_RATIO,
            min_score=ranking.MIN_SCORE,
            feature_norm=ranking.FEATURE_NORM,
            temperature=ranking.TEMPERATURE,
        )
        return ret

    @property
    def cluster_feature_dim(self) -> int:
        """D of the query features the cluster pass collects (tools/rank_parts.py)."""
        return self.sem_seg_head.predictor.decoder_norm.normalized_shape[0]

    def set_prototypes(self, prototypes, num_clusters) -> None:
        """Prototypes [C, K, D] and per-class cluster counts [C] for labelling (None: cluster pass)."""
        self.prototypes = None if prototypes is None else torch.as_tensor(prototypes, device=self.device).float()
        self.num_clusters = None if num_clusters is None else torch.as_tensor(num_clusters, device=self.device).long()

    def inference_single(self, mask_cls, mask_pred, query_feats, objects, image_size):
        device = mask_pred.device
        output_size = tuple(mask_pred.shape[-2:])
        feats = F.normalize(query_feats.float(), dim=-1) if self.feature_norm else query_feats
        part_prob = F.softmax(mask_cls.float(), dim=-1)[:, 0]
        topk = min(int(self.test_topk_per_image), part_prob.numel())
        part_prob, order = part_prob.topk(topk)
        logits, feats = mask_pred[order], feats[order]
        if objects is None:
            obj_masks = torch.zeros((0,) + output_size, dtype=torch.bool, device=device)
            obj_classes = torch.zeros(0, dtype=torch.long, device=device)
        else:
            obj_masks = object_masks(objects, image_size, output_size, device)
            obj_classes = objects.gt_classes.to(device).long()
        with_prototypes = self.prototypes is not None
        fields = {k: [] for k in ("pred_masks", "scores", "pred_classes", "object_index", "ratios", "features")}
        if with_prototypes:
            fields["soft_scores"] = []
        for j in range(obj_masks.shape[0]):
            index, m, r = rank_object_parts(
                part_prob, logits, obj_masks[j], self.min_area_ratio, self.min_score, self.per_pixel_assignment
            )
            fields["pred_masks"].append(m)
            fields["scores"].append(part_prob[index])
            fields["object_index"].append(torch.full((len(index),), j, dtype=torch.long, device=device))
            fields["ratios"].append(r)
            fields["features"].append(feats[index].float())
            if not with_prototypes:  # the cluster pass: no part classes yet
                fields["pred_classes"].append(torch.zeros(len(index), dtype=torch.long, device=device))
                continue
            c = int(obj_classes[j])
            in_range = 0 <= c < self.prototypes.shape[0]
            n = int(self.num_clusters[c]) if in_range else 0
            protos = self.prototypes[c] if in_range else self.prototypes.new_zeros(self.prototypes.shape[1:])
            soft = prototype_soft_scores(feats[index], protos, n, self.temperature)
            fields["soft_scores"].append(soft)
            fields["pred_classes"].append(
                soft.argmax(dim=1) if n > 0 else torch.full((len(index),), -1, dtype=torch.long, device=device)
            )
        empty_long = torch.zeros(0, dtype=torch.long, device=device)
        empty = {
            "pred_masks": torch.zeros((0,) + output_size, dtype=torch.bool, device=device),
            "scores": torch.zeros(0, device=device),
            "pred_classes": empty_long,
            "object_index": empty_long,
            "ratios": torch.zeros(0, device=device),
            "features": torch.zeros(0, feats.shape[-1], device=device),
        }
        if with_prototypes:
            empty["soft_scores"] = torch.zeros(0, self.prototypes.shape[1], device=device)
        parts = cat_instances(output_size, fields, empty)
        objs = Instances(output_size)
        objs.pred_masks = obj_masks
        objs.scores = torch.ones(obj_masks.shape[0], device=device)
        objs.pred_classes = obj_classes
        return {"instances": objs, "part_instances": parts}
