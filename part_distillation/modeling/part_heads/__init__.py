"""Part-discovery heads for the PartDiscovery meta-architecture (registration on import)."""

from .registry import PART_HEAD_REGISTRY, DiscoveryBatch, PartHead, build_part_head  # noqa: F401
from .baselines import DFFHead, KMeansBaselineHead  # noqa: F401
