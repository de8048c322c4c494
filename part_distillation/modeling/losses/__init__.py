"""Losses shared by the part-discovery heads."""

from .perceptual import PerceptualLoss, PerceptualNetwork, build_perceptual_network, imagenet_normalize  # noqa: F401
