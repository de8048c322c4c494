"""Supervised and few-shot baselines on the stage-4 model: GT parts → within-object part classes (data/gt_parts.py),
PartSupervisedDatasetMapper, the DATASETS.TRAIN_LABEL_PERCENTAGE subset, part mIoU mode "within_object" on a
hand-computed case, and both quick schedules training through the Trainer (few-shot from a stage-4 checkpoint)."""

import logging
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.data import build_detection_train_loader
from part_distillation.data.build import label_percentage_subset
from part_distillation.data.dataset_mappers import PartSupervisedDatasetMapper, build_dataset_mapper
from part_distillation.data.dataset_mappers.part_eval import decode_segmentation, group_parts_by_object
from part_distillation.data.datasets.toyparts_meta import TOYPARTS_PART_TO_OBJECT
from part_distillation.data.gt_parts import (
    gt_part_records,
    max_parts_per_object,
    object_part_lists,
    within_object_part_index,
)
from part_distillation.data.pseudo_labels import decode_mask
from part_distillation.engine import Trainer, load_cfg
from part_distillation.evaluation.part_miou import PartMIoUEvaluator
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, RecordLoss, register_records, tiny_quick_opts

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules")
SUPERVISED = os.path.join(QUICK, "supervised_toyparts.yaml")
FEWSHOT = os.path.join(QUICK, "fewshot_toyparts.yaml")
STAGE4 = os.path.join(QUICK, "stage4_distillation_toyparts.yaml")
TRAIN = "toyparts_parts_train"


# ------------------------------------------------------------------------------------------ GT parts


def test_within_object_tables_toyparts_and_shared_parts(datasets_root):
    meta = MetadataCatalog.get(TRAIN)
    index = within_object_part_index(meta)
    # toyparts: Quadruped 0-3, Car 4-6, Bird 7-10, Bottle 11-14, Fish 15-18
    assert index[0] == {0: 0} and index[5] == {1: 1} and index[6] == {1: 2} and index[18] == {4: 3}
    assert [list(d) for d in index] == [[o] for o in TOYPARTS_PART_TO_OBJECT]
    assert object_part_lists(meta)[1] == [4, 5, 6] and max_parts_per_object(meta) == 4
    # Pascal-Part-like shared parts: part 0 belongs to objects 0 and 1
    shared = [[0, 1], 0, [1], 1]
    assert object_part_lists(shared) == [[0, 1], [0, 2, 3]]
    assert within_object_part_index(shared) == [{0: 0, 1: 0}, {0: 1}, {1: 1}, {1: 2}]
    with pytest.raises(ConfigError, match="part_to_object"):
        within_object_part_index({"name": "no_parts", "object_classes": ["a"]})


def test_gt_part_records_on_toyparts(datasets_root):
    dicts = DatasetCatalog.get(TRAIN)
    meta = MetadataCatalog.get(TRAIN)
    records = gt_part_records(dicts, meta)
    assert len(records) == len(dicts) and all(r is not None for r in records)
    for source, record in zip(dicts, records):
        h, w = source["height"], source["width"]
        groups = group_parts_by_object(source)
        assert len(record["objects"]) == len(groups)
        for (_, _, members), obj in zip(groups, record["objects"]):
            owner = TOYPARTS_PART_TO_OBJECT[members[0]["category_id"]]
            first = TOYPARTS_PART_TO_OBJECT.index(owner)
            assert obj["category_id"] == owner
            expected = {}
            for part in members:  # same-category parts of one object are OR-ed
                mask = decode_segmentation(part["segmentation"], h, w)
                k = part["category_id"] - first
                expected[k] = expected[k] | mask if k in expected else mask
            got = {p["part_class"]: decode_mask(p["segmentation"]) for p in obj["parts"]}
            assert sorted(got) == sorted(k for k, m in expected.items() if m.any())
            assert all(np.array_equal(got[k], expected[k]) for k in got)
            assert np.array_equal(decode_mask(obj["segmentation"]), np.any(list(expected.values()), axis=0))
    # class-agnostic: no part_class; the metadata is still used for the object class when present
    agnostic = gt_part_records(dicts[:2], meta, part_classes=False)
    assert all("part_class" not in p for o in agnostic[0]["objects"] for p in o["parts"])
    assert [o["category_id"] for o in agnostic[0]["objects"]] == [o["category_id"] for o in records[0]["objects"]]
    assert {o["category_id"] for o in gt_part_records(dicts[:2], {}, part_classes=False)[0]["objects"]} == {-1}
    with pytest.raises(ConfigError, match="part_to_object"):
        gt_part_records(dicts[:1], {"name": "toyparts_no_meta"})
    # an image without parts has no record
    assert gt_part_records([dict(dicts[0], annotations=[])], meta) == [None]


# ------------------------------------------------------------------------------------------ mapper


def _cfg(tmp_path, config=SUPERVISED, max_iter=2, extra=()):
    return load_cfg(config, tiny_quick_opts(tmp_path / "out", max_iter) + list(extra))


def test_supervised_mapper_targets(datasets_root, tmp_path):
    cfg = _cfg(tmp_path)
    mapper = build_dataset_mapper(cfg, is_train=True)
    assert isinstance(mapper, PartSupervisedDatasetMapper) and mapper.min_part_area_ratio == 0.0
    torch.manual_seed(0)
    np.random.seed(0)
    seen = 0
    for record in DatasetCatalog.get(TRAIN)[:6]:
        out = mapper(record)
        inst = out["instances"]
        assert inst.gt_masks.shape[1:] == out["image"].shape[1:] == (128, 128)
        assert ((inst.gt_classes >= 0) & (inst.gt_classes < 4)).all()
        # every (object class, within-object index) is a GT part category of the record
        categories = {a["category_id"] for a in record["annotations"]}
        lists = object_part_lists(TOYPARTS_PART_TO_OBJECT)
        for o, k in zip(inst.gt_object_classes.tolist(), inst.gt_classes.tolist()):
            assert lists[o][k] in categories
        assert out["object_masks"].shape[0] == int(inst.gt_object_index.max()) + 1
        seen += len(inst)
    assert seen > 0
    with pytest.raises(ConfigError, match="NUM_PART_CLASSES"):
        build_dataset_mapper(_cfg(tmp_path, extra=["MODEL.PART_DISTILLATION.NUM_PART_CLASSES", "3"]), True)
    with pytest.raises(ConfigError, match="part_to_object"):
        MetadataCatalog.get("supervised_no_parts").set(thing_classes=["x"])
        build_dataset_mapper(_cfg(tmp_path, extra=["DATASETS.TRAIN", "('supervised_no_parts',)"]), True)


# ------------------------------------------------------------------------------------------ few-shot subset


def test_label_percentage_subset_deterministic_and_counts():
    dicts = [{"image_id": i} for i in range(200)]
    one = label_percentage_subset(dicts, 1.0, 1234)
    assert len(one) == 2 and one == label_percentage_subset(dicts, 1.0, 1234)
    # the reference: np.random.seed(1234); np.random.shuffle(list); keep the first floor(N·p/100)
    reference = list(dicts)
    np.random.seed(1234)
    np.random.shuffle(reference)
    for p, n in ((1.0, 2), (33.0, 66), (12.5, 25), (0.1, 1), (99.9, 199)):
        kept = label_percentage_subset(dicts, p, 1234)
        assert len(kept) == n and kept == reference[:n]
    assert label_percentage_subset(dicts, 100.0) == dicts
    assert label_percentage_subset(dicts, 5.0, seed=0) != label_percentage_subset(dicts, 5.0, seed=1234)
    for bad in (0.0, -1.0, 100.5, float("nan")):
        with pytest.raises(ConfigError, match="DATASETS.TRAIN_LABEL_PERCENTAGE"):
            label_percentage_subset(dicts, bad)


def test_train_loader_applies_the_percentage(datasets_root, tmp_path, caplog):
    cfg = _cfg(tmp_path, extra=["DATASETS.TRAIN_LABEL_PERCENTAGE", "50.0"])
    with caplog.at_level(logging.INFO, logger="part_distillation.data.build"):
        build_detection_train_loader(cfg)
    n = len(DatasetCatalog.get(TRAIN))
    assert f"kept {n // 2} of {n} images (50%)" in caplog.text
    with pytest.raises(ConfigError, match="DATASETS.TRAIN_LABEL_PERCENTAGE"):
        build_detection_train_loader(_cfg(tmp_path, extra=["DATASETS.TRAIN_LABEL_PERCENTAGE", "0.0"]))


# ------------------------------------------------------------------------------------------ evaluator

H, W = 4, 6


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_within_object_miou_hand_computed():
    """Parts: A = {0: "A head", 1: "A body"}, B = {2: "B x", 3: "B y"}. One image, object A left (cols 0-2),
    object B right (cols 3-5); predictions in within-object indices."""
    name = "within_object_miou_case"
    gt = {0: _box(0, 2, 0, 3), 1: _box(2, 4, 0, 3), 2: _box(0, 4, 3, 4), 3: _box(0, 4, 4, 6)}
    annotations = [
        {"segmentation": _rle(m), "category_id": c, "object_id": 10 if c < 2 else 20, "iscrowd": 0}
        for c, m in gt.items()
    ]
    records = [{"image_id": 0, "height": H, "width": W, "annotations": annotations}]
    register_records(
        name,
        records,
        part_classes=["A head", "A body", "B x", "B y"],
        object_classes=["A", "B"],
        part_to_object=[0, 0, 1, 1],
        is_part_dataset=True,
    )
    # A: index 0 (→ part 0) on rows 0-1 cols 0-1 (4 px, all head); index 1 (→ part 1) on rows 1-3 cols 0-2
    # (9 px: 3 head, 6 body), painted after index 0. B: index 1 (→ part 3, "B y") on rows 0-3 col 3 (4 px, all "B x"),
    # index 0
    #    (→ part 2) on rows 0-1 cols 4-5 (4 px, all "B y"), index 2 (B has no third part → background) on rows
    #    2-3 cols 4-5 (4 px of "B y").
    preds = [
        (_box(0, 2, 0, 2), 0, 0),
        (_box(1, 4, 0, 3), 1, 0),
        (_box(0, 4, 3, 4), 1, 1),
        (_box(0, 2, 4, 6), 0, 1),
        (_box(2, 4, 4, 6), 2, 1),
    ]
    parts = Instances((H, W))
    parts.pred_masks = torch.from_numpy(np.stack([m for m, _, _ in preds]))
    parts.pred_classes = torch.tensor([k for _, k, _ in preds])
    parts.object_index = torch.tensor([o for _, _, o in preds])
    ev = PartMIoUEvaluator(name, mode="within_object", distributed=False)
    ev.reset()
    ev.process([{"image_id": 0}], [{"part_instances": parts}])
    res = ev.evaluate()["part_miou_within_object"]
    # A: index 1 is painted last and takes row 1 from index 0: head tp 2, gt 6, pred 2 → 2/6; body tp 6, gt 6,
    # pred 9 (3 of them on the head) → 6/9.
    # B: "B x" tp 0, gt 4, pred 4 (the "B y" prediction) → 0; "B y" tp 0, gt 8, pred 4 → 0 (the index-2
    # pixels are background: misses, not predictions).
    miou_a, miou_b = (2 / 6 + 6 / 9) / 2, 0.0
    assert res["mIoU-A"] == pytest.approx(100 * miou_a) and res["mIoU-B"] == pytest.approx(100 * miou_b)
    assert res["C-mIoU"] == pytest.approx(100 * (miou_a + miou_b) / 2)
    assert res["A-mIoU"] == pytest.approx(100 * (2 / 6 + 6 / 9 + 0 + 0) / 4)
    assert res["IoU-A body"] == pytest.approx(100 * 6 / 9) and res["IoU-B y"] == 0.0
    # the same predictions in dataset part ids (index 2 of B dropped) score the same in mode "direct"
    direct = Instances((H, W))
    keep = [0, 1, 2, 3]
    direct.pred_masks = parts.pred_masks[keep]
    direct.pred_classes = torch.tensor([0, 1, 3, 2])
    direct.object_index = parts.object_index[keep]
    ev = PartMIoUEvaluator(name, mode="direct", distributed=False)
    ev.reset()
    ev.process([{"image_id": 0}], [{"part_instances": direct}])
    assert ev.evaluate()["part_miou_direct"]["C-mIoU"] == pytest.approx(res["C-mIoU"])


# ------------------------------------------------------------------------------------------ training


def test_supervised_quick_schedule_trains_and_evaluates(datasets_root, tmp_path):
    cfg = _cfg(tmp_path, max_iter=30)
    assert cfg.MODEL.META_ARCHITECTURE == "PartDistillationModel" and cfg.DATASETS.TRAIN == (TRAIN,)
    assert cfg.TEST.PART_MIOU.MODE == "within_object" and cfg.DATASETS.TEST == ("toyparts_parts_val",)
    trainer = Trainer(cfg)
    recorder = RecordLoss()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    with torch.jit.optimized_execution(False):
        trainer.train()
    first, last = np.mean(recorder.losses[:8]), np.mean(recorder.losses[-8:])
    assert len(recorder.losses) == 30 and last < 0.85 * first, (first, last)
    results = Trainer.test(cfg, trainer.model)["part_miou_within_object"]
    assert np.isfinite(results["C-mIoU"]) and results["num_object_classes"] == 5


def test_fewshot_loads_stage4_checkpoint_and_evaluates(datasets_root, tmp_path, caplog):
    stage4 = build_model(load_cfg(STAGE4, tiny_quick_opts(tmp_path / "s4", 1)))
    with torch.no_grad():
        for value in stage4.state_dict().values():
            if value.is_floating_point():
                value.add_(0.25)
    DetectionCheckpointer(stage4, save_dir=str(tmp_path)).save("stage4")
    weights = str(tmp_path / "stage4.pth")
    cfg = _cfg(
        tmp_path, FEWSHOT, max_iter=2, extra=["MODEL.WEIGHTS", weights, "DATASETS.TRAIN_LABEL_PERCENTAGE", "25.0"]
    )
    assert cfg.SOLVER.BASE_LR == pytest.approx(3e-5)
    with caplog.at_level(logging.INFO, logger="part_distillation.data.build"):
        trainer = Trainer(cfg)
    n = len(DatasetCatalog.get(TRAIN))
    assert f"kept {n // 4} of {n} images (25%)" in caplog.text
    trainer.resume_or_load(resume=False)
    ours, theirs = trainer.model.state_dict(), stage4.state_dict()
    name = "sem_seg_head.predictor.class_embed.weight"  # the objectness head: loaded
    assert torch.equal(ours[name], theirs[name])
    assert torch.equal(
        ours["sem_seg_head.predictor.query_feat.weight"], theirs["sem_seg_head.predictor.query_feat.weight"]
    )
    # the 5 × 8 stage-4 part classifier does not fit the 5 × 4 one: skipped by shape, restarts at random
    assert theirs["part_classifier.bias.weight"].shape == (5, 8) and ours["part_classifier.bias.weight"].shape == (5, 4)
    with torch.jit.optimized_execution(False):
        trainer.train()
    results = Trainer.test(cfg, trainer.model)["part_miou_within_object"]
    assert np.isfinite(results["C-mIoU"]) and results["num_objects"] > 0


def test_gt_records_name_a_part_category_outside_the_metadata(datasets_root):
    record = dict(DatasetCatalog.get("toyparts_parts_train")[0])
    record["annotations"] = [dict(record["annotations"][0], category_id=len(TOYPARTS_PART_TO_OBJECT))]
    with pytest.raises(ConfigError, match=r"part categories \[19\] are outside .* \(19 parts\)"):
        gt_part_records([record], list(TOYPARTS_PART_TO_OBJECT))
