"""Choudhury et al. (NeurIPS 2021), "Unsupervised part discovery from contrastive reconstruction"
(reference code: subhc/unsup-parts).

The segmenter f is the backbone hosted by :class:`PartDiscovery` (trained: ``FREEZE_BACKBONE False``) plus
this head's "2-branch" ASPP classifier: the second half of the channels of the read features (the
reference's DeepLab-v2 R50 splits its 2048 ``layer4`` channels) goes through four parallel 3×3
convolutions with dilations 6/12/18/24 whose outputs are summed into K part logits. There is no background
channel: the background is the given fg mask (``external_background``).

Training (:meth:`Choudhury21Head.losses`), per batch of view-1 images I with fg masks m:

* P = softmax of the logits of cj1, a colour-jittered copy of I (see L_e), bilinearly upsampled to the image
  (``align_corners=True``, as the reference); the targets (φ, Lab) come from the un-jittered I. With
  ``LOSSES_ON_JITTERED False`` P is computed on the un-jittered I (the meta-architecture's ``features``) and
  the L_e target from a third, gradient-free pass on cj1;
* φ = the frozen perceptual network's taps (``PERCEPTUAL.LAYERS`` × ``LAYER_WEIGHTS``: VGG19 relu3_2 × 0.33
  and relu5_4 × 1, or the EfficientNet-Lite0 stand-in) upsampled to the image and concatenated, no grad;
* L_f = Σ_batch part_consistency(P, φ, m); L_v = mean_batch part_consistency(P, Lab(I), m);
  L_c = contrastive loss of the part descriptors of φ (τ = 0.19, positives from a random other image);
* L_e: two independent colour-jittered copies cj1, cj2 of I (brightness/contrast 0.3, saturation/hue 0.2
  with p = 0.8, then grayscale with p = 0.2; torchvision's ColorJitter semantics, written in torch, on the
  GPU) and a random warp T; target = T(logits(cj1)) (the same forward pass as P, detached, warped before
  the softmax), prediction =
  logits(T(cj2)), weighted by T(m). T is a thin-plate spline through a 5×5 control grid jittered by
  U(±σ), σ = 0.01, composed with a random similarity: rotation U(±60°), zoom U[0.7, 2.0] (its inverse
  ``U(1/2, 1/0.7)`` scales the target → source grid), translation U(±0.1) (normalised coordinates); sampled
  with ``grid_sample`` (bilinear, zero padding; the image is warped after normalisation, so the padding is
  the mean colour as in the reference). ``TPS_SIGMA = 0`` gives the pure similarity.
* ``L = λe·L_e + λf·L_f + λv·L_v + λc·L_c`` (5.7e3, 5, 30, 2.3e3), returned as separate weighted entries.

All random draws (jitter, warp, positives) come from the head's own ``torch.Generator`` (``SEED`` + rank),
so a run is reproducible whatever else consumes the global RNG.

Inference: logits → bilinear upsampling to the padded input → softmax over K, returned as [B, K+1, H, W]
with channel 0 = 0; the meta-architecture turns it into ``[1 − m, m·P]`` with the input's ``fg_mask``
(without a mask every pixel is a part).
"""

import logging
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn

import detectron2.projects.deeplab  # noqa: F401  (registers build_resnet_deeplab_backbone: DeepLab-style dilated ResNets)

from ...structures.geometry import random_warp_grid, sample_at
from ...utils.errors import ConfigError
from ..losses.contrastive_reconstruction import (
    contrastive_loss,
    equivariance_loss,
    part_consistency_loss,
    part_descriptors,
    rgb_to_lab,
    sample_positives,
)
from ..losses.perceptual import PerceptualNetwork, build_perceptual_network, imagenet_normalize
from .base import DiscoveryBatch, PartHead
from .registry import PART_HEAD_REGISTRY

__all__ = ["Choudhury21Head", "ASPPClassifier", "color_jitter", "random_warp_grid", "rgb_to_hsv", "hsv_to_rgb"]

logger = logging.getLogger(__name__)

_KL_MODES = ("forward", "symmetric")
_NEGATIVES = ("all_images", "other_images")


class ASPPClassifier(nn.Module):
    """DeepLab-v2's classifier: parallel dilated 3×3 convolutions (padding = dilation), outputs summed.

    Weights ~ N(0, ``init_std``) (reference: 0.01); biases keep PyTorch's default initialisation.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24), init_std=0.01):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=int(d), dilation=int(d), bias=True) for d in dilations
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0.0, float(init_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


# ------------------------------------------------------------------------------------------------
# Photometric views (torchvision ColorJitter + RandomGrayscale semantics, batched on the device)
# ------------------------------------------------------------------------------------------------
def _gray(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, [..., 3, H, W] → [..., 1, H, W] (torchvision's rgb_to_grayscale)."""
    r, g, b = rgb.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → HSV in [0, 1] (hue as a fraction of the circle), channels at dim −3."""
    r, g, b = rgb.unbind(-3)
    maxc, _ = rgb.max(-3)
    minc, _ = rgb.min(-3)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(-3)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    # sector i → (r, g, b) from (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], dim=-3)  # [.., 18, H, W]
    table = table.unflatten(-3, (3, 6))  # [.., 3 (rgb), 6 (sector), H, W]
    index = i[..., None, None, :, :].expand(*table.shape[:-3], 1, *table.shape[-2:])
    return table.gather(-3, index).squeeze(-3)


def color_jitter(
    rgb: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.2,
    hue: float = 0.2,
    p: float = 0.8,
    grayscale_p: float = 0.2,
) -> torch.Tensor:
    """One photometric view of RGB images [B, 3, H, W] in [0, 1], independently per image.

    With probability ``p``: brightness, contrast, saturation (factors ~ U[1 − x, 1 + x]) and hue (shift ~
    U[−hue, hue] of the circle) in a random order, clamping to [0, 1] after each (torchvision's ColorJitter);
    then grayscale with probability ``grayscale_p`` (RandomGrayscale). Contrast blends with the image's mean
    luma, saturation with the per-pixel luma.
    """
    b = rgb.shape[0]
    u = torch.rand(b, 6, generator=generator)
    order = torch.rand(b, 4, generator=generator).argsort(-1)
    factors = torch.stack(
        [
            1 + (2 * u[:, 0] - 1) * brightness,
            1 + (2 * u[:, 1] - 1) * contrast,
            1 + (2 * u[:, 2] - 1) * saturation,
            (2 * u[:, 3] - 1) * hue,
        ],
        dim=1,
    ).tolist()
    apply, gray = (u[:, 4] < p).tolist(), (u[:, 5] < grayscale_p).tolist()
    out = []
    for i in range(b):
        x = rgb[i]
        if apply[i]:
            for op in order[i].tolist():
                f = factors[i][op]
                if op == 0:
                    x = (x * f).clamp(0, 1)
                elif op == 1:
                    x = (f * x + (1 - f) * _gray(x).mean()).clamp(0, 1)
                elif op == 2:
                    x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
                elif f != 0:
                    hsv = rgb_to_hsv(x)
                    x = hsv_to_rgb(torch.cat([(hsv[:1] + f) % 1.0, hsv[1:]])).clamp(0, 1)
        if gray[i]:
            x = _gray(x).expand(3, -1, -1)
        out.append(x)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# The head
# ------------------------------------------------------------------------------------------------
@PART_HEAD_REGISTRY.register()
class Choudhury21Head(PartHead):
    """Contrastive-reconstruction part discovery (Choudhury et al. 2021; module docstring)."""

    external_background = True

    @configurable
    def __init__(
        self,
        *,
        num_parts: int,
        feature_levels,
        input_shape: Optional[Dict] = None,
        in_channels: Optional[int] = None,
        perceptual: Union[PerceptualNetwork, Callable[[], PerceptualNetwork], None] = None,
        perceptual_scales: Sequence[float] = (0.33, 1.0),
        pixel_mean: Sequence[float] = (127.0, 127.0, 127.0),
        pixel_std: Sequence[float] = (128.0, 128.0, 128.0),
        two_branch: bool = True,
        dilations: Sequence[int] = (6, 12, 18, 24),
        init_std: float = 0.01,
        lambda_eqv: float = 5.7e3,
        lambda_feat: float = 5.0,
        lambda_visual: float = 30.0,
        lambda_contrastive: float = 2.3e3,
        temperature: float = 0.19,
        negatives: str = "all_images",
        kl_mode: str = "forward",
        use_lab: bool = True,
        rotation: float = 60.0,
        zoom: Sequence[float] = (0.7, 2.0),
        translation: float = 0.1,
        tps_sigma: float = 0.01,
        tps_grid: int = 5,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.2,
        hue: float = 0.2,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        seed: int = 0,
        losses_on_jittered: bool = True,
    ):
        """
        Args:
            in_channels: channels of the concatenated ``feature_levels`` (default: from ``input_shape``).
            perceptual: φ, or a function building it on first use (so evaluation never loads VGG19); None
                only when λf = λc = 0.
            perceptual_scales: factor of each φ tap (Choudhury et al. 2021 appendix §2: 0.33, 1).
            pixel_mean, pixel_std: the meta-architecture's normalisation (``MODEL.PIXEL_MEAN/STD``), applied
                to the colour-jittered views before the backbone.
            two_branch: feed the second half of the channels to the classifier (the reference's 2-branch
                DeepLab); False: all channels.
            negatives: "all_images" (code: z_j of every image, the anchor's included) or "other_images"
                (paper eq. 3).
            kl_mode: "forward" (code: KL(T(f(I)) ‖ f(T(I))), target detached) or "symmetric" (paper eq. 5,
                no stop-gradient).
            use_lab: L_v on CIE-Lab (reference ``use_lab: true``) instead of RGB in [0, 1].
            losses_on_jittered: L_f, L_v, L_c on the prediction of the colour-jittered copy cj1, whose
                detached warp is also the L_e target (two segmenter passes per step, as the method); False:
                on the un-jittered image (three passes).
            Others: see the module docstring and ``MODEL.PART_DISCOVERY.CHOUDHURY21``.
        """
        super().__init__(num_parts=num_parts, feature_levels=feature_levels, input_shape=input_shape)
        if negatives not in _NEGATIVES:
            raise ConfigError(f"MODEL.PART_DISCOVERY.CHOUDHURY21.NEGATIVES={negatives!r}: use one of {_NEGATIVES}.")
        if kl_mode not in _KL_MODES:
            raise ConfigError(f"MODEL.PART_DISCOVERY.CHOUDHURY21.KL_MODE={kl_mode!r}: use one of {_KL_MODES}.")
        if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.CHOUDHURY21.ZOOM={list(zoom)!r}: give [low, high], 0 < low ≤ high."
            )
        lambdas = (lambda_eqv, lambda_feat, lambda_visual, lambda_contrastive)
        if min(lambdas) < 0 or max(lambdas) <= 0:
            raise ConfigError("MODEL.PART_DISCOVERY.CHOUDHURY21.LAMBDA_*: all ≥ 0 and at least one > 0.")
        self.in_channels = self.levels_channels(input_shape, in_channels)
        self.two_branch = bool(two_branch)
        branch = self.in_channels - self.in_channels // 2 if self.two_branch else self.in_channels
        self.classifier = ASPPClassifier(branch, self.num_parts, dilations, init_std)
        self._perceptual = (perceptual,)  # a tuple hides φ from state_dict/parameters/DDP (weights come from its file)
        self.perceptual_scales = [float(s) for s in perceptual_scales]
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.lambdas = dict(zip(("eqv", "feat", "visual", "contrastive"), map(float, lambdas)))
        self.temperature = float(temperature)
        self.own_image_negatives = negatives == "all_images"
        self.symmetric_kl = kl_mode == "symmetric"
        self.use_lab = bool(use_lab)
        self.warp_args = dict(
            rotation=float(rotation),
            zoom=(float(zoom[0]), float(zoom[1])),
            translation=float(translation),
            tps_sigma=float(tps_sigma),
            tps_grid=int(tps_grid),
        )
        self.jitter_args = dict(
            brightness=float(brightness),
            contrast=float(contrast),
            saturation=float(saturation),
            hue=float(hue),
            p=float(jitter_prob),
            grayscale_p=float(grayscale_prob),
        )
        self.generator = torch.Generator().manual_seed(int(seed) + comm.get_rank())
        self.losses_on_jittered = bool(losses_on_jittered)

    @classmethod
    def from_config(cls, cfg, input_shape):
        pd = cfg.MODEL.PART_DISCOVERY
        c = pd.CHOUDHURY21
        scales = list(pd.PERCEPTUAL.LAYER_WEIGHTS)
        if len(scales) != len(pd.PERCEPTUAL.LAYERS):
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PERCEPTUAL.LAYER_WEIGHTS has {len(scales)} values for "
                f"{len(pd.PERCEPTUAL.LAYERS)} LAYERS."
            )
        frozen = cfg.clone()
        return {
            **cls.common_args(cfg, input_shape),
            "perceptual": lambda: build_perceptual_network(frozen),
            "perceptual_scales": scales,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "two_branch": c.TWO_BRANCH,
            "dilations": c.ASPP_DILATIONS,
            "init_std": c.INIT_STD,
            "lambda_eqv": c.LAMBDA_EQV,
            "lambda_feat": c.LAMBDA_FEAT,
            "lambda_visual": c.LAMBDA_VISUAL,
            "lambda_contrastive": c.LAMBDA_CONTRASTIVE,
            "temperature": c.TEMPERATURE,
            "negatives": c.NEGATIVES,
            "kl_mode": c.KL_MODE,
            "use_lab": c.USE_LAB,
            "rotation": c.ROTATION,
            "zoom": c.ZOOM,
            "translation": c.TRANSLATION,
            "tps_sigma": c.TPS_SIGMA,
            "tps_grid": c.TPS_GRID,
            "brightness": c.BRIGHTNESS,
            "contrast": c.CONTRAST,
            "saturation": c.SATURATION,
            "hue": c.HUE,
            "jitter_prob": c.JITTER_PROB,
            "grayscale_prob": c.GRAYSCALE_PROB,
            "seed": c.SEED,
            "losses_on_jittered": c.LOSSES_ON_JITTERED,
        }

    # ------------------------------------------------------------------ pieces
    @property
    def perceptual(self) -> PerceptualNetwork:
        net = self._perceptual[0]
        if net is None:
            raise ConfigError(
                "Choudhury21Head: λf or λc > 0 needs a perceptual network (MODEL.PART_DISCOVERY.PERCEPTUAL)."
            )
        if not isinstance(net, nn.Module):
            net = net()
            self._perceptual = (net,)
        return net.to(self.pixel_mean.device)

    def _apply(self, fn, *args, **kwargs):
        if isinstance(self._perceptual[0], nn.Module):
            self._perceptual[0]._apply(fn, *args, **kwargs)  # .to()/.cuda() also move the hidden φ
        return super()._apply(fn, *args, **kwargs)

    def logits(self, features: Dict[str, torch.Tensor], size=None, align_corners: bool = True) -> torch.Tensor:
        """K part logits [B, K, h, w] on the first level's grid, or bilinearly resized to ``size``."""
        x = self.concat_levels(features)
        if self.two_branch:
            x = x[:, x.shape[1] // 2 :]
        out = self.classifier(x)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=align_corners)
        return out

    def _rgb01(self, raw: torch.Tensor, input_format: str) -> torch.Tensor:
        return (raw.flip(1) if input_format == "BGR" else raw) / 255.0

    def _normalize(self, rgb01: torch.Tensor, input_format: str) -> torch.Tensor:
        """RGB in [0, 1] → the backbone's input (``input_format`` order, ``(x − mean) / std``)."""
        x = rgb01 * 255.0
        if input_format == "BGR":
            x = x.flip(1)
        return (x - self.pixel_mean) / self.pixel_std

    @property
    def needs_view1_features(self) -> bool:
        """Whether :meth:`losses` reads the meta-architecture's features of the un-jittered view 1."""
        return not self.losses_on_jittered

    # ------------------------------------------------------------------ training
    def losses(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> Dict[str, torch.Tensor]:
        if batch.input_format not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT={batch.input_format!r}: Choudhury21Head needs 'RGB' or 'BGR'.")
        hw = batch.padded_hw
        b = len(batch)
        fg = batch.fg_masks.float()
        rgb = self._rgb01(batch.raw_images.float(), batch.input_format)
        if self.losses_on_jittered:
            cj1 = self._normalize(color_jitter(rgb, self.generator, **self.jitter_args), batch.input_format)
            logits = self.logits(batch.features_of(cj1), hw)
        else:
            logits = self.logits(features, hw)
        probs = F.softmax(logits.float(), dim=1)
        lam = self.lambdas
        out = {}
        if lam["feat"] > 0 or lam["contrastive"] > 0:
            with torch.no_grad():
                phi = self.perceptual.stacked(
                    imagenet_normalize(batch.raw_images, batch.input_format), hw, self.perceptual_scales
                ).float()
            if lam["feat"] > 0:
                out["loss_feat"] = lam["feat"] * part_consistency_loss(probs, phi, fg).sum()
            if lam["contrastive"] > 0 and b > 1:
                z = part_descriptors(probs, phi, fg)
                positives = sample_positives(b, self.num_parts, self.generator)
                out["loss_contrastive"] = lam["contrastive"] * contrastive_loss(
                    z, positives, self.temperature, self.own_image_negatives
                )
        if lam["visual"] > 0:
            colours = rgb_to_lab(rgb) if self.use_lab else rgb
            out["loss_visual"] = lam["visual"] * part_consistency_loss(probs, colours, fg).mean()
        if lam["eqv"] > 0:
            out["loss_eqv"] = lam["eqv"] * self._equivariance(
                rgb, fg, batch, logits if self.losses_on_jittered else None
            )
        if not out:  # λc only, with a single image
            out["loss_contrastive"] = logits.sum() * 0.0
        return out

    def _equivariance(
        self, rgb: torch.Tensor, fg: torch.Tensor, batch: DiscoveryBatch, logits1: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """L_e; ``logits1``: the segmenter's logits of cj1 when the caller already has them (else a pass on a
        fresh cj1, gradient-free unless ``KL_MODE`` is symmetric)."""
        hw, fmt = batch.padded_hw, batch.input_format
        if logits1 is None:
            cj1 = self._normalize(color_jitter(rgb, self.generator, **self.jitter_args), fmt)
        cj2 = self._normalize(color_jitter(rgb, self.generator, **self.jitter_args), fmt)
        grid = random_warp_grid(len(batch), hw, self.generator, device=rgb.device, **self.warp_args)
        if logits1 is not None:
            target = sample_at(logits1, grid)
        else:
            with torch.set_grad_enabled(self.symmetric_kl and torch.is_grad_enabled()):
                target = sample_at(self.logits(batch.features_of(cj1), hw), grid)
        if not self.symmetric_kl:
            target = target.detach()
        pred = self.logits(batch.features_of(sample_at(cj2, grid)), hw)
        mask = sample_at(fg[:, None], grid)[:, 0]
        return equivariance_loss(pred, target, mask, symmetric=self.symmetric_kl)

    # ------------------------------------------------------------------ inference
    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        """softmax over K of the logits upsampled to the padded input, background channel 0 = 0."""
        probs = F.softmax(self.logits(features, batch.padded_hw, align_corners=False).float(), dim=1)
        return torch.cat([probs.new_zeros(probs.shape[0], 1, *probs.shape[-2:]), probs], dim=1)
