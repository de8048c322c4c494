"""Unsupervised part discovery: one meta-architecture, one head per method (PART_HEAD_REGISTRY).

``PartDiscovery`` = a detectron2 backbone (optionally frozen, ``MODEL.PART_DISCOVERY.FREEZE_BACKBONE``)
+ the head named by ``MODEL.PART_DISCOVERY.HEAD`` (contract in ``part_heads/base.py``). It trains
and evaluates through the project's one Trainer and ``tools/train_net.py``, on the paired-view mapper's
inputs (``image``, optional ``image2``, ``fg_mask``, ``transform``, ...).

Training: ``forward`` returns the head's dict of weighted losses. Heads with nothing to train (the
K-means and DFF baselines) are **evaluation-only**: run them with ``tools/train_net.py --eval-only``;
training them raises a :class:`ConfigError` saying so (they are
non-trainable). A zero loss would not be harmless there: with a trainable backbone, AdamW's decoupled weight
decay would still shrink its weights at every step.

Inference, per image, at the input's ``height`` × ``width`` (default: the image's own size), in the
canonical layout:

* ``part_seg``: [H, W] long, 0 = background, 1..K = parts;
* ``part_probs``: [K+1, H, W] float, summing to 1 over channels (``MODEL.PART_DISCOVERY.RETURN_PROBS``);
* ``part_fg_probs``: [K, H, W] float, the head's part distribution *before* any fg mask is applied (with
  ``RETURN_PROBS``). FG-NMI/FG-ARI score the part assignment of GT-foreground pixels (Choudhury et al. 2021
  §4.1, "on foreground pixels only"), i.e. the argmax of these K part scores, unmasked: with the masked
  ``part_probs`` every pixel outside the mask would score 0 on every part and fall to part 1.

For heads that take the background from a given fg mask (``external_background``; Choudhury et al. and
the baselines) the probabilities are ``[1 − m, m · P]`` with P the head's part distribution (as in the reference code:
``argmax([1 − m, m·P])``), so every pixel outside ``fg_mask`` is 0 and every pixel inside is a part.
Without an ``fg_mask`` the head's own channel 0 is used (0 for the baselines: every pixel is a part); such
inputs are refused (:class:`ConfigError`) unless ``MODEL.PART_DISCOVERY.REQUIRE_FG_MASK`` is False.
The mask is applied at the image's (mapper output) resolution; when ``height``/``width`` differ from it, the
probabilities are then resized bilinearly and ``part_seg`` is their argmax.
"""

import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ...utils.errors import ConfigError
from ..part_heads.base import DiscoveryBatch, PartHead
from ..part_heads.registry import build_part_head
from .part_mask2former import normalize_images

__all__ = ["PartDiscovery"]

logger = logging.getLogger(__name__)

# Probability mass that keeps a part distribution defined where a head scores every part 0.
_EPS = 1e-12


def _pad_to(x: torch.Tensor, hw) -> torch.Tensor:
    return F.pad(x, (0, hw[1] - x.shape[-1], 0, hw[0] - x.shape[-2]))


@META_ARCH_REGISTRY.register()
class PartDiscovery(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: PartHead,
        freeze_backbone: bool,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
        return_probs: bool = True,
        require_fg_mask: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(self.backbone)
            self.backbone.eval()
        self.input_format = input_format
        self.return_probs = bool(return_probs)
        self.require_fg_mask = bool(require_fg_mask)
        self.size_divisibility = max(int(getattr(backbone, "size_divisibility", 0) or 0), 1)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        pd = cfg.MODEL.PART_DISCOVERY
        return {
            "backbone": backbone,
            "head": build_part_head(cfg, backbone.output_shape()),
            "freeze_backbone": pd.FREEZE_BACKBONE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "return_probs": pd.RETURN_PROBS,
            "require_fg_mask": pd.REQUIRE_FG_MASK,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen modules stay in eval mode
        return self

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------
    def features_of(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone outputs of normalised images [B, 3, H, W] (no graph when the backbone is frozen)."""
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def _view(self, batched_inputs: List[dict], image_key: str, mask_key: str, valid_key: Optional[str]):
        raw = [x[image_key].to(self.device).float() for x in batched_inputs]
        images = normalize_images(raw, self.pixel_mean, self.pixel_std, self.size_divisibility)
        padded = tuple(images.tensor.shape[-2:])
        raw_images = torch.stack([_pad_to(r, padded) for r in raw])
        valid = torch.zeros((len(raw),) + padded, dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            valid[i, :h, :w] = True
            if valid_key and valid_key in batched_inputs[i]:
                valid[i, :h, :w] &= batched_inputs[i][valid_key].to(self.device, torch.bool)
        fg = valid.clone()
        given = torch.zeros(len(raw), dtype=torch.bool, device=self.device)
        for i, x in enumerate(batched_inputs):
            if x.get(mask_key) is not None:
                m = x[mask_key].to(self.device, torch.bool)
                if tuple(m.shape) != tuple(images.image_sizes[i]):
                    raise ValueError(f"{mask_key} is {tuple(m.shape)} but its image is {tuple(images.image_sizes[i])}.")
                fg[i] = _pad_to(m, padded) & valid[i]
                given[i] = True
        return images, raw_images, valid, fg, given

    def _check_fg_masks(self, batched_inputs: List[dict]) -> None:
        """With ``require_fg_mask``, refuse inputs without ``fg_mask`` for a head that takes its background
        from one (a silent whole-image foreground would train and score a different task)."""
        if not (self.require_fg_mask and self.head.needs_fg_mask):
            return
        for x in batched_inputs:
            if x.get("fg_mask") is None:
                raise ConfigError(
                    f"{x.get('file_name', x.get('image_id'))!r}: "
                    f"MODEL.PART_DISCOVERY.HEAD={type(self.head).__name__!r} "
                    "takes its background from a foreground mask, but the record gives none (fg_mask_file, "
                    "sem_seg_file_name, parsing_file_name or part annotations); add one to the records, or set "
                    "MODEL.PART_DISCOVERY.REQUIRE_FG_MASK False to treat every pixel as foreground."
                )

    def prepare(self, batched_inputs: List[dict]) -> DiscoveryBatch:
        """Normalise, pad and collect view 1 (and view 2 when every input has ``image2``)."""
        self._check_fg_masks(batched_inputs)
        images, raw, valid, fg, given = self._view(batched_inputs, "image", "fg_mask", "valid1")
        batch = DiscoveryBatch(
            inputs=batched_inputs,
            images=images,
            raw_images=raw,
            valid=valid,
            fg_masks=fg,
            fg_given=given,
            input_format=self.input_format,
            features_of=self.features_of,
        )
        if all("image2" in x for x in batched_inputs):
            images2, raw2, valid2, fg2, given2 = self._view(batched_inputs, "image2", "fg_mask2", "valid2")
            batch.images2, batch.raw_images2, batch.valid2 = images2, raw2, valid2
            batch.fg_masks2, batch.fg_given2 = fg2, given2
        return batch

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[dict]):
        if self.training:
            if not self.head.trainable:
                raise ConfigError(
                    f"MODEL.PART_DISCOVERY.HEAD={type(self.head).__name__!r} has nothing to train (no trainable "
                    "parameters); evaluate it with `tools/train_net.py --eval-only`."
                )
            batch = self.prepare(batched_inputs)
            features = self.features_of(batch.images.tensor) if self.head.needs_view1_features else {}
            losses = self.head.losses(features, batch)
            if not losses:
                raise RuntimeError(f"{type(self.head).__name__}.losses returned no loss.")
            return losses
        with torch.no_grad():
            batch = self.prepare(batched_inputs)
            scores = self.head.inference(self.features_of(batch.images.tensor), batch)
            return self.postprocess(scores, batch)

    def postprocess(self, scores: torch.Tensor, batch: DiscoveryBatch) -> List[dict]:
        """Head scores [B, K+1, h, w] (grid over the padded batch) → per-image canonical outputs."""
        k1 = self.head.num_parts + 1
        if scores.dim() != 4 or scores.shape[:2] != (len(batch), k1):
            raise ValueError(
                f"{type(self.head).__name__}.inference must return [B, K+1={k1}, h, w], got {tuple(scores.shape)}."
            )
        padded = batch.padded_hw
        scores = scores.float().clamp_min(0)
        if tuple(scores.shape[-2:]) != padded:
            scores = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)
        results = []
        for i, x in enumerate(batch.inputs):
            h, w = batch.images.image_sizes[i]
            s = scores[i, :, :h, :w]
            parts = s[1:] + _EPS
            parts = parts / parts.sum(0, keepdim=True)
            if self.head.external_background and bool(batch.fg_given[i]):
                m = batch.fg_masks[i, :h, :w].float()[None]
                probs = torch.cat([1 - m, m * parts])
            else:
                total = s.sum(0, keepdim=True)
                probs = torch.where(
                    total > 0, s / total.clamp_min(_EPS), F.one_hot(torch.tensor(0), k1).to(s)[:, None, None]
                )
            height, width = int(x.get("height", h)), int(x.get("width", w))
            if (height, width) != (h, w):
                probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
                parts = F.interpolate(parts[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            out = {"part_seg": probs.argmax(0)}
            if self.return_probs:
                out["part_probs"] = probs
                out["part_fg_probs"] = parts
            results.append(out)
        return results
