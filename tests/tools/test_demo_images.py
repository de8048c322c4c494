"""demo/demo.py + PartPredictor on scikit-image's real photographs (stage-1 pixel grouping, no trained weights)."""

import json
import os

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT
from pycocotools import mask as mask_util

FAST = ["INPUT.IMAGE_SIZE", "256", "MODEL.PIXEL_GROUPING.KMEANS_N_INIT", "2", "MODEL.PIXEL_GROUPING.CRF.NUM_ITERS", "3"]


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """chelsea (cat), astronaut and coffee as PNG files, and a COCO JSON with objects for two of them."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    images = {"chelsea": skdata.chelsea(), "astronaut": skdata.astronaut(), "coffee": skdata.coffee()}
    for name, rgb in images.items():
        cv2.imwrite(str(root / f"{name}.png"), rgb[:, :, ::-1])
    h, w = images["chelsea"].shape[:2]
    cat = _ellipse(h, w, 150, 200, 150, 170)  # the cat's head
    h2, w2 = images["coffee"].shape[:2]
    cup = _ellipse(h2, w2, 190, 290, 150, 210)  # cup and saucer
    saucer_spoon = np.zeros((h2, w2), bool)
    saucer_spoon[300:390, 60:560] = True
    coco = {
        "images": [
            {"id": 1, "file_name": "chelsea.png", "height": h, "width": w},
            {"id": 2, "file_name": "coffee.png", "height": h2, "width": w2},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "cup"}],
        "annotations": [],
    }
    masks = {"chelsea": [cat], "coffee": [cup, saucer_spoon & ~cup]}
    for image_id, name, cat_id in ((1, "chelsea", 3), (2, "coffee", 7)):
        for m in masks[name]:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            coco["annotations"].append({"image_id": image_id, "category_id": cat_id, "segmentation": rle})
    with open(root / "objects.json", "w") as f:
        json.dump(coco, f)
    return root, images, masks


def test_demo_on_real_photos(photos, tmp_path, repo_script):
    root, images, given = photos
    demo = repo_script("demo/demo.py")
    out = tmp_path / "out"
    result = demo.main(
        [
            "--input",
            str(root / "chelsea.png"),
            str(root / "coffee.png"),
            str(root / "astro*.png"),
            "--output",
            str(out),
            "--object-masks",
            str(root / "objects.json"),
            "--opts",
            *FAST,
        ]
    )
    with open(out / "predictions.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert [os.path.basename(r["file_name"]) for r in saved["images"]] == ["chelsea.png", "coffee.png", "astronaut.png"]
    for record in saved["images"]:
        name = os.path.splitext(os.path.basename(record["file_name"]))[0]
        photo_bgr = images[name][:, :, ::-1].astype(np.float32)
        picture = cv2.imread(str(out / record["visualization"]), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] >= photo_bgr.shape[0] and picture.shape[1] > photo_bgr.shape[1]
        # objects: the given ones (stated), or the whole image when the JSON lacks the photo
        if name in given:
            assert (
                record["object_source"].startswith("given object masks") and "objects.json" in record["object_source"]
            )
            assert len(record["objects"]) == len(given[name])
            for obj, m in zip(record["objects"], given[name]):
                decoded = mask_util.decode(obj["segmentation"]).astype(bool)
                assert (decoded & m).sum() / (decoded | m).sum() > 0.97
            assert {o["category_name"] for o in record["objects"]} == {"cat" if name == "chelsea" else "cup"}
        else:
            assert record["object_source"] == "whole image as one object"
            assert len(record["objects"]) == 1 and mask_util.decode(record["objects"][0]["segmentation"]).all()
        # parts: K = 4 segments per object (a real photo has texture everywhere), every one inside its object
        assert len(record["parts"]) >= 2 * len(record["objects"])
        colors = {e["label"]: np.array(e["color"][::-1], np.float32) for e in record["legend"]}
        assert set(colors) == {p["label"] for p in record["parts"]}
        kernel = np.ones((7, 7), np.uint8)
        contours = np.zeros(photo_bgr.shape[:2], bool)  # object contours are drawn over the parts
        for obj in record["objects"]:
            om = mask_util.decode(obj["segmentation"])
            contours |= cv2.dilate(om, kernel).astype(bool) & ~cv2.erode(om, kernel, borderValue=0).astype(bool)
        for part in record["parts"]:
            pm = mask_util.decode(part["segmentation"]).astype(bool)
            om = mask_util.decode(record["objects"][part["object_id"]]["segmentation"]).astype(bool)
            assert pm.any() and not (pm & ~om).any()
            # the part is painted in its legend colour: (1 - a) * photo + a * colour inside it (away from contours)
            inner = cv2.erode(pm.astype(np.uint8), kernel).astype(bool) & ~contours
            if inner.sum() < 50:
                continue
            expected = 0.45 * photo_bgr[inner] + 0.55 * colors[part["label"]]
            assert np.abs(picture[: pm.shape[0], : pm.shape[1]][inner] - expected).mean() < 2.0
        # each legend swatch is drawn in exactly its colour, right of the photo
        legend_area = picture[:, photo_bgr.shape[1] :].reshape(-1, 3)
        for bgr in colors.values():
            assert (legend_area == bgr.astype(np.uint8)).all(1).sum() >= 100


def test_predictor_whole_image_and_errors(photos, tmp_path, repo_script):
    from part_distillation.engine import PartPredictor, load_cfg
    from part_distillation.utils.errors import ConfigError, UserError

    root, images, _ = photos
    cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "demo", "pixel_grouping_lite0.yaml"), FAST)
    predictor = PartPredictor(cfg)
    bgr = np.ascontiguousarray(images["chelsea"][::2, ::2, ::-1])
    out = predictor(bgr)
    assert out["object_source"] == "whole image as one object" and out["class_agnostic"]
    parts = out["parts"]
    assert parts.image_size == bgr.shape[:2] and 2 <= len(parts) <= 4
    assert parts.pred_masks.sum(0).max() <= 1  # segments of one object are disjoint
    # trained stages need weights: a one-line error saying what to add
    stage2 = load_cfg(os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml"))
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS"):
        PartPredictor(stage2)
    demo = repo_script("demo/demo.py")
    with pytest.raises(UserError, match="nothing-here"):
        demo.main(["--input", str(root / "nothing-here*.jpg"), "--output", str(tmp_path / "o")])


def test_stage4_model_on_photos_then_collages(photos, tmp_path, repo_script):
    """A (randomly initialised) stage-4 model: parts get part classes per object class, the legend names them,
    and its predictions.json feeds tools/make_collages.py."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from part_distillation.engine import load_cfg

    root, _, _ = photos
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml")
    small = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_cfg(config, small)), str(tmp_path)).save("stage4")
    # the JSON's category ids (3: cat, 7: cup) must be object classes of the model (5 here): remap to 3 and 1
    with open(root / "objects.json") as f:
        coco = json.load(f)
    for ann in coco["annotations"]:
        ann["category_id"] = {3: 3, 7: 1}[ann["category_id"]]
    coco["categories"] = [{"id": 3, "name": "cat"}, {"id": 1, "name": "cup"}]
    with open(tmp_path / "objects.json", "w") as f:
        json.dump(coco, f)
    out = tmp_path / "out"
    result = repo_script("demo/demo.py").main(
        [
            "--config-file",
            config,
            "--input",
            str(root / "chelsea.png"),
            str(root / "coffee.png"),
            "--output",
            str(out),
            "--object-masks",
            str(tmp_path / "objects.json"),
            "--opts",
            *small,
            "MODEL.WEIGHTS",
            str(tmp_path / "stage4.pth"),
        ]
    )
    for record in result["images"]:
        assert not record["class_agnostic"] and record["parts"]
        for part in record["parts"]:
            assert part["label"] == f"part {part['part_class']}" and 0 <= part["part_class"] < 8
            pm = mask_util.decode(part["segmentation"]).astype(bool)
            om = mask_util.decode(record["objects"][part["object_id"]]["segmentation"]).astype(bool)
            assert not (pm & ~om).any()
        assert {e["label"] for e in record["legend"]} == {p["label"] for p in record["parts"]}
    collages = repo_script("tools/make_collages.py").main(
        ["--predictions", str(out / "predictions.json"), "--output", str(tmp_path / "collages"), "--tile-size", "32"]
    )
    n_keys = len(
        {(r["objects"][p["object_id"]]["category_id"], p["part_class"]) for r in result["images"] for p in r["parts"]}
    )
    assert collages["collages"] == n_keys and collages["classes"] == 2
    assert "cat (id 3)" in (tmp_path / "collages" / "index.html").read_text()


def test_object_model_source(photos, tmp_path):
    """Objects found by the config's object model (a stage-0 Mask2Former checkpoint, untrained here) are used and
    stated; without weights the object model is refused (its masks would be random)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from part_distillation.engine import PartPredictor, load_cfg
    from part_distillation.utils.errors import ConfigError

    _, images, _ = photos
    stage0 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage0_instance_toyparts.yaml")
    demo = os.path.join(REPO_ROOT, "configs", "demo", "pixel_grouping_lite0.yaml")
    model_opts = [
        "MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE",
        "model",
        "MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG",
        stage0,
    ]
    with pytest.raises(ConfigError, match="OBJECT_MODEL_WEIGHTS"):
        PartPredictor(load_cfg(demo, FAST + model_opts))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_cfg(stage0)), str(tmp_path)).save("stage0")
    cfg = load_cfg(
        demo,
        FAST
        + model_opts
        + [
            "MODEL.PIXEL_GROUPING.OBJECT_MODEL_WEIGHTS",
            str(tmp_path / "stage0.pth"),
            "MODEL.PIXEL_GROUPING.OBJECT_SCORE_THRESH",
            "0.0",
            "MODEL.PIXEL_GROUPING.OBJECT_TOPK",
            "2",
            "MODEL.PIXEL_GROUPING.OBJECT_MIN_AREA_RATIO",
            "0.01",
        ],
    )
    out = PartPredictor(cfg)(np.ascontiguousarray(images["coffee"][::2, ::2, ::-1]))
    assert out["object_source"] == "object model"
    objects, parts = out["objects"], out["parts"]
    assert 1 <= len(objects) <= 2 and len(parts) >= len(objects)
    for m, j in zip(parts.pred_masks, parts.object_index.tolist()):
        assert m.any() and not (m & ~objects.pred_masks[j]).any()


def test_stage2_proposals_go_to_their_objects(photos, tmp_path):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from part_distillation.engine import PartPredictor, load_cfg

    _, images, given = photos
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")
    small = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_cfg(config, small)), str(tmp_path)).save("stage2")
    predictor = PartPredictor(load_cfg(config, small + ["MODEL.WEIGHTS", str(tmp_path / "stage2.pth")]))
    masks = np.stack(given["coffee"])
    out = predictor(np.ascontiguousarray(images["coffee"][:, :, ::-1]), object_masks=masks, object_classes=[7, 7])
    assert out["class_agnostic"] and out["object_source"] == "given object masks"
    assert (out["objects"].pred_masks.numpy() == masks).all() and out["objects"].pred_classes.tolist() == [7, 7]
    parts = out["parts"]
    assert len(parts) > 0 and set(parts.pred_classes.tolist()) == {0}
    for m, j in zip(parts.pred_masks, parts.object_index.tolist()):
        assert m.any() and not (m & ~torch.from_numpy(masks[j])).any()


def test_one_stage_labels_need_prototypes_and_give_part_classes(photos, tmp_path):
    import torch

    from part_distillation.engine import PartPredictor, load_cfg
    from part_distillation.utils.errors import ConfigError

    _, images, given = photos
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "onestage_grouping_toyparts.yaml")
    with pytest.raises(ConfigError, match="ONE_STAGE.PROTOTYPES"):
        PartPredictor(load_cfg(config, FAST))
    # 5 object classes × 8 prototypes of the res3+res4 features (40 + 112 channels), drawn at random
    torch.manual_seed(0)
    torch.save({"prototypes": torch.randn(5, 8, 152), "num_clusters": torch.full((5,), 8)}, tmp_path / "protos.pth")
    predictor = PartPredictor(load_cfg(config, FAST + ["MODEL.ONE_STAGE.PROTOTYPES", str(tmp_path / "protos.pth")]))
    out = predictor(
        np.ascontiguousarray(images["chelsea"][:, :, ::-1]), object_masks=np.stack(given["chelsea"]), object_classes=[3]
    )
    parts = out["parts"]
    assert not out["class_agnostic"] and len(parts) >= 2 and parts.pred_classes.max() < 8
    assert len(set(parts.pred_classes.tolist())) == len(parts)  # one part per prototype used in the object
