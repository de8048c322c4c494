"""Mask2Former as the common base of every learned stage (stage 0 objects, stage 2/4 parts).

The released ``maskformer2`` package's ``MaskFormer.from_config`` passes ``weight_dict=`` to a
``SetCriterion`` whose signature no longer takes it, so ``META_ARCHITECTURE: "MaskFormer"`` cannot
be built. This subclass owns a ``from_config`` that matches the installed criterion and adds the
switches our stages need (uniform point sampling, boxes from masks, a safe top-k).
"""

import logging

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import BitMasks

from ...utils.compat import import_mask2former
from ..ops.ms_deform_attn import patch_mask2former

import_mask2former()
patch_mask2former()  # MSDeformAttn: the compiled op for CUDA tensors, PyTorch otherwise
from mask2former.maskformer_model import MaskFormer  # noqa: E402
from mask2former.modeling.criterion import SetCriterion  # noqa: E402
from mask2former.modeling.matcher import HungarianMatcher  # noqa: E402

__all__ = ["Mask2Former", "build_set_criterion"]

logger = logging.getLogger(__name__)


def build_set_criterion(cfg, num_classes: int) -> SetCriterion:
    """Hungarian matcher + set criterion from ``MODEL.MASK_FORMER`` keys.

    ``POINT_SAMPLING: "uniform"`` samples TRAIN_NUM_POINTS random points for the mask losses (PartDistillation supp.'s
    choice for part proposals); with oversample ratio 1 and importance ratio 0 Mask2Former's sampler
    draws exactly that many uniform points and computes no uncertainty ranking.
    """
    mf = cfg.MODEL.MASK_FORMER
    if mf.POINT_SAMPLING == "uniform":
        oversample_ratio, importance_ratio = 1.0, 0.0
    elif mf.POINT_SAMPLING == "importance":
        oversample_ratio, importance_ratio = mf.OVERSAMPLE_RATIO, mf.IMPORTANCE_SAMPLE_RATIO
    else:
        raise ValueError(f"MODEL.MASK_FORMER.POINT_SAMPLING={mf.POINT_SAMPLING!r}: use 'importance' or 'uniform'.")
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=mf.MASK_WEIGHT,
        cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
    return SetCriterion(
        num_classes,
        matcher=matcher,
        class_weight=mf.CLASS_WEIGHT,
        mask_weight=mf.MASK_WEIGHT,
        dice_weight=mf.DICE_WEIGHT,
        # one auxiliary loss set per intermediate decoder layer (deep supervision)
        num_layers=mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_ratio,
    )


@META_ARCH_REGISTRY.register()
class Mask2Former(MaskFormer):
    """Mask2Former instance segmentation buildable from a config with the installed package."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER
        num_queries = mf.NUM_OBJECT_QUERIES
        max_topk = num_queries * sem_seg_head.num_classes
        topk = cfg.TEST.DETECTIONS_PER_IMAGE
        if topk > max_topk:
            # Mask2Former's top-k over (query, class) pairs fails if k exceeds their number.
            logger.warning(
                "TEST.DETECTIONS_PER_IMAGE=%d > NUM_OBJECT_QUERIES×NUM_CLASSES=%d; using %d.", topk, max_topk, max_topk
            )
            topk = max_topk
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_set_criterion(cfg, sem_seg_head.num_classes),
            "num_queries": num_queries,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "test_topk_per_image": topk,
        }

    def instance_inference(self, mask_cls, mask_pred):
        result = super().instance_inference(mask_cls, mask_pred)
        # Upstream leaves all-zero boxes, which makes box AP and box-based filtering meaningless.
        result.pred_boxes = BitMasks(result.pred_masks > 0).get_bounding_boxes().to(result.scores.device)
        return result
