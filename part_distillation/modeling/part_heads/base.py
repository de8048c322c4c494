"""The part-discovery head base: :class:`PartHead` and the :class:`DiscoveryBatch` it sees (the registry and its
build function are in ``registry.py``).

A head is what distinguishes one unsupervised part-discovery method from another (Choudhury et al. 2021,
PartFormer, MPAE, the K-means and DFF baselines). Everything
else is shared and lives in :class:`~part_distillation.modeling.meta_arch.discovery.PartDiscovery`:
pixel normalisation, padding, the detectron2 backbone (optionally frozen), fg masks, resizing the part
maps to the input's resolution, the canonical label layout and the training/inference switch.

Contract of a head (``MODEL.PART_DISCOVERY.HEAD`` names its class in the registry):

* ``from_config(cfg, input_shape)`` (``@configurable``): ``input_shape`` is the backbone's
  ``output_shape()``.
* ``losses(features, batch) -> dict``: the already-weighted losses of one training step (the Trainer sums
  and logs them). ``features`` are the backbone outputs of view 1 (``batch.images``); a head that needs
  the second view computes them with ``batch.features_of(batch.images2.tensor)``. A head whose
  ``needs_view1_features`` is False gets ``{}`` (the meta-architecture then skips that backbone pass).
* ``inference(features, batch) -> Tensor [B, K+1, h, w]``: non-negative part *scores* on a grid that covers
  the padded batch (any resolution; the meta-architecture resizes them bilinearly). Channel 0 is the
  background, channels 1..K the parts (the canonical layout: heads whose reference code puts the
  background last must move it). Scores need not sum to 1; the meta-architecture normalises them.
* ``trainable``: whether ``losses`` has anything to optimise (default: the head owns parameters with
  ``requires_grad``). Heads without it (the baselines) are evaluation-only.
* ``external_background``: True when the method takes its background from a given fg mask (Choudhury et
  al. and the baselines, Choudhury et al. 2021 appendix §2): where an input has ``fg_mask`` the meta-architecture then
  replaces the head's channel 0 by ``1 − m`` and scales the parts by ``m``. Heads that learn a background
  channel (PartFormer, MPAE) set it False.
"""

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import nn

from ...utils.errors import ConfigError

__all__ = ["PartHead", "DiscoveryBatch"]


@dataclass
class DiscoveryBatch:
    """A batch as the meta-architecture prepared it for the head (all tensors on the model's device).

    Attributes:
        inputs: the original ``batched_inputs`` (list of the mapper's dicts).
        images: ImageList of the normalised view-1 images, padded to the backbone's size divisibility.
        raw_images: [B, 3, Hp, Wp] float view-1 pixels before normalisation (0–255, ``input_format``
            channel order; 0 in the padding), for heads that need colours (Lab, perceptual networks).
        valid: [B, Hp, Wp] bool, pixels inside each image (False in the padding).
        fg_masks: [B, Hp, Wp] bool, the input's ``fg_mask`` where given, else ``valid`` (the whole image).
        fg_given: [B] bool, which inputs had a ``fg_mask``.
        input_format: "RGB" or "BGR" (``INPUT.FORMAT``).
        images2, raw_images2, valid2, fg_masks2, fg_given2: the same for ``image2`` (the paired view),
            present when every input has ``image2``, else None. ``valid2`` also excludes the view-2 pixels the
            mapper marked as coming from outside view 1 (its ``valid2``).
        features_of: runs the backbone (frozen or not, as configured) on a normalised [B, 3, H, W] tensor.
    """

    inputs: List[dict]
    images: ImageList
    raw_images: torch.Tensor
    valid: torch.Tensor
    fg_masks: torch.Tensor
    fg_given: torch.Tensor
    input_format: str
    features_of: Callable[[torch.Tensor], Dict[str, torch.Tensor]]
    images2: Optional[ImageList] = None
    raw_images2: Optional[torch.Tensor] = None
    valid2: Optional[torch.Tensor] = None
    fg_masks2: Optional[torch.Tensor] = None
    fg_given2: Optional[torch.Tensor] = None
    extra: Dict = field(default_factory=dict)

    @property
    def padded_hw(self) -> Tuple[int, int]:
        return tuple(self.images.tensor.shape[-2:])

    def __len__(self) -> int:
        return len(self.inputs)


class PartHead(nn.Module, metaclass=abc.ABCMeta):
    """Base class of part-discovery heads (see the module docstring for the contract).

    Attributes set by subclasses: ``num_parts`` (K) and ``feature_levels`` (backbone levels read, in order).
    """

    external_background: bool = False

    def __init__(self, *, num_parts: int, feature_levels: Sequence[str], input_shape: Optional[Dict] = None):
        super().__init__()
        if int(num_parts) < 1:
            raise ConfigError(f"MODEL.PART_DISCOVERY.NUM_PARTS={num_parts!r} must be ≥ 1.")
        if not feature_levels:
            raise ConfigError("MODEL.PART_DISCOVERY.FEATURE_LEVELS is empty; name at least one backbone level.")
        if input_shape is not None:
            missing = [lvl for lvl in feature_levels if lvl not in input_shape]
            if missing:
                raise ConfigError(
                    f"MODEL.PART_DISCOVERY.FEATURE_LEVELS has {missing}, not produced by the backbone "
                    f"(it has {sorted(input_shape)})."
                )
        self.num_parts = int(num_parts)
        self.feature_levels = list(feature_levels)

    @staticmethod
    def common_args(cfg, input_shape) -> dict:
        """The ``from_config`` arguments every head takes: K, the backbone levels it reads and their shapes."""
        pd = cfg.MODEL.PART_DISCOVERY
        return {"num_parts": pd.NUM_PARTS, "feature_levels": pd.FEATURE_LEVELS, "input_shape": input_shape}

    def levels_channels(self, input_shape: Optional[Dict], in_channels: Optional[int] = None) -> int:
        """Channels of the concatenated ``feature_levels``: ``in_channels`` when given, else from ``input_shape``."""
        if in_channels is not None:
            return int(in_channels)
        if input_shape is None:
            raise ConfigError(
                f"{type(self).__name__} needs input_shape (the backbone's output_shape()) or in_channels."
            )
        return sum(int(input_shape[lvl].channels) for lvl in self.feature_levels)

    @property
    def needs_fg_mask(self) -> bool:
        """Whether every input must carry a ``fg_mask`` (checked with ``MODEL.PART_DISCOVERY.REQUIRE_FG_MASK``):
        by default, the heads with ``external_background``."""
        return bool(self.external_background)

    @property
    def needs_view1_features(self) -> bool:
        """Whether :meth:`losses` reads ``features`` (the backbone outputs of the un-augmented view 1); a head
        that computes its own (e.g. of a colour-jittered copy) returns False and gets an empty dict."""
        return True

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def concat_levels(self, features: Dict[str, torch.Tensor], grid_hw=None) -> torch.Tensor:
        """``feature_levels`` bilinearly resized to ``grid_hw`` (default: the first level's grid) and
        concatenated along channels: [B, C, h, w] float32 (as PixelGroupingModel.features)."""
        first = features[self.feature_levels[0]]
        grid_hw = tuple(first.shape[-2:]) if grid_hw is None else tuple(grid_hw)
        maps = [
            (
                f
                if tuple(f.shape[-2:]) == grid_hw
                else F.interpolate(f, size=grid_hw, mode="bilinear", align_corners=False)
            )
            for f in (features[lvl] for lvl in self.feature_levels)
        ]
        return torch.cat(maps, dim=1).float()

    def losses(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> Dict[str, torch.Tensor]:
        return {}

    @abc.abstractmethod
    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        """Non-negative part scores [B, K+1, h, w], background in channel 0 (every head must define it)."""
