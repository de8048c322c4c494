"""Dataset mappers (registered in DATASET_MAPPER_REGISTRY)."""
from .registry import DATASET_MAPPER_REGISTRY, build_dataset_mapper  # noqa: F401
from .instance_lsj import InstanceLSJDatasetMapper  # noqa: F401
