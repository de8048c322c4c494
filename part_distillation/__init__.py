"""part_distillation: learning part segmentation without part labels, on Detectron2 + Mask2Former.

Importing the package registers its datasets (lazily: nothing is read), mappers, backbones,
meta-architectures and evaluators. No file or network I/O happens at import time.
"""

from .config import add_part_distillation_config  # noqa: F401
from . import data, modeling, evaluation  # noqa: F401

__version__ = "0.1.0"
