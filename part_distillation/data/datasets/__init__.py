"""Lazy dataset registrations: importing registers names and metadata; nothing is read until used."""

from . import toyparts, toyparts_landmarks  # noqa: F401
from . import part_imagenet, partimagenet_seg, cub, celeba, deepfashion, imagenet  # noqa: F401
from . import pascal_part, panoptic_parts  # noqa: F401
from .part_coco import register_part_coco  # noqa: F401
