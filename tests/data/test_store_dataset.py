"""PseudoLabelStoreDataset (records decoded on access) and ShardWindowTrainingSampler (data/store_dataset.py)."""

import pickle

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from part_distillation.data.build import label_percentage_subset
from part_distillation.data.pseudo_labels import (
    CorruptShardError,
    PseudoLabelWriter,
    load_pseudo_label_dicts,
    make_object,
    make_part,
    register_pseudo_label_dataset,
)
from part_distillation.data.store_dataset import PseudoLabelStoreDataset, ShardWindowTrainingSampler
from part_distillation.utils.errors import ConfigError

NUM_IMAGES = 11


def _record(i, rng):
    h, w = 6 + i % 3, 8
    obj = rng.random((h, w)) > 0.3
    parts = [make_part(obj & (rng.random((h, w)) > 0.5), score=0.5 + 0.01 * k, part_class=k) for k in range(1 + i % 3)]
    return {
        "image_id": f"im{i}",
        "file_name": f"/nowhere/im{i}.jpg",
        "height": h,
        "width": w,
        "class_code": "n0000" + str(i % 2),
        "objects": [make_object(obj, parts, score=0.9, category_id=i % 2)],
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """11 dataset indices in shards of 3; indices 4 and 9 have no label (so shard sizes are 3, 2, 3, 1)."""
    root = str(tmp_path_factory.mktemp("store"))
    rng = np.random.default_rng(0)
    writer = PseudoLabelWriter(root, "src", "grouping", shard_size=3, config="test", num_images=NUM_IMAGES)
    for i in range(NUM_IMAGES):
        writer.add(i, None if i in (4, 9) else _record(i, rng))
    writer.close()
    writer.finalize()
    return root


def test_store_dataset_is_the_list_decoded_on_access(store):
    dicts = load_pseudo_label_dicts(store, "src", "grouping")
    dataset = PseudoLabelStoreDataset(store, "src", "grouping", cache_shards=2)
    assert len(dataset) == len(dicts) == 9
    assert list(dataset) == dicts
    assert [dataset[i] for i in (8, 0, 5, 3)] == [dicts[i] for i in (8, 0, 5, 3)]
    assert dataset[-1] == dicts[-1]
    assert list(dataset.shard_lengths()) == [3, 2, 3, 1]
    assert len(dataset._cache) <= 2  # bounded, whatever the access pattern
    view = dataset[2:7]
    assert len(view) == 5 and list(view) == dicts[2:7] and view.is_subset
    assert list(view.subset([4, 0])) == [dicts[6], dicts[2]]
    clone = pickle.loads(pickle.dumps(dataset))  # what a loader worker / DDP process gets
    assert len(clone._cache) == 0 and clone[4] == dicts[4]
    dataset[0]["annotations"].clear()  # items are fresh dicts
    assert dataset[0] == dicts[0]
    with pytest.raises(IndexError):
        dataset[9]


def test_percentage_subset_of_a_store_is_a_view_with_the_same_records(store):
    dicts = load_pseudo_label_dicts(store, "src", "grouping")
    dataset = PseudoLabelStoreDataset(store, "src", "grouping")
    kept = label_percentage_subset(dataset, 50.0, seed=1234)
    assert isinstance(kept, PseudoLabelStoreDataset)
    assert list(kept) == label_percentage_subset(dicts, 50.0, seed=1234)


def test_registration_switch_and_corrupt_shard(store, tmp_path):
    register_pseudo_label_dataset("src_store_test", store, "src", "grouping")
    assert isinstance(DatasetCatalog.get("src_store_test"), PseudoLabelStoreDataset)
    register_pseudo_label_dataset("src_store_test", store, "src", "grouping", loader="list")
    assert isinstance(DatasetCatalog.get("src_store_test"), list)
    with pytest.raises(ConfigError, match="PSEUDO_LABEL_LOADER"):
        register_pseudo_label_dataset("src_store_test", store, "src", "grouping", loader="lazy")
    DatasetCatalog.remove("src_store_test")

    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(store, copy)
    path = f"{copy}/src/grouping/shards/shard-00001.jsonl.gz"
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x01")
    dataset = PseudoLabelStoreDataset(copy, "src", "grouping")
    assert dataset[0]["image_id"] == "im0"  # other shards still read
    with pytest.raises(CorruptShardError, match="shard-00001.jsonl.gz is corrupted"):
        dataset[3]


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_window_sampler_epochs_are_disjoint_per_rank_and_shard_local(world):
    lengths = [5, 3, 7, 1, 6, 4, 2]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    shard_of = np.searchsorted(starts, np.arange(total), side="right") - 1
    for epoch in range(3):
        seen = []
        for rank in range(world):
            sampler = ShardWindowTrainingSampler(lengths, window=2, seed=7, rank=rank, world_size=world)
            idx = sampler.epoch_indices(epoch)
            assert len(idx) == sampler.epoch_length(epoch)
            if world > 1:  # ranks read disjoint shards
                assert not set(shard_of[idx]) & set(shard_of[seen]) if seen else True
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(total))  # every image once per epoch, ranks disjoint
    a = ShardWindowTrainingSampler(lengths, window=2, seed=7, rank=0, world_size=world)
    b = ShardWindowTrainingSampler(lengths, window=2, seed=7, rank=0, world_size=world)
    c = ShardWindowTrainingSampler(lengths, window=2, seed=8, rank=0, world_size=world)
    assert _take(a, 60) == _take(b, 60) != _take(c, 60)
    assert a.epoch_indices(0).tolist() != a.epoch_indices(1).tolist()  # reshuffled every epoch


def test_shard_window_sampler_window_bounds_the_shards_in_flight():
    lengths = [10] * 12
    sampler = ShardWindowTrainingSampler(lengths, window=3, seed=0, rank=0, world_size=1)
    idx = sampler.epoch_indices(0)
    for block in range(4):  # each run of 30 images comes from exactly 3 shards
        assert len(set((idx[block * 30 : (block + 1) * 30] // 10).tolist())) == 3


def test_shard_window_sampler_fewer_shards_than_ranks():
    seen = []
    for rank in range(3):
        sampler = ShardWindowTrainingSampler([4, 1], window=8, seed=1, rank=rank, world_size=3)
        seen += sampler.epoch_indices(0).tolist()
        assert sampler.epoch_length(0) == len(sampler.epoch_indices(0))
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_shard_window_sampler_start_skips_what_a_resumed_run_already_saw():
    lengths = [5, 3, 7, 1]
    full = _take(ShardWindowTrainingSampler(lengths, window=2, seed=3, rank=1, world_size=2), 50)
    for start in (0, 4, 9, 23):
        sampler = ShardWindowTrainingSampler(lengths, window=2, seed=3, rank=1, world_size=2)
        sampler.set_start(start)
        assert _take(sampler, 50 - start) == full[start:]


def test_store_map_dataset_draws_another_image_of_the_same_shard(store):
    from part_distillation.data.store_dataset import StoreMapDataset

    dataset = PseudoLabelStoreDataset(store, "src", "grouping")
    bad = {"im0", "im1"}  # shard 0 holds im0, im1, im2

    def mapper(d):
        return None if d["image_id"] in bad else d["image_id"]

    mapped = StoreMapDataset(dataset, mapper)
    assert mapped[0] == "im2" and mapped[5] == dataset[5]["image_id"]
    assert mapped._failed <= {0, 1}
    bad = {d["image_id"] for d in dataset}
    with pytest.raises(RuntimeError, match="no image"):
        mapped[3]
