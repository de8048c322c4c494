"""Registry of dataset mappers, selected by ``INPUT.DATASET_MAPPER_NAME``.

A mapper turns a dataset dict into the model's input (augmented image tensor plus targets). Models never
build targets themselves; mappers do. Each registered class is ``@configurable`` with
``from_config(cls, cfg, is_train)``.
"""

from detectron2.utils.registry import Registry

from ...utils.errors import ConfigError

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers. The registered object is called as ``cls(cfg, is_train)`` and must
return a callable that maps one dataset dict to one model input dict (or None to drop it).
"""


def build_dataset_mapper(cfg, is_train: bool):
    """Build the mapper named by ``INPUT.DATASET_MAPPER_NAME`` (or ``INPUT.TEST_DATASET_MAPPER_NAME``)."""
    if not is_train and cfg.INPUT.TEST_DATASET_MAPPER_NAME:
        key, name = "INPUT.TEST_DATASET_MAPPER_NAME", cfg.INPUT.TEST_DATASET_MAPPER_NAME
    else:
        key, name = "INPUT.DATASET_MAPPER_NAME", cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPER_REGISTRY:
        known = ", ".join(sorted(k for k, _ in DATASET_MAPPER_REGISTRY))
        raise ConfigError(f"{key}={name!r} is not a registered dataset mapper; use one of: {known}.")
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train)
