"""A frozen perceptual feature network and the perceptual (feature-L1) loss of the discovery heads.

Network (``MODEL.PART_DISCOVERY.PERCEPTUAL``):

* **VGG19** when ``VGG19_WEIGHTS`` names a file: torchvision's ``vgg19`` architecture, built with
  ``weights=None`` (no download, ever) and filled from that file (torchvision's state-dict format, e.g.
  ``vgg19-dcbb9e9d.pth``; the ``classifier.*`` tensors are not needed). Taps are named ``reluB_L`` (block B,
  layer L: ``relu3_2``, ``relu5_4``, ...); only the layers up to the deepest tap are kept.
  Defaults: ``relu3_2`` × 0.33 and ``relu5_4`` × 1 (Choudhury et al. 2021 appendix §2). PartFormer and MPAE
  use ``relu1_1 … relu5_1`` with weights (1/32, 1/16, 1/8, 1/4, 1) and 5× those (their reference code).
* Otherwise (``VGG19_WEIGHTS`` = "") the bundled ImageNet **EfficientNet-Lite0**, with a logged warning
  that numbers will differ from the papers'. A ``reluB_*`` tap maps to the EfficientNet output with VGG's
  stride at block B (VGG block B has stride 2^(B−1)): blocks 1–2 → ``stem`` (stride 2: the stem and block
  0), 3 → ``res2`` (4), 4 → ``res3`` (8), 5 → ``res4`` (16). The level names themselves (``stem``,
  ``res2`` … ``res5``) are accepted too.

Both take **ImageNet-normalised RGB** ``[B, 3, H, W]`` (``(x/255 − mean) / std``, as torchvision's VGG and
as PartFormer/MPAE feed their reconstructions and targets); :func:`imagenet_normalize` converts detectron2
pixels (0–255, ``INPUT.FORMAT`` order). The network is frozen (no gradients to its weights, always in
eval mode) but differentiable with respect to its input.

Loss: ``PerceptualLoss(pred_image, target_image) = Σ_l w_l · mean |φ_l(pred) − φ_l(target)|`` — the L1
form of PartFormer's L_rec (PartFormer paper Eq. 7, "Σ_l w_l · mean|VGG_l(Î) − VGG_l(I↓)|") and MPAE's L_r VGG
term (MPAE code); the target's features carry no gradient. The network is held outside the module tree
(moved by ``.to()``, but not in ``state_dict()``, ``parameters()`` or DDP's broadcast): its weights come
from the file, not from checkpoints.
"""

import logging
import os
import re
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ...utils.errors import ConfigError

__all__ = [
    "PerceptualNetwork",
    "VGG19Features",
    "EfficientNetFeatures",
    "PerceptualLoss",
    "build_perceptual_network",
    "imagenet_normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VGG_LAYER = re.compile(r"^relu(\d)_(\d)$")
_WEIGHTS_KEY = "MODEL.PART_DISCOVERY.PERCEPTUAL.VGG19_WEIGHTS"


def imagenet_normalize(pixels: torch.Tensor, input_format: str = "RGB") -> torch.Tensor:
    """detectron2 pixels [B, 3, H, W] (0–255, ``input_format`` channel order) → ImageNet-normalised RGB."""
    if input_format == "BGR":
        pixels = pixels.flip(1)
    elif input_format != "RGB":
        raise ConfigError(f"INPUT.FORMAT={input_format!r}: the perceptual network needs 'RGB' or 'BGR' images.")
    mean = pixels.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = pixels.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (pixels / 255.0 - mean) / std


class PerceptualNetwork(nn.Module):
    """Frozen feature extractor: ``forward(x) -> {tap name: features}`` for ImageNet-normalised RGB x."""

    def __init__(self, layers: Sequence[str]):
        super().__init__()
        if not layers:
            raise ConfigError("MODEL.PART_DISCOVERY.PERCEPTUAL.LAYERS is empty; name at least one tap (e.g. relu5_4).")
        self.layers = list(layers)

    def _freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def stacked(self, x: torch.Tensor, size, scales: Sequence[float]) -> torch.Tensor:
        """Taps × ``scales``, bilinearly resized to ``size`` (align_corners=True) and concatenated along
        channels: Choudhury et al.'s φ (their appendix §2: relu3_2 × 0.33 ⊕ relu5_4 × 1 → 768 × 256²)."""
        feats = self(x)
        return torch.cat(
            [
                F.interpolate(feats[n], size=tuple(size), mode="bilinear", align_corners=True) * s
                for n, s in zip(self.layers, scales)
            ],
            dim=1,
        )


def _vgg_layer_names(features: nn.Sequential) -> Dict[str, int]:
    """``reluB_L`` → index in torchvision's ``vgg.features``, by walking the modules (pools start blocks)."""
    names, block, conv = {}, 1, 0
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            conv += 1
        elif isinstance(m, nn.ReLU):
            names[f"relu{block}_{conv}"] = i
    return names


class VGG19Features(PerceptualNetwork):
    """torchvision VGG19 ``features`` up to the deepest tap, loaded from ``weights_path`` (never downloaded)."""

    def __init__(self, weights_path: str, layers: Sequence[str] = ("relu3_2", "relu5_4")):
        super().__init__(layers)
        import torchvision

        if not weights_path or not os.path.isfile(weights_path):
            raise ConfigError(
                f"{_WEIGHTS_KEY}={weights_path!r}: no such file. Give the path of torchvision's VGG19 ImageNet "
                "weights (vgg19-dcbb9e9d.pth, a state dict), or '' for the bundled EfficientNet-Lite0 stand-in."
            )
        with torch.device("meta"):  # architecture only: no random init, no download
            vgg = torchvision.models.vgg19(weights=None)
        index = _vgg_layer_names(vgg.features)
        unknown = [n for n in self.layers if n not in index]
        if unknown:
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PERCEPTUAL.LAYERS has {unknown}, not VGG19 taps; use relu1_1 … relu5_4 "
                f"({', '.join(index)})."
            )
        self.taps = {index[n]: n for n in self.layers}
        self.features = vgg.features[: max(self.taps) + 1].to_empty(device="cpu")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickled model, a truncated download, not a torch file at all
            raise ConfigError(f"{_WEIGHTS_KEY}={weights_path!r} cannot be read as a state dict: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"{_WEIGHTS_KEY}={weights_path!r} holds a {type(state).__name__}, not a state dict.")
        wanted = {k: v for k, v in self.features.state_dict().items()}
        missing = [f"features.{k}" for k in wanted if f"features.{k}" not in state]
        if missing:
            raise ConfigError(
                f"{_WEIGHTS_KEY}={weights_path!r} is not a torchvision VGG19 state dict: missing {missing[:4]}"
                f"{' …' if len(missing) > 4 else ''}."
            )
        bad = [k for k, v in wanted.items() if tuple(state[f"features.{k}"].shape) != tuple(v.shape)]
        if bad:
            raise ConfigError(f"{_WEIGHTS_KEY}={weights_path!r}: tensors {bad[:4]} have the wrong shape for VGG19.")
        self.features.load_state_dict({k: state[f"features.{k}"] for k in wanted}, strict=True)
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # taps must not be overwritten; autograd needs them intact
        self._freeze()
        logger.info("Perceptual network: VGG19 from %s, taps %s", weights_path, self.layers)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self.taps:
                out[self.taps[i]] = x
        return out


_EFFNET_LEVELS = ("stem", "res2", "res3", "res4", "res5")
_VGG_BLOCK_TO_LEVEL = {1: "stem", 2: "stem", 3: "res2", 4: "res3", 5: "res4"}


class EfficientNetFeatures(PerceptualNetwork):
    """The bundled ImageNet EfficientNet-Lite0 as a stand-in perceptual network (see the module docstring)."""

    def __init__(self, layers: Sequence[str] = ("relu3_2", "relu5_4"), weights: str = ""):
        super().__init__(layers)
        from ..backbone.efficientnet_lite import STAGE_BLOCKS, EfficientNetLite0

        self.level_of = {}
        for name in self.layers:
            match = _VGG_LAYER.match(name)
            if name in _EFFNET_LEVELS:
                self.level_of[name] = name
            elif match and int(match.group(1)) in _VGG_BLOCK_TO_LEVEL:
                self.level_of[name] = _VGG_BLOCK_TO_LEVEL[int(match.group(1))]
            else:
                raise ConfigError(
                    f"MODEL.PART_DISCOVERY.PERCEPTUAL.LAYERS has {name!r}; use VGG taps reluB_L (B = 1..5) or "
                    f"EfficientNet levels {_EFFNET_LEVELS}."
                )
        self.net = EfficientNetLite0(out_features=("res2", "res3", "res4", "res5"), norm="FrozenBN", weights=weights)
        self._last_block = {lvl: STAGE_BLOCKS[lvl][-1] for lvl in _EFFNET_LEVELS}
        self._depth = max(self._last_block[lvl] for lvl in self.level_of.values()) + 1
        self._freeze()
        logger.warning(
            "Perceptual network: %s is empty, using the bundled EfficientNet-Lite0 (taps %s) instead of VGG19; "
            "losses and results will differ from the papers'.",
            _WEIGHTS_KEY,
            ", ".join(f"{k}→{v}" for k, v in self.level_of.items()),
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # ImageNet-normalised RGB → the (x − 127) / 128 the Lite0 weights expect
        mean = x.new_tensor(IMAGENET_MEAN)[None, :, None, None]
        std = x.new_tensor(IMAGENET_STD)[None, :, None, None]
        x = ((x * std + mean) * 255.0 - 127.0) / 128.0
        x = self.net._stem(x)
        levels = {}
        for i in range(self._depth):
            x = self.net._blocks[i](x)
            for lvl, last in self._last_block.items():
                if last == i:
                    levels[lvl] = x
        return {name: levels[lvl] for name, lvl in self.level_of.items()}


def build_perceptual_network(cfg) -> PerceptualNetwork:
    """VGG19 from ``PERCEPTUAL.VGG19_WEIGHTS``, or the bundled EfficientNet-Lite0 when it is empty."""
    p = cfg.MODEL.PART_DISCOVERY.PERCEPTUAL
    if p.VGG19_WEIGHTS:
        return VGG19Features(p.VGG19_WEIGHTS, p.LAYERS)
    return EfficientNetFeatures(p.LAYERS)


class PerceptualLoss(nn.Module):
    """``Σ_l w_l · mean |φ_l(pred) − φ_l(target)|`` (PartFormer Eq. 7, MPAE), φ frozen and kept out of checkpoints.

    ``distance="l2"`` uses the mean squared difference instead (not used by the three papers).
    """

    @configurable
    def __init__(self, *, network: PerceptualNetwork, layer_weights: Sequence[float], distance: str = "l1"):
        super().__init__()
        if len(layer_weights) != len(network.layers):
            raise ConfigError(
                f"MODEL.PART_DISCOVERY.PERCEPTUAL.LAYER_WEIGHTS has {len(layer_weights)} values for "
                f"{len(network.layers)} LAYERS {network.layers}."
            )
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance={distance!r}: use 'l1' or 'l2'.")
        self._network = (network,)  # a tuple hides it from the module tree (state_dict, parameters, DDP)
        self.layer_weights = [float(w) for w in layer_weights]
        self.distance = distance

    @classmethod
    def from_config(cls, cfg):
        return {
            "network": build_perceptual_network(cfg),
            "layer_weights": cfg.MODEL.PART_DISCOVERY.PERCEPTUAL.LAYER_WEIGHTS,
        }

    @property
    def network(self) -> PerceptualNetwork:
        return self._network[0]

    def _apply(self, fn, *args, **kwargs):
        self.network._apply(fn, *args, **kwargs)  # .to()/.cuda()/.half() also move the hidden network
        return super()._apply(fn, *args, **kwargs)

    def forward(self, pred_image: torch.Tensor, target_image: torch.Tensor) -> torch.Tensor:
        if pred_image.shape != target_image.shape:
            raise ValueError(f"pred {tuple(pred_image.shape)} and target {tuple(target_image.shape)} differ in shape.")
        net = self.network
        pred = net(pred_image)
        with torch.no_grad():
            target = net(target_image)
        total = pred_image.new_zeros(())
        for name, w in zip(net.layers, self.layer_weights):
            diff = pred[name] - target[name]
            total = total + w * (diff.abs().mean() if self.distance == "l1" else diff.pow(2).mean())
        return total
