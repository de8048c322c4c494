"""Part-discovery heads for the PartDiscovery meta-architecture (registration on import)."""

from .base import DiscoveryBatch, PartHead  # noqa: F401
from .registry import PART_HEAD_REGISTRY, build_part_head  # noqa: F401
from .baselines import DFFHead, KMeansBaselineHead  # noqa: F401
from .partformer import PartFormerHead  # noqa: F401
from .mpae import MPAEHead  # noqa: F401
from .choudhury21 import Choudhury21Head  # noqa: F401
