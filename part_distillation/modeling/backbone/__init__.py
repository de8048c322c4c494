"""Detectron2 backbones of part_distillation (EfficientNet-Lite0, and the raw-RGB baseline)."""

from .efficientnet_lite import EfficientNetLite0, build_efficientnet_lite0_backbone, load_efficientnet_lite0_weights  # noqa: F401
from .raw_rgb import RawRGBBackbone, build_raw_rgb_backbone  # noqa: F401
from .vit import DinoViT, build_dino_vit_backbone, load_vit_weights  # noqa: F401
