"""``PartMask2Former``: the base of the Mask2Former part models (stages 2, 3 and 4).

:class:`ProposalModel`, :class:`PartRankingModel` and :class:`PartDistillationModel` share everything but
what they make of one image's predictions:

* :meth:`PartMask2Former.preprocess_image` — normalise the batch and pad it into an ``ImageList``
  (as detectron2's ``GeneralizedRCNN.preprocess_image``; :func:`normalize_images` is the same step for
  the models that are not Mask2Formers);
* the forward: backbone → ``sem_seg_head`` → losses when training; at test time mask logits are
  upsampled to the padded input, cropped and resized to the input's ``height``×``width``
  (``sem_seg_postprocess``), then each image goes to :meth:`PartMask2Former.inference_single`;
* query features: the decoder (:class:`QueryFeatureTransformerDecoder`) returns ``query_feats`` [B, Q, D]
  with every prediction set, so no module hook is needed.

Subclasses implement ``inference_single(mask_cls, mask_pred, query_feats, objects, image_size)`` and, when
their targets or losses differ, ``prepare_targets`` / :meth:`PartMask2Former.criterion_inputs`. Those whose
decoder class head scores objectness (``objectness_head``: the proposal, ranking and distillation models) get
their ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` checked and every target label set to 0 here. Their shared
post-processing functions are in :mod:`.postprocessing` (which also documents the ``part_instances``
output). The state-dict names are Mask2Former's: checkpoints of the previous classes load unchanged.
"""

import abc

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch.nn import functional as F

from ...utils.errors import ConfigError
from .mask2former import Mask2Former
from .query_decoder import QueryFeatureTransformerDecoder

__all__ = ["PartMask2Former", "normalize_images"]


def normalize_images(images, pixel_mean, pixel_std, size_divisibility: int = 0) -> ImageList:
    """(image − mean) / std of each [C, H, W] tensor of ``images``, padded into one ``ImageList``."""
    return ImageList.from_tensors([(x - pixel_mean) / pixel_std for x in images], size_divisibility)


class PartMask2Former(Mask2Former, metaclass=abc.ABCMeta):
    """Mask2Former whose test-time output is built per image by :meth:`inference_single` (module doc)."""

    #: the decoder's class head scores objectness (part vs no part): one class, every target label 0
    objectness_head: bool = False
    #: what the error on a wrong ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` adds (e.g. where the part classes are set)
    objectness_hint: str = ""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.check_objectness_head(self.sem_seg_head.num_classes)
        if not isinstance(self.sem_seg_head.predictor, QueryFeatureTransformerDecoder):
            raise ConfigError(
                f"{type(self).__name__} reads the decoder's query features: set "
                'MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME "QueryFeatureTransformerDecoder" (got '
                f"{type(self.sem_seg_head.predictor).__name__}; same parameters, checkpoints load unchanged)."
            )

    @classmethod
    def check_objectness_head(cls, num_classes: int) -> None:
        """With ``objectness_head``, a :class:`ConfigError` unless the decoder has exactly one class."""
        if cls.objectness_head and num_classes != 1:
            raise ConfigError(
                f"{cls.__name__}'s decoder class head is the objectness (part, no-part): set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES 1 (got {num_classes}){cls.objectness_hint}."
            )

    @classmethod
    def from_config(cls, cfg):
        cls.check_objectness_head(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)  # before building anything
        return super().from_config(cfg)

    def prepare_targets(self, targets, images):
        """Mask2Former's padded targets; with ``objectness_head`` every label is 0 (part vs no part)."""
        new_targets = super().prepare_targets(targets, images)
        if self.objectness_head:
            for t in new_targets:
                t["labels"] = torch.zeros_like(t["labels"])
        return new_targets

    def preprocess_image(self, batched_inputs) -> ImageList:
        """Normalised, padded images of the batch (on the model's device)."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        return normalize_images(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        if self.training:
            return self.losses(outputs, batched_inputs, images)
        return self.inference(outputs, batched_inputs, images)

    def losses(self, outputs, batched_inputs, images) -> dict:
        """Mask2Former's weighted set losses on ``prepare_targets`` of the inputs' ``instances``."""
        targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
        losses = self.criterion(outputs, targets, *self.criterion_inputs())
        return {k: v * self.criterion.weight_dict[k] for k, v in losses.items() if k in self.criterion.weight_dict}

    def criterion_inputs(self) -> tuple:
        """What ``self.criterion`` takes after ``(outputs, targets)`` (nothing for Mask2Former's)."""
        return ()

    def inference(self, outputs, batched_inputs, images) -> list:
        """One output dict per image: :meth:`inference_single` on the predictions at the input's size."""
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        processed = []
        for mask_cls, mask_pred, query_feats, inp, image_size in zip(
            outputs["pred_logits"], mask_pred_results, outputs["query_feats"], batched_inputs, images.image_sizes
        ):
            height, width = inp.get("height", image_size[0]), inp.get("width", image_size[1])
            mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
            processed.append(self.inference_single(mask_cls, mask_pred, query_feats, inp.get("objects"), image_size))
        return processed

    @abc.abstractmethod
    def inference_single(
        self, mask_cls: torch.Tensor, mask_pred: torch.Tensor, query_feats: torch.Tensor, objects, image_size
    ) -> dict:
        """The output dict of one image.

        Args:
            mask_cls: [Q, K+1] class logits.
            mask_pred: [Q, height, width] mask logits at the input's output size.
            query_feats: [Q, D] query features (the class head's input).
            objects: the input's ``objects`` (``gt_masks``, ``gt_classes``) or None.
            image_size: (h, w) of the resized image inside the padded batch (the size of ``objects``' masks
                when they come from an evaluation mapper).
        """
