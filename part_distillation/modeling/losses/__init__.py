"""Losses shared by the part-discovery heads."""

from .perceptual import PerceptualLoss, PerceptualNetwork, build_perceptual_network, imagenet_normalize  # noqa: F401
from .partformer import area_loss, arcface_logits, arcface_loss, concentration_loss, grid_coordinates, transfer  # noqa: F401
from .mpae import entropy_loss, presence_loss, restoration_loss, semantic_consistency_loss, total_variation_loss  # noqa: F401
from .contrastive_reconstruction import (  # noqa: F401
    contrastive_loss,
    equivariance_loss,
    part_consistency_loss,
    part_descriptors,
    rgb_to_lab,
)
