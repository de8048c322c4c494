"""Dataset mappers (registered in DATASET_MAPPER_REGISTRY)."""

from .registry import DATASET_MAPPER_REGISTRY, build_dataset_mapper  # noqa: F401
from .instance_lsj import InstanceLSJDatasetMapper  # noqa: F401
from .keypoints import KeypointDatasetMapper  # noqa: F401
from .paired_view import PairedViewDatasetMapper  # noqa: F401
from .pixel_grouping import PixelGroupingDatasetMapper  # noqa: F401
from .pseudo_label_mapper import PseudoLabelDatasetMapper  # noqa: F401
from .part_eval import PartEvalDatasetMapper  # noqa: F401
from .part_supervised import PartSupervisedDatasetMapper  # noqa: F401
