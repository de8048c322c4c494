"""A parameter-free "backbone" whose features are the normalised pixels, average-pooled per stride.

It is the raw-RGB baseline of pixel grouping (and of the discovery evaluations): the same K-means,
CRF and evaluation as with a learned backbone, but clustering colours instead of learned features.
"""

import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY

__all__ = ["RawRGBBackbone", "build_raw_rgb_backbone"]

_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class RawRGBBackbone(Backbone):
    def __init__(self, out_features=("res2", "res3", "res4", "res5")):
        super().__init__()
        unknown = set(out_features) - set(_STRIDES)
        if unknown:
            raise ValueError(f"RawRGBBackbone: unknown out_features {sorted(unknown)}; use {sorted(_STRIDES)}")
        self._out_features = list(out_features)

    def forward(self, x):
        return {f: F.avg_pool2d(x, _STRIDES[f], ceil_mode=True) for f in self._out_features}

    def output_shape(self):
        return {f: ShapeSpec(channels=3, stride=_STRIDES[f]) for f in self._out_features}

    @property
    def size_divisibility(self):
        return 32


@BACKBONE_REGISTRY.register()
def build_raw_rgb_backbone(cfg, input_shape):
    return RawRGBBackbone()  # every level; PIXEL_GROUPING.FEATURE_LEVELS picks what is used
