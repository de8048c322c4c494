"""Train/test loaders whose mapper comes from DATASET_MAPPER_REGISTRY (not a string switch)."""
import difflib

from detectron2.data import DatasetCatalog
from detectron2.data import build_detection_test_loader as d2_test_loader
from detectron2.data import build_detection_train_loader as d2_train_loader

from ..utils.errors import ConfigError
from .dataset_mappers import build_dataset_mapper

__all__ = ["build_detection_train_loader", "build_detection_test_loader", "check_dataset_names"]


def check_dataset_names(names, key: str) -> None:
    """Fail early, in one line, when a config names a dataset nobody registered."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{key} names dataset {name!r}, which is not registered.{hint} Register it (see datasets/README.md) "
                "or fix the config."
            )


def build_detection_train_loader(cfg):
    check_dataset_names(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    return d2_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))


def build_detection_test_loader(cfg, dataset_name: str):
    check_dataset_names([dataset_name], "DATASETS.TEST")
    return d2_test_loader(cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False))
