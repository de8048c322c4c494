"""PixelGroupingModel: grouping semantics, object filtering, and every object-mask source."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.engine import load_cfg
from part_distillation.modeling.meta_arch.object_source import filter_objects
from part_distillation.modeling.meta_arch.pixel_grouping import group_pixels
from part_distillation.utils.errors import ConfigError

from conftest import QUICK_STAGE0, REPO_ROOT

STAGE1 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage1_pixel_grouping_toyparts.yaml")


def _cfg(*opts):
    return load_cfg(STAGE1, ["INPUT.IMAGE_SIZE", "128", "MODEL.PIXEL_GROUPING.KMEANS_N_INIT", "3", *opts])


def _run(cfg, n=3):
    model = build_model(cfg).eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    records = DatasetCatalog.get("toyparts_val")[:n]
    return records, model([mapper(r) for r in records])


def test_group_pixels_two_textures():
    """Two feature clusters inside one object give two segments that follow them; outside stays 0."""
    feats = torch.zeros(1, 2, 8, 8)
    feats[0, 0, :, :4] = 1.0
    feats[0, 1, :, 4:] = 1.0
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 4:28, 4:28] = True
    labels, k = group_pixels(
        feats, mask, torch.tensor([0]), 2, "dot", {"n_init": 3, "max_iter": 50, "tol": 1e-4, "seed": 0}
    )
    assert k.tolist() == [2]
    assert (labels[0][~mask[0]] == 0).all()
    left, right = labels[0, 10, 6], labels[0, 10, 25]
    assert {int(left), int(right)} == {1, 2}
    assert (labels[0, 4:28, 4:14] == left).all() and (labels[0, 4:28, 18:28] == right).all()


def test_upsampled_window_equals_the_full_upsampling():
    """group_pixels upsamples only the cells around each box; the values are the full map's."""
    import torch.nn.functional as F

    from part_distillation.modeling.meta_arch.pixel_grouping import _upsampled_window

    sim = torch.randn(4, 10, 12, generator=torch.Generator().manual_seed(0))
    full = F.interpolate(sim[None], size=(80, 96), mode="bilinear", align_corners=False)[0]
    for y0, y1, x0, x1 in [(0, 80, 0, 96), (3, 9, 50, 51), (17, 64, 8, 95), (79, 80, 0, 5), (40, 41, 40, 41)]:
        window, (oy, ox) = _upsampled_window(sim, (y0, y1, x0, x1), (80, 96))
        torch.testing.assert_close(
            window[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox], full[:, y0:y1, x0:x1], rtol=0, atol=1e-6
        )
    window, offset = _upsampled_window(sim, (3, 9, 50, 51), (77, 96))  # not a multiple of the grid: full map
    assert offset == (0, 0)
    torch.testing.assert_close(window, F.interpolate(sim[None], size=(77, 96), mode="bilinear", align_corners=False)[0])


def test_filter_objects():
    inst = Instances((10, 10))
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :5, :5] = True  # area 0.25
    masks[1, :1, :1] = True  # area 0.01
    masks[2, :, :] = True
    inst.gt_masks, inst.scores, inst.gt_classes = masks, torch.tensor([0.9, 0.95, 0.3]), torch.tensor([0, 1, 2])
    out = filter_objects(inst, score_thresh=0.5, min_area_ratio=0.05, topk=5)
    assert out.gt_classes.tolist() == [0]
    out = filter_objects(inst, score_thresh=0.0, min_area_ratio=0.0, topk=2)
    assert out.gt_classes.tolist() == [1, 0]  # best score first, top-2


def test_gt_source_parts_partition_objects(datasets_root):
    records, outputs = _run(_cfg())
    for record, out in zip(records, outputs):
        objects, parts = out["instances"], out["part_instances"]
        assert objects.image_size == (record["height"], record["width"])
        assert len(objects) == len(record["annotations"])
        for j in range(len(objects)):
            mine = parts.pred_masks[parts.object_index == j]
            assert 1 <= len(mine) <= 4
            assert (mine.sum(0) <= 1).all(), "parts of one object overlap"
            assert not (mine.any(0) & ~objects.pred_masks[j]).any(), "a part leaks outside its object"


def test_json_source(datasets_root, tmp_path):
    results = []
    for r in DatasetCatalog.get("toyparts_val")[:3]:
        for a in r["annotations"][:1]:  # one object per image in the "detector" output
            results.append(
                {
                    "image_id": r["image_id"],
                    "category_id": a["category_id"],
                    "segmentation": a["segmentation"],
                    "score": 0.9,
                }
            )
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(results))
    records, outputs = _run(
        _cfg("MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE", "json", "MODEL.PIXEL_GROUPING.OBJECT_MASKS_JSON", str(path))
    )
    for r, out in zip(records, outputs):
        assert len(out["instances"]) == 1
        gt = mask_util.decode(r["annotations"][0]["segmentation"]).astype(bool)
        assert np.array_equal(out["instances"].pred_masks[0].numpy(), gt)


def test_bad_json_source_is_a_config_error(datasets_root, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="OBJECT_MASKS_JSON|COCO results"):
        _run(
            _cfg("MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE", "json", "MODEL.PIXEL_GROUPING.OBJECT_MASKS_JSON", str(path))
        )


def test_model_source_uses_a_stage0_checkpoint(datasets_root, tmp_path):
    stage0 = load_cfg(QUICK_STAGE0, ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5", "TEST.DETECTIONS_PER_IMAGE", "5"])
    weights = str(tmp_path / "stage0.pth")
    DetectionCheckpointer(build_model(stage0), save_dir=str(tmp_path)).save("stage0")
    cfg_file = tmp_path / "stage0.yaml"
    cfg_file.write_text(stage0.dump())
    cfg = _cfg(
        "MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE",
        "model",
        "MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG",
        str(cfg_file),
        "MODEL.PIXEL_GROUPING.OBJECT_MODEL_WEIGHTS",
        weights,
        "MODEL.PIXEL_GROUPING.OBJECT_SCORE_THRESH",
        "0.0",
        "MODEL.PIXEL_GROUPING.OBJECT_MIN_AREA_RATIO",
        "0.0",
        "MODEL.PIXEL_GROUPING.OBJECT_TOPK",
        "2",
    )
    _, outputs = _run(cfg, n=2)
    for out in outputs:
        assert len(out["instances"]) <= 2  # top-k of the detector's (untrained) instances
        assert (out["part_instances"].object_index < len(out["instances"])).all()


def test_detic_source_without_package_names_the_extra(datasets_root):
    try:
        import detic  # noqa: F401

        pytest.skip("Detic is installed here")
    except ImportError:
        pass
    cfg = _cfg("MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE", "detic", "MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG", "x.yaml")
    with pytest.raises(ConfigError, match="WITH_DETIC=1 make setup"):
        build_model(cfg)
