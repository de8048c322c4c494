"""Mapper registry and the LSJ instance mapper on toyparts."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from part_distillation.data import build_detection_train_loader
from part_distillation.data.dataset_mappers import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from part_distillation.evaluation import build_evaluator
from part_distillation.utils.errors import ConfigError


def test_registry_lookup_and_unknown_name(quick_cfg):
    cfg = quick_cfg()
    assert "InstanceLSJDatasetMapper" in DATASET_MAPPER_REGISTRY
    cfg.INPUT.DATASET_MAPPER_NAME = "NoSuchMapper"
    with pytest.raises(ConfigError, match="INPUT.DATASET_MAPPER_NAME='NoSuchMapper'.*InstanceLSJDatasetMapper"):
        build_dataset_mapper(cfg, is_train=True)


def test_unregistered_dataset_is_named(quick_cfg):
    cfg = quick_cfg()
    cfg.DATASETS.TRAIN = ("toyparts_trian",)
    with pytest.raises(ConfigError, match="toyparts_trian.*Did you mean: toyparts_train"):
        build_detection_train_loader(cfg)


def test_dataset_without_evaluator_type(quick_cfg):
    from detectron2.data import MetadataCatalog

    DatasetCatalog.register("no_eval_type_ds", lambda: [])
    MetadataCatalog.get("no_eval_type_ds").set(thing_classes=["a"])
    with pytest.raises(ConfigError, match="evaluator_type"):
        build_evaluator(quick_cfg(), "no_eval_type_ds")


def test_lsj_train_mapping_keeps_masks_aligned(quick_cfg):
    cfg = quick_cfg()
    cfg.INPUT.RANDOM_FLIP_PROB = 0.0
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 1.0  # identity resize: masks must still match the GT
    mapper = build_dataset_mapper(cfg, is_train=True)
    record = DatasetCatalog.get("toyparts_train")[0]
    out = mapper(record)
    size = cfg.INPUT.IMAGE_SIZE
    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.uint8
    inst = out["instances"]
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape[1:] == (size, size)
    assert len(inst) == len(record["annotations"])
    assert inst.gt_classes.tolist() == [a["category_id"] for a in record["annotations"]]
    from pycocotools import mask as mask_util

    for m, ann in zip(inst.gt_masks, record["annotations"]):
        gt = mask_util.decode(ann["segmentation"]).astype(bool)
        assert np.array_equal(m.numpy(), gt)


def test_lsj_flip_and_scale_transform_masks_with_image(quick_cfg):
    cfg = quick_cfg()
    cfg.INPUT.RANDOM_FLIP_PROB = 1.0
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 0.5  # shrink: object must sit in the top-left quarter
    mapper = build_dataset_mapper(cfg, is_train=True)
    record = DatasetCatalog.get("toyparts_train")[0]
    out = mapper(record)
    masks = out["instances"].gt_masks
    half = cfg.INPUT.IMAGE_SIZE // 2
    assert not masks[:, half:, :].any() and not masks[:, :, half:].any()  # padding is background
    from pycocotools import mask as mask_util

    gt = mask_util.decode(record["annotations"][0]["segmentation"]).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(gt[None, None, :, ::-1].copy()), size=(half, half))
    agreement = (masks[0, :half, :half].float() == expected[0, 0]).float().mean()
    assert agreement > 0.97


def test_lsj_test_mapping_drops_annotations_and_resizes(quick_cfg):
    cfg = quick_cfg()
    mapper = build_dataset_mapper(cfg, is_train=False)
    record = DatasetCatalog.get("toyparts_val")[0]
    out = mapper(record)
    assert "annotations" not in out and "instances" not in out
    assert min(out["image"].shape[1:]) == cfg.INPUT.MIN_SIZE_TEST
    assert (out["height"], out["width"]) == (record["height"], record["width"])


def test_unreadable_image_is_skipped(quick_cfg, tmp_path, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    mapper = build_dataset_mapper(quick_cfg(), is_train=True)
    record = {"file_name": str(bad), "height": 10, "width": 10, "image_id": 0, "annotations": []}
    assert mapper(record) is None
    assert "broken.jpg" in caplog.text
