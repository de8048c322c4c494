"""Detectron2 backbones of part_distillation (EfficientNet-Lite0)."""
from .efficientnet_lite import EfficientNetLite0, build_efficientnet_lite0_backbone, load_efficientnet_lite0_weights  # noqa: F401
