"""``PART_HEAD_REGISTRY`` and :func:`build_part_head`: how ``MODEL.PART_DISCOVERY.HEAD`` becomes a head.

The head contract (:class:`~part_distillation.modeling.part_heads.base.PartHead`) is in ``base.py``.
"""

from typing import Dict

from detectron2.utils.registry import Registry

from ...utils.errors import ConfigError

__all__ = ["PART_HEAD_REGISTRY", "build_part_head"]

PART_HEAD_REGISTRY = Registry("PART_HEAD")
PART_HEAD_REGISTRY.__doc__ = """
Registry of part-discovery heads used by the ``PartDiscovery`` meta-architecture.

A registered object is a :class:`~part_distillation.modeling.part_heads.base.PartHead` subclass built as
``cls(cfg, input_shape)`` (``@configurable`` ``from_config(cfg, input_shape)``), where ``input_shape`` is the
backbone's ``output_shape()``. The head is selected by ``MODEL.PART_DISCOVERY.HEAD``.
"""


def build_part_head(cfg, input_shape: Dict):
    """The head named by ``MODEL.PART_DISCOVERY.HEAD``, built from ``cfg`` and the backbone's output shape."""
    name = cfg.MODEL.PART_DISCOVERY.HEAD
    if name not in PART_HEAD_REGISTRY:
        known = ", ".join(sorted(k for k, _ in PART_HEAD_REGISTRY)) or "(none registered)"
        raise ConfigError(f"MODEL.PART_DISCOVERY.HEAD={name!r} is not registered; use one of: {known}.")
    return PART_HEAD_REGISTRY.get(name)(cfg, input_shape)
