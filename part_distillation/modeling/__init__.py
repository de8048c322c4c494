"""Models: backbones, meta-architectures and the operators they need (registration on import)."""

from . import backbone, meta_arch  # noqa: F401
from . import part_heads  # noqa: F401
