"""Train/test loaders whose mapper comes from DATASET_MAPPER_REGISTRY (not a string switch).

Few-shot training (reference code): with ``DATASETS.TRAIN_LABEL_PERCENTAGE`` p < 100 the train loader keeps a
deterministic p% of the training images (:func:`label_percentage_subset`): the dataset dicts detectron2 would
train on (all of ``DATASETS.TRAIN``, after its empty-annotation filter) are shuffled with
``np.random.RandomState(DATASETS.TRAIN_LABEL_SEED)`` (1234, the reference's ``np.random.seed(1234)`` +
``np.random.shuffle``: the same permutation) and the first max(1, floor(N·p/100)) are kept. The reference
subsamples each dataset's list at load time, before any filtering; with one training dataset whose images
all have parts (PartImageNet, toyparts) that is the same set.
"""

import difflib
import logging
import math

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import build_detection_test_loader as d2_test_loader
from detectron2.data import build_detection_train_loader as d2_train_loader
from detectron2.data import get_detection_dataset_dicts

from ..utils.errors import ConfigError
from .dataset_mappers import build_dataset_mapper
from .store_dataset import StoreMapDataset, build_store_train_sampler

__all__ = [
    "build_detection_train_loader",
    "build_detection_test_loader",
    "build_labelling_loader",
    "check_dataset_names",
    "label_percentage_subset",
]

logger = logging.getLogger(__name__)


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


def _check_percentage(percentage, key: str) -> float:
    p = float(percentage)
    if not 0.0 < p <= 100.0:  # NaN fails too
        raise ConfigError(f"{key}={percentage!r}: use a percentage in (0, 100] (100 = all training images).")
    return p


def label_percentage_subset(dataset_dicts, percentage, seed: int = 1234, key: str = "DATASETS.TRAIN_LABEL_PERCENTAGE"):
    """The first max(1, floor(N·p/100)) of ``dataset_dicts`` shuffled by ``np.random.RandomState(seed)``.

    ``percentage`` 100 returns the list unchanged (same order). The kept dicts keep their shuffled order.

    Raises:
        ConfigError: ``percentage`` is outside (0, 100] (named by ``key``), or the list is empty.
    """
    p = _check_percentage(percentage, key)
    view = getattr(dataset_dicts, "subset", None)  # list-like datasets (a pseudo-label store) give views
    if view is None:
        dataset_dicts = list(dataset_dicts)
    if p == 100.0:
        return dataset_dicts
    n = len(dataset_dicts)
    if n == 0:
        raise ConfigError(f"{key}={percentage}: the training set is empty, there is nothing to subsample.")
    keep = max(1, int(math.floor(n * p / 100.0)))  # floating point, as the reference computes it
    order = np.random.RandomState(int(seed)).permutation(n)
    if view is not None:
        return view(order[:keep])
    return [dataset_dicts[i] for i in order[:keep]]


def _train_dataset_dicts(cfg):
    """The dataset dicts detectron2's train loader would build from ``cfg`` (same filters)."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


class _GiveUpAfterSkips:
    """A training mapper that fails when ``limit`` samples in a row map to None: detectron2's MapDataset
    retries a skipped sample with random others forever, so a dataset whose images are all unusable (a
    wrong image folder, say) would hang training instead of failing."""

    def __init__(self, mapper, limit: int = 200):
        self.mapper, self.limit, self.in_a_row = mapper, limit, 0

    def __call__(self, dataset_dict):
        out = self.mapper(dataset_dict)
        if out is not None:
            self.in_a_row = 0
            return out
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            from ..utils.errors import UserError
            from .skips import skip_counts

            raise UserError(
                f"{self.in_a_row} training samples in a row were skipped (last: {dataset_dict.get('file_name')}; "
                f"skips by reason so far: {skip_counts()}): the training data is unusable; check it with "
                "tools/validate_dataset.py"
            )
        return None


def build_detection_train_loader(cfg):
    check_dataset_names(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    percentage = _check_percentage(cfg.DATASETS.get("TRAIN_LABEL_PERCENTAGE", 100.0), "DATASETS.TRAIN_LABEL_PERCENTAGE")
    dicts = _train_dataset_dicts(cfg)  # a list, or a PseudoLabelStoreDataset (decoded on access)
    # detectron2's MapDataset gives up on an index once it failed, and errors when none is left
    limit = min(200, max(1, len(dicts))) if isinstance(dicts, list) else 200
    mapper = _GiveUpAfterSkips(build_dataset_mapper(cfg, is_train=True), limit=limit)
    if percentage < 100.0:
        seed = cfg.DATASETS.get("TRAIN_LABEL_SEED", 1234)
        kept = label_percentage_subset(dicts, percentage, seed)
        logger.info(
            "DATASETS.TRAIN_LABEL_PERCENTAGE: kept %d of %d images (%g%%) of %s, NumPy seed %d.",
            len(kept),
            len(dicts),
            percentage,
            ", ".join(cfg.DATASETS.TRAIN),
            seed,
        )
        dicts = kept
    sampler = build_store_train_sampler(cfg, dicts)  # None: detectron2's sampler (DATALOADER.SAMPLER_TRAIN)
    if sampler is None:
        loader = d2_train_loader(cfg, mapper=mapper, dataset=dicts, sampler=sampler)
    else:  # a store: no detectron2 MapDataset (it keeps a set of every index; see data/store_dataset.py)
        loader = d2_train_loader(
            StoreMapDataset(dicts, mapper),
            mapper=None,
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
    loader.resumable_sampler = sampler  # Trainer.resume_or_load skips what the resumed run already saw
    return loader


def build_detection_test_loader(cfg, dataset_name: str):
    """detectron2's test loader, except that an image the mapper cannot use yields ``{"skipped": ...}``
    instead of a random other image (see ``engine/skip_aware.py`` for how evaluation counts it)."""
    from detectron2.data.samplers import InferenceSampler

    check_dataset_names([dataset_name], "DATASETS.TEST")
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    if tuple(cfg.DATASETS.TEST[:1]) != (dataset_name,):
        # test mappers read their dataset's metadata from DATASETS.TEST[0] (e.g. part_to_object): give each
        # evaluated dataset its own, not the first one's
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TEST = (dataset_name,)
        cfg.freeze()
    dataset = _IndexedMapDataset(dicts, range(len(dicts)), build_dataset_mapper(cfg, is_train=False))
    return d2_test_loader(
        dataset, mapper=None, sampler=InferenceSampler(len(dataset)), num_workers=cfg.DATALOADER.NUM_WORKERS
    )


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
