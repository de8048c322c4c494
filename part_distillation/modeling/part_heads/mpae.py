"""MPAE: unsupervised part discovery by descriptor-based masked image restoration (Xia et al., ICCV 2025).

Re-implemented from the description of the reference code Jiahao-UTS/MPAE (code-first, cross-checked
with the MPAE supplementary material); no reference code is copied.

Forward (one view per image):

1. **F**: the frozen backbone's dense features (DINOv2 ViT-B/14-reg ``"vit"`` in the paper; any registered
   backbone here, e.g. EfficientNet-Lite0 on CPU), ``FEATURE_LEVELS`` concatenated, then a trainable 1×1 conv
   (no bias) to C = ``FEATURE_DIM`` (256).
2. **G** [B, K+1, C]: a descriptor ViT on the image (patch ``DESCRIPTOR_PATCH_SIZE`` conv without bias,
   learnable pos-embed initialised to 2-D sin-cos, ``DESCRIPTOR_DEPTH`` pre-LN blocks with QuickGELU,
   K+1 learnable part tokens, ln_pre / ln_post, bias-free Linear to C).
3. **A** = softmax over the K+1 descriptors of ``⟨G_k, F_ij⟩`` (no temperature), the part map.
4. **R** = Σ_k A_k G_k, the "filled feature map".
5. A masked autoencoder restores the image: its patches (``MAE_PATCH_SIZE``) + fixed sin-cos position
   are masked at ``MASK_RATIO`` (0.9); ``ENCODER_LAYERS`` blocks encode the kept ones; the decoder input is
   the encoded kept tokens (Linear to C) with every **masked** position filled by its R token (MPAE's key
   idea: the restoration must go through the part descriptors), + sin-cos position, ``DECODER_LAYERS``
   blocks, LN, Linear to ``REC_PATCH_SIZE``²·3 pixels. The restored image is compared with the bilinearly
   resized input (L_r, VGG perceptual "structural penalty" included).

Losses (``losses/mpae.py``): ``loss_rec`` = λ_r·L_r, ``loss_tv`` + ``loss_entropy`` = λ_d·(L_tv + L_ent),
``loss_presence_bg`` + ``loss_presence_fg`` = λ_p·L_p, ``loss_semantic`` = λ_s·L_s (λ 1, 0.5, 1, 0.25).

Inference (reference code): F bilinearly upsampled ×``INFERENCE_UPSAMPLE`` (4 on CUB, 8 otherwise: 128² maps)
before the dot product with G; the scores are A itself.

Layout: **channel 0 is the background descriptor** everywhere inside this head (the reference puts it
last, index K; the two are the same model with the descriptor tokens permuted, so the conversion happens
once, here, and only matters when porting reference weights: move token K to the front).

Deviations from the reference, on purpose (see also the config comments):

* The MAE grid (image / ``MAE_PATCH_SIZE``) must match F's grid for R to fill it; with DINOv2 both are
  image/14. With another backbone stride, R is resized bilinearly to the MAE grid.
* At least one token is kept (``int(L·(1 − ratio))`` is 0 for tiny grids).
* The descriptor pos-embed is resized bicubically when the patch grid differs from ``image_size / patch``.
* No cls token in the MAE encoder (the reference code has none).
"""

import logging
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ...utils.errors import ConfigError
from ..backbone.vit import ViTBlock, resize_pos_embed, sincos_pos_embed_2d
from ..losses.mpae import (
    entropy_loss,
    presence_loss,
    restoration_loss,
    semantic_consistency_loss,
    total_variation_loss,
)
from ..losses.perceptual import PerceptualLoss, imagenet_normalize
from .base import DiscoveryBatch, PartHead
from .registry import PART_HEAD_REGISTRY

__all__ = ["MPAEHead", "DescriptorViT", "MaskedRestorer"]

logger = logging.getLogger(__name__)

TRAIN_VIEWS = ("view1", "view2")


def _xavier_init(module: nn.Module) -> None:
    """xavier-uniform Linear/conv weights, zero biases, LayerNorm (1, 0) (PartFormer and MPAE code)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DescriptorViT(nn.Module):
    """Image → K+1 part descriptors G [B, K+1, C] (token 0 = background)."""

    def __init__(
        self,
        num_tokens: int,
        out_dim: int,
        patch_size: int = 14,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 1024,
        image_size: int = 224,
    ):
        super().__init__()
        self.patch_size = int(patch_size)
        grid = max(1, int(image_size) // self.patch_size)
        self.patch_embed = nn.Conv2d(3, width, self.patch_size, self.patch_size, bias=False)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(width, grid, grid)[None])  # learnable, sin-cos init
        self.part_tokens = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            ViTBlock(width, heads, mlp_dim, act="quick_gelu", eps=1e-5) for _ in range(int(depth))
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        _xavier_init(self)
        nn.init.normal_(self.part_tokens, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + resize_pos_embed(self.pos_embed[0], (h, w))[None]
        k1 = self.part_tokens.shape[1]
        x = self.ln_pre(torch.cat([self.part_tokens.expand(x.shape[0], -1, -1), x], dim=1))
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.ln_post(x[:, :k1]))


class MaskedRestorer(nn.Module):
    """MPAE's masked autoencoder: masked input patches + the filled map R → restored image."""

    def __init__(
        self,
        patch_size: int = 14,
        dim: int = 256,
        encoder_layers: int = 2,
        encoder_heads: int = 4,
        decoder_dim: int = 256,
        decoder_layers: int = 2,
        rec_patch_size: int = 8,
        mask_ratio: float = 0.9,
    ):
        super().__init__()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ConfigError(f"MODEL.PART_DISCOVERY.MPAE.MASK_RATIO={mask_ratio!r} must be in [0, 1).")
        self.patch_size, self.rec_patch_size = int(patch_size), int(rec_patch_size)
        self.dim, self.decoder_dim = int(dim), int(decoder_dim)
        self.mask_ratio = float(mask_ratio)
        self.patch_embed = nn.Conv2d(3, dim, self.patch_size, self.patch_size)
        self.encoder = nn.ModuleList(ViTBlock(dim, encoder_heads, 4 * dim) for _ in range(int(encoder_layers)))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        heads = max(1, self.decoder_dim // 64)  # C/64 heads (reference code)
        self.decoder = nn.ModuleList(ViTBlock(decoder_dim, heads, 4 * decoder_dim) for _ in range(int(decoder_layers)))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.rec_patch_size**2 * 3)
        _xavier_init(self)

    def grid(self, image_hw):
        return image_hw[0] // self.patch_size, image_hw[1] // self.patch_size

    def forward(self, image: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] (normalised), filled R [B, C, h, w] → restored [B, 3, gh·rp, gw·rp]."""
        x = self.patch_embed(image)
        b, _, gh, gw = x.shape
        if tuple(filled.shape[-2:]) != (gh, gw):
            filled = F.interpolate(filled, size=(gh, gw), mode="bilinear", align_corners=False)
        length = gh * gw
        tokens = x.flatten(2).transpose(1, 2) + sincos_pos_embed_2d(self.dim, gh, gw).to(x)
        keep = max(1, int(length * (1.0 - self.mask_ratio)))
        ids = torch.rand(b, length, device=x.device).argsort(dim=1)[:, :keep]  # random kept positions
        kept = tokens.gather(1, ids[..., None].expand(-1, -1, self.dim))
        for blk in self.encoder:
            kept = blk(kept)
        kept = self.decoder_embed(self.encoder_norm(kept))
        # every masked position reads its filled-feature token R_ij; kept positions their encoding
        full = filled.flatten(2).transpose(1, 2)
        full = full.scatter(1, ids[..., None].expand(-1, -1, self.decoder_dim), kept)
        full = full + sincos_pos_embed_2d(self.decoder_dim, gh, gw).to(full)
        for blk in self.decoder:
            full = blk(full)
        pix = self.decoder_pred(self.decoder_norm(full))  # [B, L, rp·rp·3], laid out (row, col, channel)
        rp = self.rec_patch_size
        return pix.reshape(b, gh, gw, rp, rp, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, gh * rp, gw * rp)


@PART_HEAD_REGISTRY.register()
class MPAEHead(PartHead):
    """MPAE: descriptors G, part map A = softmax⟨G, F⟩, masked restoration through R = Σ A G."""

    external_background = False

    @configurable
    def __init__(
        self,
        *,
        num_parts: int,
        feature_levels,
        input_shape: Optional[Dict] = None,
        in_channels: Optional[int] = None,
        image_size: int = 224,
        feature_dim: int = 256,
        descriptor_patch_size: int = 14,
        descriptor_width: int = 256,
        descriptor_depth: int = 6,
        descriptor_heads: int = 8,
        descriptor_mlp_dim: int = 1024,
        mae_patch_size: int = 14,
        mae_dim: int = 256,
        encoder_layers: int = 2,
        encoder_heads: int = 4,
        decoder_layers: int = 2,
        rec_patch_size: int = 8,
        mask_ratio: float = 0.9,
        rec_pixel_weight: float = 0.1,
        perceptual: Optional[PerceptualLoss] = None,
        lambda_r: float = 1.0,
        lambda_d: float = 0.5,
        lambda_p: float = 1.0,
        lambda_s: float = 0.25,
        arc_scale: float = 20.0,
        arc_margin: float = 0.5,
        group_size: int = 8,
        presence_pool: int = 3,
        inference_upsample: int = 8,
        train_view: str = "view1",
        input_format: str = "RGB",
    ):
        """
        Args:
            in_channels: channels of the concatenated ``feature_levels``; default from ``input_shape``.
            image_size: training image side; sets the descriptor ViT's pos-embed grid (image / patch).
            perceptual: the frozen VGG19 (or stand-in) feature-L1 loss of L_r; None drops the term.
            train_view: "view1" (the mapper's flipped view) or "view2" (its random similarity warp of view 1,
                standing in for MPAE's RandomAffine; costs one more frozen-backbone pass).
            Others: see ``_add_mpae_config`` in ``part_distillation/config/discovery.py``.
        """
        super().__init__(num_parts=num_parts, feature_levels=feature_levels, input_shape=input_shape)
        in_channels = self.levels_channels(input_shape, in_channels)
        if train_view not in TRAIN_VIEWS:
            raise ConfigError(f"MODEL.PART_DISCOVERY.MPAE.TRAIN_VIEW={train_view!r}: use one of {TRAIN_VIEWS}.")
        if int(inference_upsample) < 1:
            raise ConfigError(f"MODEL.PART_DISCOVERY.MPAE.INFERENCE_UPSAMPLE={inference_upsample!r} must be ≥ 1.")
        self.proj = nn.Conv2d(int(in_channels), int(feature_dim), 1, bias=False)
        nn.init.xavier_uniform_(self.proj.weight.view(int(feature_dim), -1))
        self.descriptor = DescriptorViT(
            self.num_parts + 1,
            int(feature_dim),
            descriptor_patch_size,
            descriptor_width,
            descriptor_depth,
            descriptor_heads,
            descriptor_mlp_dim,
            image_size,
        )
        self.restorer = MaskedRestorer(
            mae_patch_size,
            mae_dim,
            encoder_layers,
            encoder_heads,
            int(feature_dim),
            decoder_layers,
            rec_patch_size,
            mask_ratio,
        )
        self.perceptual = perceptual
        self.rec_pixel_weight = float(rec_pixel_weight)
        self.weights = {"r": float(lambda_r), "d": float(lambda_d), "p": float(lambda_p), "s": float(lambda_s)}
        self.arc_scale, self.arc_margin = float(arc_scale), float(arc_margin)
        self.group_size, self.presence_pool = int(group_size), int(presence_pool)
        self.inference_upsample = int(inference_upsample)
        self.train_view = train_view
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg, input_shape):
        pd = cfg.MODEL.PART_DISCOVERY
        mp = pd.MPAE
        return {
            **cls.common_args(cfg, input_shape),
            "image_size": cfg.INPUT.PAIRED_VIEW.IMAGE_SIZE,
            "feature_dim": mp.FEATURE_DIM,
            "descriptor_patch_size": mp.DESCRIPTOR_PATCH_SIZE,
            "descriptor_width": mp.DESCRIPTOR_WIDTH,
            "descriptor_depth": mp.DESCRIPTOR_DEPTH,
            "descriptor_heads": mp.DESCRIPTOR_HEADS,
            "descriptor_mlp_dim": mp.DESCRIPTOR_MLP_DIM,
            "mae_patch_size": mp.MAE_PATCH_SIZE,
            "mae_dim": mp.MAE_DIM,
            "encoder_layers": mp.ENCODER_LAYERS,
            "encoder_heads": mp.ENCODER_HEADS,
            "decoder_layers": mp.DECODER_LAYERS,
            "rec_patch_size": mp.REC_PATCH_SIZE,
            "mask_ratio": mp.MASK_RATIO,
            "rec_pixel_weight": mp.REC_PIXEL_WEIGHT,
            "perceptual": PerceptualLoss(cfg) if mp.STRUCTURAL_PENALTY else None,
            "lambda_r": mp.LAMBDA_R,
            "lambda_d": mp.LAMBDA_D,
            "lambda_p": mp.LAMBDA_P,
            "lambda_s": mp.LAMBDA_S,
            "arc_scale": mp.ARC_SCALE,
            "arc_margin": mp.ARC_MARGIN,
            "group_size": mp.GROUP_SIZE,
            "presence_pool": mp.PRESENCE_POOL,
            "inference_upsample": mp.INFERENCE_UPSAMPLE,
            "train_view": mp.TRAIN_VIEW,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------------------------------
    def encode(self, features: Dict[str, torch.Tensor], raw_images: torch.Tensor):
        """(ImageNet-normalised image, F [B, C, h, w], G [B, K+1, C]) of one view."""
        image = imagenet_normalize(raw_images, self.input_format)
        feats = self.proj(self.concat_levels(features))
        return image, feats, self.descriptor(image)

    @staticmethod
    def similarity(feats: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
        """A = softmax_k ⟨G_k, F_ij⟩ [B, K+1, h, w] (no temperature, no normalisation, as the reference code)."""
        return torch.einsum("bkc,bchw->bkhw", desc, feats).softmax(dim=1)

    def losses(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> Dict[str, torch.Tensor]:
        raw = batch.raw_images
        if self.train_view == "view2":
            if batch.images2 is None:
                raise ConfigError(
                    "MODEL.PART_DISCOVERY.MPAE.TRAIN_VIEW='view2' needs the paired-view mapper's image2 "
                    "(INPUT.DATASET_MAPPER_NAME 'PairedViewDatasetMapper')."
                )
            features, raw = batch.features_of(batch.images2.tensor), batch.raw_images2
        image, feats, desc = self.encode(features, raw)
        sim = self.similarity(feats, desc)
        filled = torch.einsum("bkhw,bkc->bchw", sim, desc)
        restored = self.restorer(image, filled)
        target = F.interpolate(image, size=restored.shape[-2:], mode="bilinear", align_corners=False)
        w = self.weights
        bg, fg = presence_loss(sim, self.group_size, self.presence_pool)
        return {
            "loss_rec": w["r"] * restoration_loss(restored, target, self.rec_pixel_weight, self.perceptual),
            "loss_tv": w["d"] * total_variation_loss(sim),
            "loss_entropy": w["d"] * entropy_loss(sim),
            "loss_presence_bg": w["p"] * bg,
            "loss_presence_fg": w["p"] * fg,
            "loss_semantic": w["s"] * semantic_consistency_loss(sim, feats, desc, self.arc_scale, self.arc_margin),
        }

    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        _, feats, desc = self.encode(features, batch.raw_images)
        if self.inference_upsample > 1:
            feats = F.interpolate(feats, scale_factor=self.inference_upsample, mode="bilinear", align_corners=False)
        return self.similarity(feats, desc)
