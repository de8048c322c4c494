"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""
from .mask2former import Mask2Former  # noqa: F401
