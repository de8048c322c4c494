"""The supervised part baseline as PartDistillation (Cho et al. 2023) supp. "Supervised models" defines it: a plain
class-specific Mask2Former (COCO-instance initialised, one class head over the dataset's part classes) trained on GT
parts, evaluated inside the GT objects.

Training is Mask2Former's (``instances`` with ``gt_classes`` = part class ids, e.g. from
``InstanceLSJDatasetMapper`` on a ``*_parts_*`` dataset). Inference with ``objects`` (``PartEvalDatasetMapper``),
per object (reference code's supervised inference): the mask logits of every query are multiplied by the object
mask, each query's score is its best part-class probability and its class that argmax, and each pixel of the object
goes to ``argmax_j score_j · sigmoid(m_j(x))``; queries that win no pixel disappear. Output ``part_instances``:
``pred_masks``, ``pred_classes`` (the dataset's part class id: score with ``TEST.PART_MIOU.MODE direct``), ``scores``,
``object_index``. Without ``objects`` it is a plain Mask2Former (``instances``).

The class-agnostic version (paper Tab. 2, AR@200) is :class:`ProposalModel` (``SEM_SEG_HEAD.NUM_CLASSES 1``) trained on
the GT parts with ``INPUT.CLASS_AGNOSTIC True``.
"""

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList, Instances

from .mask2former import Mask2Former

__all__ = ["SupervisedPartModel", "object_part_assignment"]


def object_part_assignment(mask_cls, mask_pred, object_masks):
    """Per-object, per-pixel part assignment of one image.

    Args:
        mask_cls: [Q, C + 1] class logits (last = no-object).
        mask_pred: [Q, H, W] mask logits at the output size.
        object_masks: [M, H, W] bool.
    Returns:
        Instances with pred_masks [P, H, W] bool, pred_classes [P], scores [P], object_index [P].
    """
    prob = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    scores, classes = prob.max(dim=-1)  # [Q]
    sig = mask_pred.float().sigmoid()
    masks, labels, conf, owner = [], [], [], []
    for m, obj in enumerate(object_masks):
        inside = obj.to(sig.device)
        weighted = scores[:, None, None] * sig * inside[None]
        positive = (mask_pred.float() > 0) & inside[None]
        support = positive.any(dim=0)
        winner = weighted.argmax(dim=0)
        for q in torch.unique(winner[support]).tolist():
            mask = (winner == q) & support
            masks.append(mask)
            labels.append(int(classes[q]))
            conf.append(float(scores[q]))
            owner.append(m)
    result = Instances(tuple(mask_pred.shape[-2:]))
    device = mask_pred.device
    result.pred_masks = (
        torch.stack(masks) if masks else torch.zeros((0, *mask_pred.shape[-2:]), dtype=torch.bool, device=device)
    )
    result.pred_classes = torch.tensor(labels, dtype=torch.long, device=device)
    result.scores = torch.tensor(conf, dtype=torch.float32, device=device)
    result.object_index = torch.tensor(owner, dtype=torch.long, device=device)
    return result


@META_ARCH_REGISTRY.register()
class SupervisedPartModel(Mask2Former):
    """Mask2Former over part classes; object-conditioned part inference when the inputs carry ``objects``."""

    def forward(self, batched_inputs):
        if self.training or any("objects" not in x for x in batched_inputs):
            return super().forward(batched_inputs)
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        mask_pred_all = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = x.get("height", images.image_sizes[i][0]), x.get("width", images.image_sizes[i][1])
            mask_pred = sem_seg_postprocess(mask_pred_all[i], images.image_sizes[i], h, w)
            objects = x["objects"].gt_masks
            objects = torch.as_tensor(objects).bool()
            if objects.shape[-2:] != (h, w):
                objects = F.interpolate(objects[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
            results.append({"part_instances": object_part_assignment(outputs["pred_logits"][i], mask_pred, objects)})
        return results
