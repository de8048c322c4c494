"""Train/test loaders whose mapper comes from DATASET_MAPPER_REGISTRY (not a string switch)."""
import difflib

import torch
from detectron2.data import DatasetCatalog
from detectron2.data import build_detection_test_loader as d2_test_loader
from detectron2.data import build_detection_train_loader as d2_train_loader

from ..utils.errors import ConfigError
from .dataset_mappers import build_dataset_mapper

__all__ = ["build_detection_train_loader", "build_detection_test_loader", "build_labelling_loader", "check_dataset_names"]


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


class _IndexedMapDataset(torch.utils.data.Dataset):
    """``mapper(dicts[i])`` for the given indices, tagged with ``dataset_index``; never substitutes images.

    detectron2's MapDataset replaces a failed sample by a random other one, which is right for training
    and wrong for labelling, where every index must yield exactly one (possibly "skipped") output.
    """

    def __init__(self, dicts, indices, mapper):
        self.dicts, self.indices, self.mapper = dicts, list(indices), mapper

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        record = dict(self.dicts[index], dataset_index=index)
        out = self.mapper(record)
        if out is None:  # a mapper that follows detectron2's convention for unusable samples
            out = {"skipped": "the mapper returned None", "file_name": record.get("file_name")}
        out["dataset_index"] = index
        return out


def _as_list(batch):
    return batch


def build_labelling_loader(dicts, indices, mapper, batch_size: int = 1, num_workers: int = 0):
    """A sequential loader over ``indices`` of ``dicts`` (each rank passes the indices it owns)."""
    return torch.utils.data.DataLoader(
        _IndexedMapDataset(dicts, indices, mapper),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
