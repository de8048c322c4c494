"""PartFormer head: part discovery by dual representation alignment (Xia et al., TPAMI 2024).

Per image I (PartFormer paper §3; reference code Jiahao-UTS/UnsupervisedPart):

* **F** (pixel representations): the hosted detectron2 backbone's ``FEATURE_LEVELS`` (frozen DINO ViT-S/8
  in the paper's "Ours*", a trainable ResNet-18 in "Ours"; the bundled EfficientNet-Lite0 on CPU) through a
  trainable 1×1 **compression head** to C channels (the code's 384→256→128→64; the paper says 3×3 convs).
* **G** (part representations): the **PartFormer**, a ViT trained from scratch on the image downsampled ×0.5
  (nearest), with K+1 learnable part tokens prepended (the last one is the background); its part-token outputs
  go through ``ln_post`` and a bias-free Linear to C.
* **Transfer** (:func:`~part_distillation.modeling.losses.partformer.transfer`): ``V = softmax_k(τ·<G_k, F_ij>)``
  over the K+1 tokens and ``S = Σ_k V_k G_k``; a CNN **decoder** (conv→LayerNorm→ReLU blocks, two ×2
  upsamplings) turns S into an image at 4× the feature grid.

Training (two streams with exchange, paper Fig. 2): G¹, F¹ from view 1 and G², F² from view 2 (the paired-view
mapper's warped copy); ``V^{1→2}`` from (G¹, F²) reconstructs view 2 and ``V^{2→1}`` from (G², F¹) view 1, so
the part representations of one view must explain the other (``EXCHANGE`` False: the one-stream ablation of
Table 7, each view from its own G). Losses, each averaged over the two directions:
``λ_rec·L_rec + λ_con·L_con + λ_area·L_area + λ_sc·L_sc`` (1, 0.3, 0.5, 0.01), with L_rec the VGG19
perceptual L1 (relu1_1…relu5_1 × 1/32 … 1) against the nearest-downsampled ImageNet-normalised view.
Without a paired view (no ``image2`` in the inputs) the head trains one stream on view 1.

Inference (paper §3.4): F bilinearly upsampled ×``INFER_UPSAMPLE`` (4: 32² → 128² for a 256² input), then
``softmax_k(τ·<G_k, F_ij>)``; the method's last (background) channel becomes channel 0 (canonical layout).

Dataset switches where the reference code differs from the paper or between datasets are config keys (see
``_add_partformer_config``): compression order, decoder order/final kernel/upsampling, dot vs cosine
similarity, fixed vs learned position embedding, area loss over the K or K+1 maps, and class-specific part
tokens (PartImageNet: K tokens per class selected by the input's class id, plus one shared background).
"""

import logging
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ...utils.errors import ConfigError
from ..losses.partformer import area_loss, arcface_loss, concentration_loss, transfer
from ..losses.perceptual import EfficientNetFeatures, PerceptualLoss, imagenet_normalize
from ..backbone.vit import QuickGELU, resize_pos_embed, sincos_pos_embed_2d
from .base import DiscoveryBatch, PartHead
from .registry import PART_HEAD_REGISTRY

__all__ = ["PartFormerHead", "PartFormer", "PartFormerDecoder", "LayerNorm2d"]

logger = logging.getLogger(__name__)

# PartFormer's perceptual taps and weights (reference code), used when the head is built without a cfg.
PARTFORMER_PERCEPTUAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PARTFORMER_PERCEPTUAL_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm (normalise over C at every pixel), the decoder's norm (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class _Block(nn.Module):
    """Pre-LN transformer block (``nn.MultiheadAttention`` + a QuickGELU MLP), as the reference."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), QuickGELU(), nn.Linear(mlp_dim, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class PartFormer(nn.Module):
    """ViT whose class token is replaced by part tokens; returns the part-token outputs projected to C.

    ``num_tokens`` learnable tokens (K+1, or K·N_class+1 with class-specific parts; the last is the
    background); ``forward(images, token_index)`` picks ``token_index`` [B, K+1] of them per image (None: all).
    """

    def __init__(
        self,
        *,
        out_dim: int,
        num_tokens: int,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 1024,
        patch_size: int = 16,
        pos_embed: str = "sincos",
        pos_grid: int = 8,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"MODEL.PART_DISCOVERY.PARTFORMER.POS_EMBED={pos_embed!r}: use 'sincos' or 'learned'.")
        if width % heads:
            raise ConfigError(f"MODEL.PART_DISCOVERY.PARTFORMER.WIDTH={width} is not divisible by HEADS={heads}.")
        if pos_embed == "sincos" and width % 4:
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PARTFORMER.WIDTH={width} must be a multiple of 4 (sin-cos embedding)."
            )
        self.patch_size, self.width, self.pos_embed_type = int(patch_size), int(width), pos_embed
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.part_tokens = nn.Parameter(torch.empty(num_tokens, width))
        if pos_embed == "learned":  # PartImageNet code: patch tokens only, interpolated to other grids
            self.pos_embed = nn.Parameter(torch.empty(pos_grid * pos_grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[_Block(width, heads, mlp_dim) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        nn.init.normal_(self.part_tokens, std=0.02)
        if self.pos_embed_type == "learned":
            nn.init.normal_(self.pos_embed, std=0.02)

    def _positions(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_2d(self.width, h, w).to(ref)
        return resize_pos_embed(self.pos_embed, (h, w))

    def forward(self, images: torch.Tensor, token_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(images)  # [B, width, h, w]
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self._positions(h, w, x)[None]
        tokens = self.part_tokens[None].expand(b, -1, -1) if token_index is None else self.part_tokens[token_index]
        t = tokens.shape[1]
        x = self.ln_pre(torch.cat([tokens, x], dim=1))  # part tokens get no position (zeros)
        x = self.blocks(x)
        return self.proj(self.ln_post(x[:, :t]))  # [B, T, C]


class PartFormerDecoder(nn.Module):
    """S [B, C, h, w] → image [B, 3, h·2^U, w·2^U]: (2 conv blocks, up×2) × U, one more block, a final conv.

    ``order`` "conv_ln_relu" (code) or "conv_relu_ln" (paper); ``final_kernel`` 1 (code) or 3 (paper).
    """

    def __init__(
        self,
        channels: int,
        num_upsamples: int = 2,
        upsample_mode: str = "bilinear",
        order: str = "conv_ln_relu",
        final_kernel: int = 1,
    ):
        super().__init__()
        if order not in ("conv_ln_relu", "conv_relu_ln"):
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PARTFORMER.DECODER_ORDER={order!r}: 'conv_ln_relu' or 'conv_relu_ln'."
            )
        if upsample_mode not in ("bilinear", "nearest"):
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PARTFORMER.DECODER_UPSAMPLE={upsample_mode!r}: 'bilinear' or 'nearest'."
            )

        def block():
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            if order == "conv_ln_relu":
                return nn.Sequential(conv, LayerNorm2d(channels), nn.ReLU())
            return nn.Sequential(conv, nn.ReLU(), LayerNorm2d(channels))

        up = {"scale_factor": 2, "mode": upsample_mode}
        if upsample_mode == "bilinear":
            up["align_corners"] = False
        layers = []
        for _ in range(int(num_upsamples)):
            layers += [block(), block(), nn.Upsample(**up)]
        layers += [block(), nn.Conv2d(channels, 3, final_kernel, padding=final_kernel // 2)]
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, s):
        return self.layers(s)


def _compression_head(in_channels: int, dims: Sequence[int], order: str, kernel: int = 1) -> nn.Module:
    """``kernel``×``kernel`` convs ``in → dims[0] → … → dims[-1]`` (code 1×1, paper 3×3); a norm and a ReLU between
    them in ``order`` ("conv_relu_bn": CUB code, "conv_bn_relu": CelebA code); the last conv is plain. ``dims`` = []:
    identity."""
    if order not in ("conv_relu_bn", "conv_bn_relu"):
        raise ConfigError(
            f"MODEL.PART_DISCOVERY.PARTFORMER.COMPRESS_ORDER={order!r}: 'conv_relu_bn' or 'conv_bn_relu'."
        )
    layers, c = [], in_channels
    for i, d in enumerate(dims):
        layers.append(nn.Conv2d(c, d, kernel, padding=kernel // 2))
        if i < len(dims) - 1:
            pair = [nn.ReLU(), nn.BatchNorm2d(d)] if order == "conv_relu_bn" else [nn.BatchNorm2d(d), nn.ReLU()]
            layers += pair
        c = d
    head = nn.Sequential(*layers)
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


@PART_HEAD_REGISTRY.register()
class PartFormerHead(PartHead):
    """Learned K+1 part tokens aligned with dense features by reconstruction (module docstring)."""

    external_background = False

    @configurable
    def __init__(
        self,
        *,
        num_parts: int,
        feature_levels,
        input_shape: Dict,
        perceptual: Optional[PerceptualLoss] = None,
        compress_dims: Sequence[int] = (256, 128, 64),
        compress_order: str = "conv_relu_bn",
        compress_kernel: int = 1,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 1024,
        patch_size: int = 16,
        input_scale: float = 0.5,
        pos_embed: str = "sincos",
        pos_grid: int = 8,
        tau: float = 0.8,
        similarity: str = "dot",
        learn_scale: bool = False,
        decoder_upsamples: int = 2,
        decoder_upsample_mode: str = "bilinear",
        decoder_order: str = "conv_ln_relu",
        decoder_final_kernel: int = 1,
        exchange: bool = True,
        alpha: float = 0.5,
        area_on_background: bool = False,
        arcface_scale: float = 20.0,
        arcface_margin: float = 0.5,
        rec_weight: float = 1.0,
        con_weight: float = 0.3,
        area_weight: float = 0.5,
        sc_weight: float = 0.01,
        infer_upsample: int = 4,
        num_classes: int = 0,
        class_key: str = "class_id",
    ):
        """
        Args:
            perceptual: the L_rec network + weights; None = the bundled EfficientNet-Lite0 stand-in at PartFormer's
                taps relu1_1…relu5_1 × (1/32 … 1) (``from_config`` builds VGG19 when its weights are given).
            compress_dims: compression head output sizes; the last is C ([] = the backbone's channels).
            compress_kernel: its conv kernel (1 in the code, 3 in the paper's text).
            width, depth, heads, mlp_dim, patch_size: the PartFormer ViT (256, 6, 8, 1024, 16).
            input_scale: PartFormer input = image resized (nearest) by this (0.5).
            tau: τ of eq. 2 (or the initial learnable scale with ``learn_scale``; PartImageNet: ln(1/0.07), cosine).
            alpha: α of eq. 6 (CUB 0.5, CelebA 2.0, PartImageNet 1.5).
            area_on_background: L_area over all K+1 maps (paper eq. 6, PartImageNet code) or the K fg ones.
            num_classes: > 0 gives K tokens (and K ArcFace vectors) per class, chosen by the integer
                ``inputs[i][class_key]``, plus one shared background token (PartImageNet code).
        """
        super().__init__(num_parts=num_parts, feature_levels=feature_levels, input_shape=input_shape)
        in_channels = self.levels_channels(input_shape)
        self.compress = _compression_head(in_channels, list(compress_dims), compress_order, int(compress_kernel))
        c = int(compress_dims[-1]) if len(compress_dims) else in_channels
        self.num_classes, self.class_key = int(num_classes), class_key
        groups = max(self.num_classes, 1)
        self.partformer = PartFormer(
            out_dim=c,
            num_tokens=num_parts * groups + 1,
            width=width,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            patch_size=patch_size,
            pos_embed=pos_embed,
            pos_grid=pos_grid,
        )
        self.decoder = PartFormerDecoder(
            c, decoder_upsamples, decoder_upsample_mode, decoder_order, decoder_final_kernel
        )
        self.arcface_weight = nn.Parameter(torch.empty(num_parts * groups, c))
        nn.init.xavier_uniform_(self.arcface_weight)
        if similarity not in ("dot", "cosine"):
            raise ConfigError(f"MODEL.PART_DISCOVERY.PARTFORMER.SIMILARITY={similarity!r}: use 'dot' or 'cosine'.")
        self.similarity = similarity
        if learn_scale:
            self.logit_scale = nn.Parameter(torch.tensor(float(tau)))
        else:
            self.register_buffer("logit_scale", torch.tensor(float(tau)), persistent=False)
        if perceptual is None:
            perceptual = PerceptualLoss(
                network=EfficientNetFeatures(PARTFORMER_PERCEPTUAL_LAYERS), layer_weights=PARTFORMER_PERCEPTUAL_WEIGHTS
            )
        self.perceptual = perceptual
        self.input_scale = float(input_scale)
        self.exchange = bool(exchange)
        self.alpha = float(alpha)
        self.area_on_background = bool(area_on_background)
        self.arcface_scale, self.arcface_margin = float(arcface_scale), float(arcface_margin)
        self.weights = {"rec": rec_weight, "con": con_weight, "area": area_weight, "sc": sc_weight}
        self.infer_upsample = int(infer_upsample)

    @classmethod
    def from_config(cls, cfg, input_shape):
        pd = cfg.MODEL.PART_DISCOVERY
        pf = pd.PARTFORMER
        return {
            **cls.common_args(cfg, input_shape),
            "perceptual": PerceptualLoss(cfg),
            "compress_dims": pf.COMPRESS_DIMS,
            "compress_order": pf.COMPRESS_ORDER,
            "compress_kernel": pf.COMPRESS_KERNEL,
            "width": pf.WIDTH,
            "depth": pf.DEPTH,
            "heads": pf.HEADS,
            "mlp_dim": pf.MLP_DIM,
            "patch_size": pf.PATCH_SIZE,
            "input_scale": pf.INPUT_SCALE,
            "pos_embed": pf.POS_EMBED,
            "pos_grid": pf.POS_GRID,
            "tau": pf.TAU,
            "similarity": pf.SIMILARITY,
            "learn_scale": pf.LEARN_SCALE,
            "decoder_upsamples": pf.DECODER_UPSAMPLES,
            "decoder_upsample_mode": pf.DECODER_UPSAMPLE,
            "decoder_order": pf.DECODER_ORDER,
            "decoder_final_kernel": pf.DECODER_FINAL_KERNEL,
            "exchange": pf.EXCHANGE,
            "alpha": pf.ALPHA,
            "area_on_background": pf.AREA_ON_BACKGROUND,
            "arcface_scale": pf.ARCFACE_SCALE,
            "arcface_margin": pf.ARCFACE_MARGIN,
            "rec_weight": pf.REC_WEIGHT,
            "con_weight": pf.CON_WEIGHT,
            "area_weight": pf.AREA_WEIGHT,
            "sc_weight": pf.SC_WEIGHT,
            "infer_upsample": pf.INFER_UPSAMPLE,
            "num_classes": pf.NUM_CLASSES,
            "class_key": pf.CLASS_KEY,
        }

    # ------------------------------------------------------------------------------------------
    # Representations
    # ------------------------------------------------------------------------------------------
    def _class_ids(self, batch: DiscoveryBatch) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        try:
            ids = torch.tensor([int(x[self.class_key]) for x in batch.inputs], device=self.arcface_weight.device)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PARTFORMER.NUM_CLASSES={self.num_classes} needs an integer "
                f"{self.class_key!r} (CLASS_KEY) in every input: {e!r}."
            ) from e
        if bool(((ids < 0) | (ids >= self.num_classes)).any()):
            raise ConfigError(f"{self.class_key!r} values {ids.tolist()} outside [0, NUM_CLASSES={self.num_classes}).")
        return ids

    def _token_index(self, class_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, K+1] rows of the token table: the class's K parts, then the shared background (last)."""
        if class_ids is None:
            return None
        k = self.num_parts
        parts = class_ids[:, None] * k + torch.arange(k, device=class_ids.device)[None]
        bg = torch.full_like(class_ids[:, None], self.num_classes * k)
        return torch.cat([parts, bg], dim=1)

    def part_representations(self, raw_images: torch.Tensor, input_format: str, class_ids=None) -> torch.Tensor:
        """G [B, K+1, C] (background last) from detectron2 pixels (0–255) of one view."""
        x = imagenet_normalize(raw_images.float(), input_format)
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(round(h * self.input_scale), round(w * self.input_scale)), mode="nearest")
        return self.partformer(x, self._token_index(class_ids))

    def pixel_representations(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """F [B, C, h, w]: the backbone levels through the compression head."""
        return self.compress(self.concat_levels(features))

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def _stream(self, g, f, target_raw, input_format):
        """One direction: parts ``g`` transferred onto features ``f``, decoded and compared with ``target_raw``."""
        v, s = transfer(g, f, self.logit_scale, self.similarity)
        recon = self.decoder(s)
        target = F.interpolate(
            imagenet_normalize(target_raw.float(), input_format), size=recon.shape[-2:], mode="nearest"
        )
        fg = v[:, : self.num_parts]
        return {
            "rec": self.perceptual(recon, target),
            "con": concentration_loss(fg),
            "area": area_loss(v if self.area_on_background else fg, self.alpha),
        }

    def losses(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> Dict[str, torch.Tensor]:
        class_ids = self._class_ids(batch)
        g1 = self.part_representations(batch.raw_images, batch.input_format, class_ids)
        f1 = self.pixel_representations(features)
        if batch.images2 is None:  # no paired view: one stream on view 1
            streams, gs = [self._stream(g1, f1, batch.raw_images, batch.input_format)], [g1]
        else:
            g2 = self.part_representations(batch.raw_images2, batch.input_format, class_ids)
            f2 = self.pixel_representations(batch.features_of(batch.images2.tensor))
            a, b = (g2, g1) if self.exchange else (g1, g2)  # parts explaining view 1, view 2
            streams = [
                self._stream(a, f1, batch.raw_images, batch.input_format),
                self._stream(b, f2, batch.raw_images2, batch.input_format),
            ]
            gs = [g1, g2]
        w = self.arcface_weight
        if class_ids is not None:
            w = w.view(self.num_classes, self.num_parts, -1)[class_ids]  # [B, K, C]
        sc = sum(arcface_loss(g[:, : self.num_parts], w, self.arcface_scale, self.arcface_margin) for g in gs) / len(gs)
        out = {f"loss_{n}": self.weights[n] * sum(s[n] for s in streams) / len(streams) for n in ("rec", "con", "area")}
        out["loss_sc"] = self.weights["sc"] * sc
        return out

    # ------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------
    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        g = self.part_representations(batch.raw_images, batch.input_format, self._class_ids(batch))
        f = self.pixel_representations(features)
        if self.infer_upsample > 1:
            f = F.interpolate(f, scale_factor=self.infer_upsample, mode="bilinear", align_corners=False)
        v, _ = transfer(g, f, self.logit_scale, self.similarity)
        return torch.cat([v[:, -1:], v[:, :-1]], dim=1)  # background (last token) → channel 0
