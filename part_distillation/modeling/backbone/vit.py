"""A plain ViT backbone that loads DINO (v1) and DINOv2 checkpoints (``build_dino_vit_backbone``).

Why: PartFormer and MPAE (their reference code) read dense features of a *frozen* self-supervised ViT
(DINO ViT-S/8, DINOv2 ViT-B/14 with registers). The reference code gets them from ``torch.hub``, which
needs the network; here the architecture is rebuilt and filled from a local state-dict file.

Architecture (identical in DINO and DINOv2 for the S/B/L models): conv patch embedding (kernel = stride
= p), a cls token, optional register tokens (DINOv2 "reg" models, Darcet et al.), a learned position
embedding for ``[cls, patches]`` (bicubically resized to the input's patch grid), ``DEPTH`` pre-norm
blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))`` (``ls*`` LayerScale: DINOv2 only), GELU
MLP, a final LayerNorm (eps 1e-6). Token order: ``[cls, registers…, patches…]``; registers get no
position embedding (DINOv2 adds it before inserting them).

Outputs (``MODEL.VIT.OUT_FEATURES``), both stride p:

* ``"vit"``: the final-norm patch tokens as a map ``[B, D, H/p, W/p]`` (DINOv2's ``x_norm_patchtokens``,
  the features B and C use);
* ``"vit_keys"``: the last block's attention keys of the patch tokens (heads concatenated), the features
  of Amir et al.'s DINO co-segmentation baseline.

State-dict layouts accepted (``MODEL.VIT.WEIGHTS``), mapped to this module's names and loaded strictly:

* DINO: ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``, ``blocks.<i>.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}``, ``norm.{weight,bias}`` (e.g.
  ``dino_deitsmall8_pretrain.pth``); full training checkpoints (``{"teacher": …}`` with ``module.`` /
  ``backbone.`` prefixes, projection ``head.*``) are unwrapped.
* DINOv2: the same plus ``register_tokens`` (reg models), ``blocks.<i>.ls{1,2}.gamma`` and the
  pretraining-only ``mask_token`` (dropped), e.g. ``dinov2_vitb14_reg4_pretrain.pth``. Chunked blocks
  (``blocks.<chunk>.<i>``) and SwiGLU FFNs (ViT-g) are not supported and fail with a clear message.
"""

import logging
import math
import os
import re
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from torch import nn

from ...utils.errors import ConfigError

__all__ = [
    "DinoViT",
    "ViTBlock",
    "QuickGELU",
    "build_dino_vit_backbone",
    "load_vit_weights",
    "sincos_pos_embed_2d",
    "VIT_OUTPUTS",
]

logger = logging.getLogger(__name__)

VIT_OUTPUTS = ("vit", "vit_keys")
_WEIGHTS_KEY = "MODEL.VIT.WEIGHTS"
# Checkpoint tensors with no counterpart at inference (DINOv2's masked-image-modelling token).
_UNUSED_KEYS = ("mask_token",)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [h·w, dim] (row-major): the first half of the channels
    encodes the row, the second half the column, each as ``[sin(p·ω), cos(p·ω)]`` with
    ``ω_i = 10000^(−i/(dim/4))`` (the MAE/ViT recipe, computed in float64). Used by the PartFormer and MPAE heads."""
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos):
        angles = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def resize_pos_embed(pos: torch.Tensor, grid_hw, offset: float = 0.0, antialias: bool = False) -> torch.Tensor:
    """A learned position table [n·n, D] of a square n×n patch grid (row-major) → [h·w, D] for an h×w grid, resized
    bicubically (``align_corners`` False, in float32); ``pos`` itself when h = w = n. ``offset`` > 0 resizes by the
    scale factor ``(n + offset) / n`` instead of to the size (DINO / DINOv2 non-reg code). Used by the ViT backbone
    and the PartFormer and MPAE heads."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n, dim = math.isqrt(pos.shape[0]), pos.shape[-1]
    if (h, w) == (n, n):
        return pos
    grid = pos.reshape(1, n, n, dim).permute(0, 3, 1, 2).float()
    kwargs = {"mode": "bicubic", "align_corners": False, "antialias": antialias}
    if offset > 0:
        grid = F.interpolate(grid, scale_factor=((h + offset) / n, (w + offset) / n), **kwargs)
    else:
        grid = F.interpolate(grid, size=(h, w), **kwargs)
    if tuple(grid.shape[-2:]) != (h, w):
        raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(h * w, dim)


class QuickGELU(nn.Module):
    """x·σ(1.702x), the CLIP-style activation of PartFormer/MPAE's descriptor ViT (reference code)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (DINOv2's ``ls1``/``ls2``; key ``…ls1.gamma``)."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (DINO/DINOv2/timm layout) and ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"ViT width {dim} is not divisible by its {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_keys: bool = False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        out = self.proj(out)
        return (out, k.transpose(1, 2).reshape(b, n, d)) if return_keys else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (shared by this backbone and the MPAE/PartFormer heads)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        qkv_bias: bool = True,
        act: str = "gelu",
        layer_scale: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, act)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x, return_keys: bool = False):
        if return_keys:
            a, keys = self.attn(self.norm1(x), return_keys=True)
        else:
            a, keys = self.attn(self.norm1(x)), None
        x = x + self.ls1(a)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return (x, keys) if return_keys else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class DinoViT(Backbone):
    """The ViT of DINO / DINOv2 as a detectron2 backbone (module docstring)."""

    def __init__(
        self,
        *,
        patch_size: int = 14,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_registers: int = 0,
        layer_scale: bool = True,
        pretrain_image_size: int = 518,
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool = False,
        out_features: Sequence[str] = ("vit",),
    ):
        super().__init__()
        bad = [f for f in out_features if f not in VIT_OUTPUTS]
        if bad or not out_features:
            raise ConfigError(
                f"MODEL.VIT.OUT_FEATURES={list(out_features)!r}: use a non-empty subset of {VIT_OUTPUTS}."
            )
        if int(patch_size) < 1 or int(depth) < 1 or int(pretrain_image_size) < int(patch_size):
            raise ConfigError(
                f"MODEL.VIT: PATCH_SIZE={patch_size}, DEPTH={depth}, PRETRAIN_IMAGE_SIZE={pretrain_image_size} "
                "must be positive with PRETRAIN_IMAGE_SIZE ≥ PATCH_SIZE."
            )
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_registers = int(num_registers)
        self.pretrain_grid = int(pretrain_image_size) // self.patch_size
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self._out_features = list(out_features)

        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, self.embed_dim))
        if self.num_registers > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, self.num_registers, self.embed_dim))
        mlp_dim = int(self.embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            ViTBlock(self.embed_dim, int(num_heads), mlp_dim, layer_scale=layer_scale) for _ in range(int(depth))
        )
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_registers > 0:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def size_divisibility(self) -> int:
        return self.patch_size  # inputs are padded to whole patches

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self.embed_dim, stride=self.patch_size) for f in self._out_features}

    def interpolate_pos_embed(self, grid_hw) -> torch.Tensor:
        """Position embedding [1, 1 + h·w, D] for an h×w patch grid: the patch part bicubically resized.

        ``interpolate_offset`` > 0 reproduces DINO / DINOv2 (non-reg) resizing by the scale factor
        ``(n + offset) / N`` instead of to the size n (DINOv2 reg models: offset 0, antialias on).
        """
        n = self.pretrain_grid
        if (int(grid_hw[0]), int(grid_hw[1])) == (n, n):
            return self.pos_embed
        patch_pos = resize_pos_embed(
            self.pos_embed[0, 1:], grid_hw, self.interpolate_offset, self.interpolate_antialias
        )
        return torch.cat([self.pos_embed[:, :1], patch_pos[None]], dim=1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        b = x.shape[0]
        patches = self.patch_embed(x)
        h, w = patches.shape[-2:]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.interpolate_pos_embed((h, w))
        if self.num_registers > 0:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        want_keys = "vit_keys" in self._out_features
        keys = None
        for i, blk in enumerate(self.blocks):
            if want_keys and i == len(self.blocks) - 1:
                tokens, keys = blk(tokens, return_keys=True)
            else:
                tokens = blk(tokens)
        start = 1 + self.num_registers

        def as_map(t):
            return t[:, start:].transpose(1, 2).reshape(b, self.embed_dim, h, w)

        out = {}
        if "vit" in self._out_features:
            out["vit"] = as_map(self.norm(tokens))
        if want_keys:
            out["vit_keys"] = as_map(keys)
        return out


def _unwrap_checkpoint(state) -> Dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict from a DINO/DINOv2 file (pretrain state dict or training checkpoint)."""
    if isinstance(state, dict):
        for key in ("teacher", "model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{_WEIGHTS_KEY}: the file does not hold a state dict of tensors.")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state if not k.startswith("head.")):
            state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _layout_hint(unexpected, missing) -> str:
    """Why the layouts differ, for the error message."""
    hints = []
    if any(".ls1." in k for k in unexpected):
        hints.append("the file has LayerScale (DINOv2): set MODEL.VIT.LAYER_SCALE True")
    if any(".ls1." in k for k in missing):
        hints.append("the file has no LayerScale (DINO v1): set MODEL.VIT.LAYER_SCALE False")
    if "register_tokens" in unexpected or "register_tokens" in missing:
        hints.append("MODEL.VIT.NUM_REGISTERS must match the file's register_tokens (0 without)")
    if any(".mlp.w12" in k for k in unexpected):
        hints.append("SwiGLU FFNs (ViT-g) are not supported")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in unexpected):
        hints.append("chunked blocks (blocks.<chunk>.<i>) are not supported; save with block_chunks=0")
    if any(k.startswith("blocks.") for k in unexpected + missing) and not hints:
        hints.append("check MODEL.VIT.DEPTH")
    return ("; " + "; ".join(hints)) if hints else ""


def load_vit_weights(model: DinoViT, path: str) -> None:
    """Fill ``model`` from a DINO / DINOv2 state-dict file, strictly (every tensor present, right shape)."""
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"{_WEIGHTS_KEY}={path!r}: no such file. Give a DINO / DINOv2 backbone state dict, e.g. "
            "dinov2_vitb14_reg4_pretrain.pth or dino_deitsmall8_pretrain.pth (nothing is downloaded)."
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, pickled model, not a torch file
        raise ConfigError(f"{_WEIGHTS_KEY}={path!r} cannot be read as a state dict: {e}") from e
    state = _unwrap_checkpoint(raw)
    state = {k: v for k, v in state.items() if k not in _UNUSED_KEYS and not k.startswith("head.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:

        def show(keys):
            return f"{keys[:5]}{' …' if len(keys) > 5 else ''}"

        raise ConfigError(
            f"{_WEIGHTS_KEY}={path!r} does not match the configured ViT: missing {show(missing)}, unexpected "
            f"{show(unexpected)}{_layout_hint(unexpected, missing)}."
        )
    bad = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ConfigError(
            f"{_WEIGHTS_KEY}={path!r}: tensors with the wrong shape for MODEL.VIT (PATCH_SIZE, EMBED_DIM, "
            f"PRETRAIN_IMAGE_SIZE, NUM_REGISTERS): {bad[:4]}."
        )
    model.load_state_dict(state, strict=True)
    logger.info("ViT backbone: %d tensors loaded from %s", len(own), path)


@BACKBONE_REGISTRY.register()
def build_dino_vit_backbone(cfg, input_shape: ShapeSpec):
    """``MODEL.VIT`` → :class:`DinoViT`, filled from ``MODEL.VIT.WEIGHTS`` ("" = random init, with a warning)."""
    v = cfg.MODEL.VIT
    model = DinoViT(
        patch_size=v.PATCH_SIZE,
        embed_dim=v.EMBED_DIM,
        depth=v.DEPTH,
        num_heads=v.NUM_HEADS,
        mlp_ratio=v.MLP_RATIO,
        num_registers=v.NUM_REGISTERS,
        layer_scale=v.LAYER_SCALE,
        pretrain_image_size=v.PRETRAIN_IMAGE_SIZE,
        interpolate_offset=v.INTERPOLATE_OFFSET,
        interpolate_antialias=v.INTERPOLATE_ANTIALIAS,
        out_features=v.OUT_FEATURES,
    )
    if v.WEIGHTS:
        load_vit_weights(model, v.WEIGHTS)
    else:
        logger.warning(
            "%s is empty: the ViT backbone is randomly initialised (only useful for tests); give a DINO / DINOv2 "
            "state dict for meaningful features.",
            _WEIGHTS_KEY,
        )
    return model
