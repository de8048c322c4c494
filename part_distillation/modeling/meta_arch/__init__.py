"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""

from .mask2former import Mask2Former  # noqa: F401
from .query_decoder import QueryFeatureTransformerDecoder  # noqa: F401
from .part_mask2former import PartMask2Former  # noqa: F401
from .proposal import ProposalModel  # noqa: F401
from .pixel_grouping import PixelGroupingModel  # noqa: F401
from .discovery import PartDiscovery  # noqa: F401
from .ranking import PartRankingModel  # noqa: F401
from .distillation import PartDistillationModel  # noqa: F401
from .class_grouping import ClassPixelGroupingModel  # noqa: F401
from .supervised import SupervisedPartModel  # noqa: F401
