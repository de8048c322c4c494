"""The sharded pseudo-label store: exact round trip, deterministic sharding across ranks, atomic
shards under a crash, resume, checksums, detectron2 registration, the mapper and the inspect tool."""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

from part_distillation.data import pseudo_labels as pl
from part_distillation.data.dataset_mappers.pseudo_label_mapper import PseudoLabelDatasetMapper
from part_distillation.data.pseudo_labels import (
    CorruptShardError,
    PseudoLabelReader,
    PseudoLabelWriter,
    decode_mask,
    encode_mask,
    make_object,
    make_part,
)
from part_distillation.utils.errors import ConfigError, DatasetNotFoundError, UserError

SRC, STAGE = "synthetic_train", "grouping"
N, SHARD = 8, 3  # 3 shards: [0, 3), [3, 6), [6, 8)
SKIPPED = 4  # this dataset index gets no label


def _record(i, h=12, w=16):
    """A random record: 1-2 objects, each split into 2-3 parts; odd images carry part classes."""
    rng = np.random.default_rng(i)
    objects = []
    for j in range(1 + i % 2):
        obj = np.zeros((h, w), dtype=bool)
        obj[rng.integers(0, 3) : h - rng.integers(0, 3), 2 * j : w - rng.integers(0, 3)] = True
        labels = rng.integers(0, 2 + j, size=(h, w))
        parts = [
            make_part(obj & (labels == c), score=rng.random(), part_class=c if i % 2 else None) for c in range(2 + j)
        ]
        objects.append(make_object(obj, parts, score=np.float32(rng.random()), category_id=int(rng.integers(-1, 3))))
    return {
        "image_id": f"img_{i}" if i % 3 else i,  # str and int ids both survive
        "file_name": f"/data/img_{i}.jpg",
        "height": h,
        "width": w,
        "class_code": "n0001",
        "objects": objects,
    }


RECORDS = [None if i == SKIPPED else _record(i) for i in range(N)]


def _write(root, rank=0, world_size=1, resume=False, config="cfg-a", computed=None):
    writer = PseudoLabelWriter(root, SRC, STAGE, shard_size=SHARD, config=config, num_images=N, resume=resume)
    for index in writer.pending_indices(rank=rank, world_size=world_size):
        if computed is not None:
            computed.append(index)
        writer.add(index, RECORDS[index])
    writer.close()
    return writer


def _tree(root):
    out = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path) or path.endswith(".tmp"):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    for path in glob.glob(os.path.join(root, "**", ".*"), recursive=True):  # glob skips dot files above
        with open(path, "rb") as f:
            out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    _write(root).finalize()
    return root


def test_mask_codec_round_trip():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.zeros((3, 4), bool), np.ones((4, 3), bool)[:, ::-1]):
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        out = decode_mask(rle)
        assert out.dtype == bool and np.array_equal(out, mask)


def test_round_trip_is_exact_and_ordered(store):
    reader = PseudoLabelReader(store, SRC, STAGE)
    expected = [(i, r) for i, r in enumerate(RECORDS) if r is not None]
    assert len(reader) == len(expected)
    got = list(reader)
    assert [r["index"] for r in got] == [i for i, _ in expected]
    for rec, (index, ref) in zip(got, expected):
        assert rec["image_id"] == ref["image_id"] and type(rec["image_id"]) is type(ref["image_id"])
        assert (rec["file_name"], rec["height"], rec["width"], rec["class_code"]) == (
            ref["file_name"],
            ref["height"],
            ref["width"],
            ref["class_code"],
        )
        assert len(rec["objects"]) == len(ref["objects"])
        for obj, ref_obj in zip(rec["objects"], ref["objects"]):
            assert obj["score"] == ref_obj["score"] and obj["category_id"] == ref_obj["category_id"]
            assert obj["bbox"] == ref_obj["bbox"]
            assert np.array_equal(decode_mask(obj["segmentation"]), decode_mask(ref_obj["segmentation"]))
            assert len(obj["parts"]) == len(ref_obj["parts"])
            for part, ref_part in zip(obj["parts"], ref_obj["parts"]):
                assert part["score"] == ref_part["score"]
                assert part.get("part_class") == ref_part.get("part_class")
                assert np.array_equal(decode_mask(part["segmentation"]), decode_mask(ref_part["segmentation"]))
    # random access by image id and by dataset index
    assert reader.get("img_5")["index"] == 5 and reader.get(6)["index"] == 6
    assert reader.get_by_index(7)["image_id"] == "img_7" and reader.get_by_index(SKIPPED) is None
    assert "img_1" in reader and "img_4" not in reader
    manifest = reader.manifest
    assert manifest["complete"] and manifest["num_images_expected"] == N and manifest["num_shards"] == 3
    assert [s["index_range"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 8]]
    assert [s["num_images"] for s in manifest["shards"]] == [3, 2, 2]
    assert manifest["num_parts"] == sum(len(o["parts"]) for r in RECORDS if r for o in r["objects"])
    assert manifest["shards"][0]["first_image_id"] == 0 and manifest["shards"][0]["last_image_id"] == "img_2"
    assert manifest["config"] == "cfg-a"


def test_shard_assignment_is_deterministic_and_two_ranks_equal_one_writer(store, tmp_path):
    assert [pl.shard_of(i, SHARD) for i in range(N)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert pl.shards_for_rank(3, 0, 2) == [0, 2] and pl.shards_for_rank(3, 1, 2) == [1]
    root = str(tmp_path / "ranks")
    rank0 = _write(root, rank=0, world_size=2)
    assert rank0.completed_shards() == [0, 2]
    _write(root, rank=1, world_size=2)
    rank0.finalize()
    single, ranks = _tree(store), _tree(root)
    assert sorted(single) == sorted(ranks) and os.path.join(SRC, STAGE, "manifest.json") in single
    for name in single:
        assert single[name] == ranks[name], name


def test_crash_between_shards_leaves_complete_shards_and_resume_recomputes_the_rest(store, tmp_path, monkeypatch):
    root = str(tmp_path / "crash")
    real_replace = os.replace

    class SimulatedCrash(Exception):
        pass

    def crash_on_shard_1(src, dst):
        if os.path.basename(dst) == "shard-00001.jsonl.gz":
            raise SimulatedCrash()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_shard_1)
    with pytest.raises(SimulatedCrash):
        _write(root)
    monkeypatch.setattr(os, "replace", real_replace)
    shard_dir = os.path.join(root, SRC, STAGE, "shards")
    # A writer killed by SIGKILL cannot clean up: leave what it would leave behind.
    with open(os.path.join(shard_dir, ".shard-00001.jsonl.gz.x1y2z3.tmp"), "wb") as f:
        f.write(b"\x1f\x8b half a shard")

    writer = PseudoLabelWriter(root, SRC, STAGE, shard_size=SHARD, config="cfg-a", num_images=N, resume=True)
    assert writer.completed_shards() == [0]
    assert not os.path.exists(os.path.join(shard_dir, "shard-00001.jsonl.gz"))
    assert not os.path.exists(os.path.join(shard_dir, "shard-00001.json"))
    with pytest.raises(UserError, match=r"incomplete: shards \[1, 2\] of 3 are missing.*--resume"):
        PseudoLabelReader(root, SRC, STAGE)

    computed = []
    _write(root, resume=True, computed=computed).finalize()
    assert computed == [3, 4, 5, 6, 7]  # shard 0 was not recomputed
    assert not glob.glob(os.path.join(root, "**", ".*.tmp"), recursive=True)
    assert _tree(root) == _tree(store)  # byte for byte the uninterrupted run

    computed = []
    _write(root, resume=True, computed=computed)
    assert computed == []  # everything complete: nothing to redo


def test_checksum_mismatch_names_the_shard_and_resume_repairs_it(store, tmp_path):
    root = str(tmp_path / "corrupt")
    _write(root).finalize()
    path = os.path.join(root, SRC, STAGE, "shards", "shard-00001.jsonl.gz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    open(path, "wb").write(bytes(data))

    reader = PseudoLabelReader(root, SRC, STAGE)
    with pytest.raises(CorruptShardError) as err:
        list(reader)
    message = str(err.value)
    assert path in message and "delete it and rerun make_pseudo_labels.py with --resume" in message
    with pytest.raises(CorruptShardError, match="shard-00001"):
        reader.get_by_index(3)
    assert reader.get_by_index(0) is not None  # other shards stay readable

    computed = []
    writer = _write(root, resume=True, computed=computed)
    assert computed == [3, 4, 5]
    writer.finalize()
    assert _tree(root) == _tree(store)


def test_writer_refuses_mixed_configs_and_half_shards(store, tmp_path):
    with pytest.raises(ConfigError, match="different config.*without --resume"):
        PseudoLabelWriter(store, SRC, STAGE, shard_size=SHARD, config="cfg-b", num_images=N, resume=True)
    with pytest.raises(ConfigError, match="shard_size=3"):
        PseudoLabelWriter(store, SRC, STAGE, shard_size=5, config="cfg-a", num_images=N, resume=True)
    writer = PseudoLabelWriter(str(tmp_path), SRC, STAGE, shard_size=SHARD, num_images=N)
    writer.add(0, RECORDS[0])
    with pytest.raises(ValueError, match="shard 0 is incomplete \\(1 of 3"):
        writer.add(3, RECORDS[3])
    writer.add(1, RECORDS[1])
    with pytest.raises(ValueError, match="shard 0 is incomplete"):
        writer.close()
    assert writer.completed_shards() == []
    bad = dict(RECORDS[0], height=99)
    with pytest.raises(ValueError, match="image_id=0.*size \\[12, 16\\].*\\[99, 16\\]"):
        writer.write_shard(0, [(0, bad)])


def test_missing_store_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as err:
        PseudoLabelReader(missing, SRC, STAGE)
    assert os.path.join(missing, SRC, STAGE) in str(err.value) and "make_pseudo_labels.py" in str(err.value)
    name = pl.register_pseudo_label_dataset("missing_pseudo_test", missing, SRC, STAGE)  # lazy: no error yet
    try:
        with pytest.raises(DatasetNotFoundError):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registered_dataset_loads_through_the_catalog(store):
    name = pl.register_pseudo_label_dataset(
        "synthetic_pseudo_test", store, SRC, STAGE, metadata_from="toyparts_parts_train"
    )
    try:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["part"] and meta.evaluator_type == "coco" and meta.pseudo_label_root == store
        dicts = DatasetCatalog.get(name)
        assert [d["image_id"] for d in dicts] == [r["image_id"] for r in RECORDS if r]
        for d, ref in zip(dicts, [r for r in RECORDS if r]):
            parts = [(j, p) for j, o in enumerate(ref["objects"]) for p in o["parts"]]
            assert len(d["annotations"]) == len(parts) and len(d["objects"]) == len(ref["objects"])
            for ann, (j, part) in zip(d["annotations"], parts):
                mask = decode_mask(ann["segmentation"])
                assert np.array_equal(mask, decode_mask(part["segmentation"]))
                assert ann["object_id"] == j and ann["score"] == part["score"]
                assert ann["category_id"] == part.get("part_class", 0)
                if mask.any():
                    ys, xs = np.nonzero(mask)
                    assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    names = pl.register_all_pseudo_label_datasets(store)
    assert names == [f"{SRC}_pseudo_{STAGE}"]
    assert len(DatasetCatalog.get(names[0])) == len(dicts)
    DatasetCatalog.remove(names[0])
    MetadataCatalog.remove(names[0])


# ------------------------------------------------------------------------------------------
# Mapper, on real toyparts images with their ground-truth parts written as pseudo-labels
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toyparts_store(datasets_root, tmp_path_factory):
    objects = DatasetCatalog.get("toyparts_train")
    parts = DatasetCatalog.get("toyparts_parts_train")
    root = str(tmp_path_factory.mktemp("toy_store"))
    writer = PseudoLabelWriter(root, "toyparts_train", "gt", shard_size=5, num_images=len(objects))
    for index, (obj_rec, part_rec) in enumerate(zip(objects, parts)):
        objs = [
            make_object(
                o["segmentation"],
                [
                    make_part(p["segmentation"], 0.5, p["category_id"])
                    for p in part_rec["annotations"]
                    if p["object_id"] == o["object_id"]
                ],
                category_id=o["category_id"],
            )
            for o in obj_rec["annotations"]
        ]
        record = {k: obj_rec[k] for k in ("image_id", "file_name", "height", "width", "class_code")}
        writer.add(index, dict(record, objects=objs))
    writer.finalize()
    name = pl.register_pseudo_label_dataset("toyparts_train_pseudo_gt", root, "toyparts_train", "gt", "toyparts_train")
    yield root, DatasetCatalog.get(name)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _identity_mapper(size, **kwargs):
    augs = [T.ResizeScale(1.0, 1.0, size, size), T.FixedSizeCrop((size, size), seg_pad_value=0)]
    return PseudoLabelDatasetMapper(is_train=True, augmentations=augs, image_format="RGB", **kwargs)


def test_mapper_keeps_parts_and_objects_aligned(toyparts_store):
    _, dicts = toyparts_store
    record = dicts[0]
    size = record["height"]
    out = _identity_mapper(size, min_part_area_ratio=0.0)(record)
    inst, objects = out["instances"], out["object_masks"]
    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.uint8
    assert inst.gt_masks.dtype == torch.bool and objects.dtype == torch.bool
    assert len(inst) == len(record["annotations"]) and len(objects) == len(record["objects"])
    assert inst.gt_classes.tolist() == [0] * len(inst)
    for mask, ann in zip(inst.gt_masks, record["annotations"]):
        assert np.array_equal(mask.numpy(), decode_mask(ann["segmentation"]))
    for mask, obj in zip(objects, record["objects"]):
        assert np.array_equal(mask.numpy(), decode_mask(obj["segmentation"]))
    owner = objects[inst.gt_object_index]
    assert not (inst.gt_masks & ~owner).any()  # every part lies inside its object

    with_classes = _identity_mapper(size, min_part_area_ratio=0.0, use_part_classes=True)(record)
    assert with_classes["instances"].gt_classes.tolist() == [a["part_class"] for a in record["annotations"]]

    flipped = PseudoLabelDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB", min_part_area_ratio=0.0
    )(record)
    assert torch.equal(flipped["instances"].gt_masks, inst.gt_masks.flip(-1))
    assert torch.equal(flipped["object_masks"], objects.flip(-1))
    assert torch.equal(flipped["image"], out["image"].flip(-1))

    agnostic = dict(
        record, annotations=[{k: v for k, v in a.items() if k != "part_class"} for a in record["annotations"]]
    )
    with pytest.raises(ConfigError, match="USE_PART_CLASSES.*without part_class"):
        _identity_mapper(size, use_part_classes=True)(agnostic)
    assert _identity_mapper(size)(dict(record, annotations=[], objects=[])) is None


def test_mapper_filters_small_parts_relative_to_their_object(toyparts_store):
    _, dicts = toyparts_store
    record = max(dicts, key=lambda d: len(d["annotations"]))
    areas = {o["object_id"]: decode_mask(o["segmentation"]).sum() for o in record["objects"]}
    ratios = [decode_mask(a["segmentation"]).sum() / areas[a["object_id"]] for a in record["annotations"]]
    threshold = float(np.median(ratios))
    out = _identity_mapper(record["height"], min_part_area_ratio=threshold)(record)
    expected = [i for i, r in enumerate(ratios) if r > threshold]
    assert 0 < len(expected) < len(ratios)
    assert len(out["instances"]) == len(expected)
    for mask, i in zip(out["instances"].gt_masks, expected):
        assert np.array_equal(mask.numpy(), decode_mask(record["annotations"][i]["segmentation"]))
    kept_objects = sorted({record["annotations"][i]["object_id"] for i in expected})
    assert len(out["object_masks"]) == len(kept_objects)
    # nothing survives an impossible threshold: the image is skipped after the retries
    assert _identity_mapper(record["height"], min_part_area_ratio=1.0, max_retries=1)(record) is None


def test_mapper_resizes_the_image_to_the_labels_resolution_and_reads_the_config(toyparts_store, quick_cfg):
    _, dicts = toyparts_store
    record = dict(dicts[0])
    half = record["height"] // 2
    small = lambda rle: encode_mask(decode_mask(rle)[::2, ::2])  # noqa: E731
    record.update(height=half, width=record["width"] // 2)
    record["annotations"] = [dict(a, segmentation=small(a["segmentation"])) for a in record["annotations"]]
    record["objects"] = [dict(o, segmentation=small(o["segmentation"])) for o in record["objects"]]
    out = _identity_mapper(half, min_part_area_ratio=0.0)(record)
    assert out["image"].shape == (3, half, half) and out["instances"].gt_masks.shape[1:] == (half, half)

    mapper = PseudoLabelDatasetMapper(quick_cfg(), is_train=True)
    assert mapper.use_part_classes is False and mapper.min_part_area_ratio == 0.05
    test_out = PseudoLabelDatasetMapper(quick_cfg(), is_train=False)(dicts[0])
    assert "instances" not in test_out and "annotations" not in test_out and "objects" not in test_out
    cfg = quick_cfg()
    from detectron2.config import CfgNode

    cfg.INPUT.PSEUDO_LABELS = CfgNode({"USE_PART_CLASSES": True, "MIN_PART_AREA_RATIO": 0.01})
    mapper = PseudoLabelDatasetMapper(cfg, is_train=True)
    assert mapper.use_part_classes is True and mapper.min_part_area_ratio == 0.01


def test_inspect_tool_prints_counts_and_writes_overlays(toyparts_store, tmp_path, capsys, repo_script):
    root, dicts = toyparts_store
    tool = repo_script("tools/inspect_pseudo_labels.py")
    out_dir = str(tmp_path / "vis")
    stats = tool.main(["--root", root, "--source", "toyparts_train", "--stage", "gt", "--vis", "3", "--out", out_dir])
    printed = capsys.readouterr().out
    assert stats["images"] == len(dicts) and stats["parts"] == sum(len(d["annotations"]) for d in dicts)
    assert "part/object area ratio median" in printed and "object category_id" in printed
    pngs = sorted(glob.glob(os.path.join(out_dir, "*.png")))
    assert len(pngs) == 3 and not glob.glob(os.path.join(out_dir, ".*"))
    import cv2

    assert cv2.imread(pngs[0]).shape == (dicts[0]["height"], dicts[0]["width"], 3)
