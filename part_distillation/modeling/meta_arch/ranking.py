"""Stage 3: class-specific part ranking (seed 000 "Class-specific part ranking", Tab. 5; spec §5).

:class:`PartRankingModel` is the stage-2 :class:`ProposalModel` (same config, ``MODEL.WEIGHTS`` = a stage-2
checkpoint), run per object instance of the input (``objects``: ``gt_masks``, ``gt_classes``, from an
evaluation mapper with GT objects or a pseudo-label mapper with pseudo objects):

1. s_j = P(part | q_j) = softmax(class logits)[0]; the top ``TEST.DETECTIONS_PER_IMAGE`` queries.
2. Mask logits m_j resized to the input's ``height``×``width`` and multiplied by the object mask M_o.
3. Per-pixel prediction: x ∈ M_o with some m_j(x) > 0 goes to argmax_j s_j·sigmoid(m_j(x)), giving the
   disjoint masks M̃_j (queries that win nothing disappear).
4. Filters of seed Eq. (3): keep j iff r_j = |M̃_j| / |M_o| > τr (``MODEL.PART_RANKING.MIN_AREA_RATIO``)
   and s_j > τs (``MODEL.PART_RANKING.MIN_SCORE``). The denominator is the object mask as in seed Eq. (2)
   (the reference divides by the any-query-positive support instead, spec §5.2 [DIFF]); both filters are
   strict and applied as written (no "keep if nothing survives" fallback): an object may keep no part.
5. Query features f_j: the last decoder layer's LayerNorm-ed output (the reference's ``decoder_output``,
   which feeds the class head and the mask MLP), L2-normalised with ``MODEL.PART_RANKING.FEATURE_NORM``.
   They are read with a forward hook on the predictor's ``decoder_norm`` (its last call per forward is the
   final prediction's), so :class:`ProposalModel` is unchanged.

Outputs ``{"instances": objects (pred_masks, scores = 1, pred_classes = object class),
"part_instances": parts (pred_masks, scores = s_j, object_index, ratios, query_features)}``; with
prototypes set (:meth:`PartRankingModel.set_prototypes`) the parts also carry ``pred_classes`` (the
nearest prototype of their object's class) and ``soft_scores`` = softmax_k(−‖f_j − μ_k‖₂ / T) (seed Eq. (4),
plain Euclidean distance, T = ``MODEL.PART_RANKING.TEMPERATURE``; prototypes a class does not have, e.g.
a class with fewer than K parts, get probability 0).
"""
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from torch.nn import functional as F

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
        per_pixel: per-pixel argmax (seed Tab. 5 "Per-pixel Pred."); False: masks m_j > 0 inside M_o.
    Returns:
        (index [P] long into the queries, masks bool [P, H, W], ratios [P] float), in query order.
    """
    q = logits.shape[0]
    obj = object_mask.to(device=logits.device, dtype=torch.bool)
    obj_area = obj.sum()
    if q == 0 or int(obj_area) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, torch.zeros((0,) + tuple(logits.shape[-2:]), dtype=torch.bool, device=logits.device), empty.float()
    masked = logits.float() * obj.float()
    positive = masked > 0
    if per_pixel:
        support = positive.any(dim=0)
        winner = (part_prob.float()[:, None, None] * masked.sigmoid()).argmax(dim=0)
        masks = (winner[None] == torch.arange(q, device=logits.device)[:, None, None]) & support[None]
    else:
        masks = positive
    ratios = masks.flatten(1).sum(dim=1).float() / obj_area.float()
    keep = (ratios > min_area_ratio) & (part_prob.float() > min_score) & masks.flatten(1).any(dim=1)
    index = torch.nonzero(keep).flatten()
    return index, masks[index], ratios[index]


def prototype_soft_scores(features, prototypes, num_clusters: int, temperature: float = 1.0):
    """softmax_k(−‖f − μ_k‖₂ / T) over the first ``num_clusters`` prototypes; [P, K] (zeros beyond)."""
    k = prototypes.shape[0]
    out = torch.zeros(features.shape[0], k, dtype=torch.float32, device=features.device)
    if num_clusters <= 0 or features.shape[0] == 0:
        return out
    dist = torch.cdist(features.float(), prototypes[:num_clusters].float().to(features.device))
    out[:, :num_clusters] = torch.softmax(-dist / float(temperature), dim=-1)
    return out


@META_ARCH_REGISTRY.register()
class PartRankingModel(ProposalModel):
    """Object-conditioned, filtered part proposals with their query features (module doc)."""

    @configurable
    def __init__(self, *, min_area_ratio: float, min_score: float, feature_norm: bool = True,
                 temperature: float = 1.0, **kwargs):  # fmt: skip
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
        self._captured = []
        self.sem_seg_head.predictor.decoder_norm.register_forward_hook(self._capture)

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

    def _capture(self, module, inputs, output):
        self._captured.append(output)

    @property
    def cluster_feature_dim(self) -> int:
        """D of the query features the cluster pass collects (tools/rank_parts.py)."""
        return self.sem_seg_head.predictor.decoder_norm.normalized_shape[0]

    def set_prototypes(self, prototypes, num_clusters) -> None:
        """Prototypes [C, K, D] and per-class cluster counts [C] for labelling (None: cluster pass)."""
        self.prototypes = None if prototypes is None else torch.as_tensor(prototypes, device=self.device).float()
        self.num_clusters = None if num_clusters is None else torch.as_tensor(num_clusters, device=self.device).long()

    def forward(self, batched_inputs):
        if self.training:
            return super().forward(batched_inputs)
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        self._captured = []
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        features = self._captured[-1].transpose(0, 1)  # [Q, B, C] → [B, Q, C]
        self._captured = []
        if self.feature_norm:
            features = F.normalize(features.float(), dim=-1)
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        processed = []
        for mask_cls, mask_pred, feats, inp, image_size in zip(
            outputs["pred_logits"], mask_pred_results, features, batched_inputs, images.image_sizes
        ):
            height, width = inp.get("height", image_size[0]), inp.get("width", image_size[1])
            mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
            processed.append(self._rank_image(mask_cls, mask_pred, feats, inp.get("objects"), image_size, (height, width)))
        return processed

    def _object_masks(self, objects, image_size, output_size, device):
        masks = objects.gt_masks
        if isinstance(masks, BitMasks):
            masks = masks.tensor
        masks = torch.as_tensor(masks, device=device).bool()
        if masks.shape[0] == 0 or tuple(masks.shape[-2:]) == tuple(output_size):
            return masks.reshape((masks.shape[0],) + tuple(output_size))
        resized = F.interpolate(masks[:, None].float(), size=tuple(output_size), mode="bilinear", align_corners=False)
        return resized[:, 0] >= 0.5

    def _rank_image(self, mask_cls, mask_pred, feats, objects, image_size, output_size):
        device = mask_pred.device
        part_prob = F.softmax(mask_cls.float(), dim=-1)[:, 0]
        topk = min(int(self.test_topk_per_image), part_prob.numel())
        part_prob, order = part_prob.topk(topk)
        logits, feats = mask_pred[order], feats[order]
        if objects is None:
            obj_masks = torch.zeros((0,) + tuple(output_size), dtype=torch.bool, device=device)
            obj_classes = torch.zeros(0, dtype=torch.long, device=device)
        else:
            obj_masks = self._object_masks(objects, image_size, output_size, device)
            obj_classes = objects.gt_classes.to(device).long()
        masks, scores, owners, ratios, qfeats, classes, softs = [], [], [], [], [], [], []
        for j in range(obj_masks.shape[0]):
            index, m, r = rank_object_parts(part_prob, logits, obj_masks[j], self.min_area_ratio, self.min_score,
                                            self.per_pixel_assignment)  # fmt: skip
            masks.append(m)
            scores.append(part_prob[index])
            owners.append(torch.full((len(index),), j, dtype=torch.long, device=device))
            ratios.append(r)
            qfeats.append(feats[index].float())
            if self.prototypes is not None:
                c = int(obj_classes[j])
                in_range = 0 <= c < self.prototypes.shape[0]
                n = int(self.num_clusters[c]) if in_range else 0
                protos = self.prototypes[c] if in_range else self.prototypes.new_zeros(self.prototypes.shape[1:])
                soft = prototype_soft_scores(feats[index], protos, n, self.temperature)
                softs.append(soft)
                classes.append(soft.argmax(dim=1) if n > 0 else torch.full((len(index),), -1, dtype=torch.long, device=device))
        parts = Instances(tuple(output_size))
        dim = feats.shape[-1]
        parts.pred_masks = torch.cat(masks) if masks else torch.zeros((0,) + tuple(output_size), dtype=torch.bool, device=device)
        parts.scores = torch.cat(scores) if scores else torch.zeros(0, device=device)
        parts.object_index = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long, device=device)
        parts.ratios = torch.cat(ratios) if ratios else torch.zeros(0, device=device)
        parts.query_features = torch.cat(qfeats) if qfeats else torch.zeros(0, dim, device=device)
        if self.prototypes is not None:
            k = self.prototypes.shape[1]
            parts.pred_classes = torch.cat(classes) if classes else torch.zeros(0, dtype=torch.long, device=device)
            parts.soft_scores = torch.cat(softs) if softs else torch.zeros(0, k, device=device)
        objs = Instances(tuple(output_size))
        objs.pred_masks = obj_masks
        objs.scores = torch.ones(obj_masks.shape[0], device=device)
        objs.pred_classes = obj_classes
        return {"instances": objs, "part_instances": parts}
