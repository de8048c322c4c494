"""Pure post-processing of the part models' predictions, and the ``part_instances`` output format.

Functions of tensors only (no model state), shared by :class:`ProposalModel`, :class:`PartRankingModel`
and :class:`PartDistillationModel` (as detectron2's Panoptic-DeepLab keeps its post-processing apart from
its model): the per-pixel assignment of pixels to queries, the same-class merge, and
:class:`~detectron2.structures.Instances` that stay valid when nothing is kept; object masks at the output
size and boxes come from :mod:`part_distillation.structures.masks` (re-exported here).

The ``part_instances`` output
=============================
Every model that predicts parts *of objects* returns, per image, ``{"instances": objects,
"part_instances": parts}`` (``PixelGroupingModel``, ``ClassPixelGroupingModel``, ``PartRankingModel``,
``PartDistillationModel`` given ``objects``). The part-metric evaluators (``evaluation/part_miou.py``,
``nmi_ari.py``, ``keypoint_nme.py``) and the pseudo-label writer read it. ``parts`` is an ``Instances``
at the output size (the input's ``height`` × ``width``) with these fields:

================  ==============  ==================================================================
field             type            meaning
================  ==============  ==================================================================
pred_masks        bool [P, H, W]  the part's pixels (inside its object)
scores            float [P]       confidence in [0, 1]
pred_classes      int64 [P]       part id within the object: a part class, a prototype/cluster id,
                                  or 0 where the model has no part classes (class-agnostic parts)
object_index      int64 [P]       row of ``instances`` (the objects) the part belongs to
features          float [P, D]    optional: the query feature behind the part (what mIoU-clustered
                                  clusters); ranking and distillation models set it
soft_scores       float [P, K]    optional: the part's probability per prototype (stage 3, labelling)
================  ==============  ==================================================================

``instances`` holds the objects (``pred_masks``, ``scores``, ``pred_classes`` = object class), except for
``PartDistillationModel``, whose ``instances`` are its part predictions (with ``pred_object_index``).
``PartDistillationModel`` also returns ``part_query_instances``: the same fields with one part per
query, before the same-class merge, which is what mIoU-clustered clusters (PartDistillation, Cho et al.
2023, supp. "Zero-shot evaluation": the predictions are clustered); with the merge off both hold the same parts.
"""

import torch
from detectron2.structures import Instances

from ...structures.masks import masks_to_boxes, object_masks, object_union

__all__ = [
    "object_masks",
    "object_union",
    "assign_pixels",
    "merge_same_class",
    "cat_instances",
    "masks_to_boxes",
]


def assign_pixels(scores: torch.Tensor, logits: torch.Tensor, per_pixel: bool = True) -> torch.Tensor:
    """Masks [Q, H, W] of queries with ``scores`` [Q] and mask ``logits`` [Q, H, W] (already multiplied by
    the object mask where there is one).

    With ``per_pixel``, pixel x goes to argmax_j score_j·sigmoid(logit_j(x)) only, inside the support
    {x : max_j logit_j(x) > 0}, so the masks are disjoint (the reference code's ``_unique_assignment``;
    PartDistillation Tab. 5 "Per-pixel Pred."); otherwise mask_j = logit_j > 0 and masks may overlap.
    """
    positive = logits > 0
    if not per_pixel or logits.shape[0] == 0:
        return positive
    support = positive.any(dim=0)
    winner = (scores.to(logits.dtype)[:, None, None] * logits.sigmoid()).argmax(dim=0)
    return (winner[None] == torch.arange(logits.shape[0], device=logits.device)[:, None, None]) & support[None]


def merge_same_class(masks, scores, labels, index):
    """OR the masks that share a label; each label keeps its best score and query (reference code's
    ``_unique_assignment_with_classes``).

    Args:
        masks: bool [K, H, W]; scores [K] sorted descending; labels, index: int64 [K].
    Returns:
        (masks, scores, labels, index) with one entry per distinct label, sorted by descending score.
    """
    if len(labels) == 0:
        return masks, scores, labels, index
    classes = labels.unique()
    best = torch.stack([(labels == c).nonzero()[0, 0] for c in classes])  # scores descending: first is best
    masks = torch.stack([masks[labels == c].any(dim=0) for c in classes])
    scores, index, labels = scores[best], index[best], classes
    order = torch.argsort(scores, descending=True, stable=True)
    return masks[order], scores[order], labels[order], index[order]


def cat_instances(image_size, fields: dict, empty: dict) -> Instances:
    """``Instances`` whose field ``k`` is ``torch.cat(fields[k])``, or ``empty[k]`` when nothing was
    collected (so a model's output has the same fields and trailing shapes whether it kept parts or not).

    Args:
        fields: name → list of tensors to concatenate along dim 0.
        empty: name → the zero-length tensor of that field (right dtype, device and trailing shape).
    """
    out = Instances(tuple(image_size))
    for name, parts in fields.items():
        out.set(name, torch.cat(parts) if parts else empty[name])
    return out
