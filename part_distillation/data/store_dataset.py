"""Training straight from a sharded pseudo-label store, without holding its records in memory.

PartDistillation (Cho et al. 2023) trains its part-proposal stage on pseudo-labels of all of ImageNet-21K
(~14M images) and its distillation stage on the ranked labels of the same images. A Python list of every
record (:func:`~part_distillation.data.pseudo_labels.load_pseudo_label_dicts`) costs a few KB per image in
every training process, tens of GB at that scale. Here instead:

- :class:`PseudoLabelStoreDataset` is a map-style, list-like dataset over a store. It keeps one small
  array per quantity over the *shards* (shard number, first position, sha256, file name; ~100 bytes a
  shard, ~1.5 MB for 14M images in 1000-image shards), never per image. Item ``i`` is decoded on access:
  the shard holding it is read, checked against its sha256 and decompressed into one ``bytes`` buffer
  with an int64 array of line offsets; the last ``cache_shards`` shards stay decoded (an LRU cache per
  process/worker), so sequential or shard-local access decodes each shard once. Items are
  :func:`~part_distillation.data.pseudo_labels.record_to_dataset_dict` dicts, identical to the list path's.
- :class:`ShardWindowTrainingSampler` is the default training order over a store: an infinite stream,
  reshuffled every epoch from a seed; each epoch the shards are permuted and dealt to the ranks
  (rank ``r`` gets every ``W``-th shard, so ranks read disjoint shards), and each rank shuffles the
  images of ``window`` shards at a time. A worker then touches ``window`` shards at a time, which stay
  in its cache: every shard is decoded once per epoch per loader worker, instead of once per image
  under a global permutation. ``set_start(n)`` skips the first ``n`` indices of the rank's stream, so
  ``--resume`` continues the order (with a fixed ``SEED``) instead of replaying it from the start.
- ``DATALOADER.STORE_SHUFFLE "global"`` keeps detectron2's ``TrainingSampler`` (a permutation of all
  images, the list path's exact order): random shard access, one shard decode per image; for small stores
  and for comparisons with the list path.

Images whose record has no parts are not filtered when the dataset is built (that would read the whole
store): the training mapper returns None for them and another image is drawn. With the shard-window order that is
:class:`StoreMapDataset` (another image of the same shard, already decoded; memory proportional to the failures),
not detectron2's ``MapDataset``, which keeps a Python set of every index (~1 GB per process at 14M images) and
copies it into a list on each failure.
"""

import collections
import itertools
import json
import logging
import os
import random

import numpy as np
import torch.utils.data as torchdata
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper

from ..utils.errors import ConfigError, UserError
from .pseudo_labels import (
    CorruptShardError,
    read_manifest,
    read_shard_text,
    record_to_dataset_dict,
    require_complete,
    store_dir,
)

__all__ = ["PseudoLabelStoreDataset", "ShardWindowTrainingSampler", "StoreMapDataset", "build_store_train_sampler"]

logger = logging.getLogger(__name__)

_NEWLINE = 10


class PseudoLabelStoreDataset(torchdata.Dataset):
    """Read-only, list-like view of the store ``<root>/<source>/<stage>`` in dataset order.

    ``len()``, ``[i]`` (a fresh dataset dict), ``[a:b]`` (a view), iteration (one shard decoded at a time)
    work as on the list :func:`~part_distillation.data.pseudo_labels.load_pseudo_label_dicts` returns.

    Args:
        verify: check each shard's sha256 when it is decoded.
        cache_shards: decoded shards kept per process (each ~ the shard's uncompressed JSON size).
        allow_incomplete: serve the shards present in an incomplete store instead of refusing it.
    """

    def __init__(self, root, source, stage, verify: bool = True, cache_shards: int = 2, allow_incomplete=False):
        self.root, self.source, self.stage = root, source, stage
        self.dir = store_dir(root, source, stage)
        manifest = read_manifest(root, source, stage)
        if not allow_incomplete:
            require_complete(manifest, self.dir)
        shards = sorted(manifest["shards"], key=lambda s: s["shard"])
        shards = [s for s in shards if s["num_images"] > 0]
        self.shard_size = int(manifest["shard_size"])
        self.verify = verify
        self._shard_ids = np.array([s["shard"] for s in shards], dtype=np.int64)
        counts = np.array([s["num_images"] for s in shards], dtype=np.int64)
        self._starts = np.zeros(len(shards) + 1, dtype=np.int64)  # item i lives in shard position p if
        np.cumsum(counts, out=self._starts[1:])  # _starts[p] <= i < _starts[p + 1]
        self._files = np.array([s["file"] for s in shards], dtype=np.bytes_)
        self._sha256 = np.array([s["sha256"] for s in shards], dtype=np.bytes_)
        self._rows = None  # a subset view: positions into the full store
        self.cache_shards = max(1, int(cache_shards))
        self._cache = collections.OrderedDict()

    # -- list-like interface ------------------------------------------------------------------
    def __len__(self):
        return int(self._starts[-1]) if self._rows is None else len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(np.arange(len(self))[index])
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a pseudo-label store of {n} images ({self.dir})")
        index %= n
        row = index if self._rows is None else int(self._rows[index])
        return record_to_dataset_dict(self._record(row))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):  # loader workers and DDP processes start with an empty cache
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        return state

    def subset(self, indices):
        """A view on the images at ``indices`` (positions in this dataset); shares the shard arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        view = object.__new__(PseudoLabelStoreDataset)
        view.__dict__.update(self.__getstate__())
        view._rows = indices if self._rows is None else self._rows[indices]
        return view

    @property
    def is_subset(self) -> bool:
        return self._rows is not None

    # -- shards -------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self._shard_ids)

    def shard_lengths(self) -> np.ndarray:
        """Images per shard (non-empty shards, in store order); the full store's items are in that order."""
        return np.diff(self._starts)

    def shard_range(self, index: int) -> range:
        """Positions of the images in the shard holding position ``index`` (the whole view for a subset)."""
        if self._rows is not None:
            return range(len(self))
        pos = int(np.searchsorted(self._starts, int(index), side="right")) - 1
        return range(int(self._starts[pos]), int(self._starts[pos + 1]))

    def _record(self, row: int) -> dict:
        pos = int(np.searchsorted(self._starts, row, side="right")) - 1
        text, offsets = self._decoded_shard(pos)
        line = int(row - self._starts[pos])
        return json.loads(text[offsets[line] : offsets[line + 1] - 1])

    def _decoded_shard(self, pos: int):
        cached = self._cache.get(pos)
        if cached is not None:
            self._cache.move_to_end(pos)
            return cached
        path = os.path.join(self.dir, self._files[pos].decode())
        text = read_shard_text(path, self._sha256[pos].decode() if self.verify else None)
        if text and text[-1] != _NEWLINE:
            text += b"\n"
        ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == _NEWLINE) + 1
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        expected = int(self._starts[pos + 1] - self._starts[pos])
        if len(ends) != expected:
            raise CorruptShardError(
                f"pseudo-label shard {path} holds {len(ends)} records, the manifest says {expected}; delete it and "
                "rerun make_pseudo_labels.py with --resume"
            )
        self._cache[pos] = (text, offsets)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return text, offsets


class NoTrainableImageError(UserError, RuntimeError):
    """Every image of a store failed to map: the CLI prints it in one line."""


class StoreMapDataset(torchdata.Dataset):
    """``mapper(dataset[i])``; when the mapper returns None (no usable label, unreadable image), another image of
    the same shard is tried (already decoded), then any image. Only failed indices are remembered."""

    _SAME_SHARD_TRIES = 8

    def __init__(self, dataset, mapper, seed: int = 42):
        self._dataset = dataset
        self._mapper = PicklableWrapper(mapper)
        self._rng = random.Random(seed)
        self._failed = set()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, index):
        current = int(index)
        for attempt in itertools.count(1):
            data = self._mapper(self._dataset[current])
            if data is not None:
                return data
            self._failed.add(current)
            if attempt == 3:
                logger.warning("Could not map %d images in a row; drawing others (last index %d)", attempt, current)
            if len(self._failed) >= len(self._dataset):
                raise NoTrainableImageError(
                    f"no image of {self._dataset.dir} can be mapped for training (see the skip warnings)"
                )
            span = self._dataset.shard_range(current) if attempt <= self._SAME_SHARD_TRIES else range(len(self))
            current = span[self._rng.randrange(len(span))]
        return None  # pragma: no cover


class ShardWindowTrainingSampler(torchdata.Sampler):
    """Infinite, seedable, shard-local training order over a store (see the module docstring).

    Epoch ``e`` of rank ``r``: the shards permuted by ``Generator(PCG64([seed, e]))``, shards
    ``r, r + W, ...`` of that permutation taken, and the images of each group of ``window`` consecutive
    taken shards shuffled together. With fewer shards than ranks, every rank takes every shard and keeps
    the images ``r, r + W, ...`` of each shuffled window (still disjoint across ranks).

    Args:
        shard_lengths: images per shard; item indices are consecutive shard by shard.
        window: shards whose images are shuffled together (the loader's cache must hold that many).
        seed: the shuffle seed, the same on every rank.
        start: indices of this rank's stream to skip (``set_start``; used by ``--resume``).
    """

    def __init__(self, shard_lengths, window: int = 8, seed: int = 0, rank=None, world_size=None, start: int = 0):
        self._lengths = np.asarray(shard_lengths, dtype=np.int64)
        if len(self._lengths) == 0 or self._lengths.sum() <= 0:
            raise ValueError("ShardWindowTrainingSampler needs at least one non-empty shard")
        if int(window) < 1:
            raise ConfigError(f"DATALOADER.STORE_SHUFFLE_WINDOW={window}: use 1 or more shards")
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)])
        self._window = int(window)
        self._seed = int(seed)
        self._rank = comm.get_rank() if rank is None else int(rank)
        self._world = comm.get_world_size() if world_size is None else int(world_size)
        self._start = int(start)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's stream (e.g. iterations done × images per rank)."""
        self._start = max(0, int(start))

    def _epoch_shards(self, epoch: int):
        rng = np.random.Generator(np.random.PCG64([self._seed, epoch]))
        order = rng.permutation(len(self._lengths))
        if len(order) >= self._world:
            return order[self._rank :: self._world], False
        return order, True

    def _windows(self, shards):
        return [shards[i : i + self._window] for i in range(0, len(shards), self._window)]

    def _window_length(self, group, strided) -> int:
        n = int(self._lengths[group].sum())
        return len(range(self._rank, n, self._world)) if strided else n

    def _window_indices(self, epoch, w, group, strided) -> np.ndarray:
        # one generator per (seed, epoch, window[, rank]): a window can be skipped without drawing it
        key = [self._seed, epoch, w] if strided else [self._seed, epoch, w, self._rank]
        idx = np.concatenate([np.arange(self._starts[k], self._starts[k + 1]) for k in group])
        idx = np.random.Generator(np.random.PCG64(key)).permutation(idx)
        return idx[self._rank :: self._world] if strided else idx

    def epoch_length(self, epoch: int) -> int:
        shards, strided = self._epoch_shards(epoch)
        return sum(self._window_length(g, strided) for g in self._windows(shards))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch`` (each index of its shards exactly once)."""
        shards, strided = self._epoch_shards(epoch)
        out = [self._window_indices(epoch, w, g, strided) for w, g in enumerate(self._windows(shards))]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __iter__(self):
        # memory: one window of indices at a time (not an epoch: 14M images would be ~100 MB per process)
        skip = self._start
        for epoch in itertools.count():
            shards, strided = self._epoch_shards(epoch)
            for w, group in enumerate(self._windows(shards)):
                n = self._window_length(group, strided)
                if skip >= n:  # skipped without drawing the permutation
                    skip -= n
                    continue
                yield from self._window_indices(epoch, w, group, strided)[skip:].tolist()
                skip = 0


def build_store_train_sampler(cfg, dataset):
    """The training sampler for ``dataset`` under ``cfg``, or None for detectron2's default.

    A :class:`ShardWindowTrainingSampler` when ``dataset`` is a whole :class:`PseudoLabelStoreDataset` and
    ``DATALOADER.STORE_SHUFFLE`` is "shard_window" (the dataset's cache is grown to the window); None for
    "global", other datasets and subset views (few-shot subsets: their order is not shard-local).
    """
    mode = cfg.DATALOADER.get("STORE_SHUFFLE", "shard_window")
    if mode not in ("shard_window", "global"):
        raise ConfigError(f"DATALOADER.STORE_SHUFFLE={mode!r}: use 'shard_window' or 'global'")
    if not isinstance(dataset, PseudoLabelStoreDataset) or dataset.is_subset or mode == "global":
        return None
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.info("DATALOADER.SAMPLER_TRAIN=%s: not using the shard-window order", cfg.DATALOADER.SAMPLER_TRAIN)
        return None
    window = int(cfg.DATALOADER.get("STORE_SHUFFLE_WINDOW", 8))
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    dataset.cache_shards = max(dataset.cache_shards, window)
    logger.info(
        "Training on pseudo-label store %s (%d images, %d shards): shard-window order, %d shards a window, seed %d",
        dataset.dir,
        len(dataset),
        dataset.num_shards,
        window,
        seed,
    )
    return ShardWindowTrainingSampler(dataset.shard_lengths(), window=window, seed=seed)
