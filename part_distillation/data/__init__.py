"""Datasets (lazy registrations) and dataset mappers (registered in DATASET_MAPPER_REGISTRY)."""

from . import datasets, dataset_mappers  # noqa: F401
from .build import build_detection_test_loader, build_detection_train_loader, build_labelling_loader  # noqa: F401
