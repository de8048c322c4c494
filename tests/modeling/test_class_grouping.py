"""ClassPixelGroupingModel (one-stage baseline labels, raw-RGB K-means baseline): sampling, a hand-built
two-colour case, the two passes through tools/rank_parts.py, and --eval-only with saved prototypes."""

import os
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.data.pseudo_labels import PseudoLabelReader
from part_distillation.engine import load_cfg
from part_distillation.clustering.prototypes import load_prototypes
from part_distillation.modeling.meta_arch.class_grouping import sample_object_cells
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import rank_parts  # noqa: E402
import train_net  # noqa: E402

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules")
CONFIG = os.path.join(QUICK, "onestage_grouping_toyparts.yaml")
RGB_CONFIG = os.path.join(QUICK, "onestage_grouping_toyparts_rgb.yaml")
SIZE = ["INPUT.IMAGE_SIZE", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]


def test_sample_object_cells_is_even_and_deterministic():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1:3, 1:4] = True  # flat cells 6, 7, 8, 11, 12, 13
    assert sample_object_cells(mask, 10).tolist() == [6, 7, 8, 11, 12, 13]
    assert sample_object_cells(mask, 3).tolist() == [6, 8, 13]  # linspace(0, 5, 3) = 0, 2.5→2, 5
    assert torch.equal(sample_object_cells(mask, 3), sample_object_cells(mask, 3))


def test_two_colours_become_two_class_prototypes():
    """Raw RGB, K = 2, no CRF: an object half red (top), half blue, is split at the colour edge in both passes
    (a 48×64 image, padded to 64×64 for the backbone: the padding must not shift the parts' features)."""
    cfg = load_cfg(RGB_CONFIG, ["MODEL.PART_RANKING.NUM_CLUSTERS", "2", "MODEL.PIXEL_GROUPING.CRF.ENABLED", "False"])
    model = build_model(cfg).eval()
    image = torch.zeros(3, 48, 64, dtype=torch.uint8)
    image[0, :24] = 255  # red top half
    image[2, 24:] = 255  # blue bottom half
    objects = Instances((48, 64))
    objects.gt_masks = torch.zeros(1, 48, 64, dtype=torch.bool)
    objects.gt_masks[0, 8:40, 8:56] = True
    objects.gt_classes = torch.tensor([3])
    inputs = [{"image": image, "objects": objects, "height": 48, "width": 64}]
    out = model(inputs)[0]
    feats = out["cluster_features"]["features"]
    assert out["cluster_features"]["object_index"].eq(0).all()
    assert feats.shape == (24, 6)  # res3+res4 RGB; the object covers 4×6 cells of the stride-8 grid
    red = feats[:, 0] > feats[:, 2]
    protos = torch.zeros(5, 2, 6)
    protos[3] = torch.stack([feats[red].mean(0), feats[~red].mean(0)])
    model.set_prototypes(protos, torch.tensor([0, 0, 0, 2, 0]))
    parts = model(inputs)[0]["part_instances"]
    assert parts.pred_classes.tolist() == [0, 1] and parts.object_index.tolist() == [0, 0]
    top, bottom = parts.pred_masks
    assert top[8:24, 8:56].all() and not top[24:].any() and bottom[24:40, 8:56].all() and not bottom[:24].any()
    assert torch.allclose(parts.features, protos[3], atol=1e-5)  # the parts' mean features are the prototypes
    assert torch.equal(parts.soft_scores.argmax(1), parts.pred_classes)
    # an object whose class has no prototypes gets no parts
    objects.gt_classes = torch.tensor([0])
    assert len(model(inputs)[0]["part_instances"]) == 0


@pytest.fixture(scope="module")
def onestage(datasets_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("onestage")
    args = rank_parts.parse_args(
        [
            "--config-file",
            CONFIG,
            "--stage",
            "onestage",
            "--shard-size",
            "5",
            "OUTPUT_DIR",
            str(base / "out"),
            "DATASETS.PSEUDO_LABEL_ROOT",
            str(base / "pl"),
            *SIZE,
        ]
    )
    return str(base), rank_parts.main(args)


def test_onestage_store_has_class_consistent_part_classes(onestage):
    base, summary = onestage
    assert summary["complete"] and summary["images"] == len(DatasetCatalog.get("toyparts_parts_train"))
    protos, counts = load_prototypes(os.path.join(base, "out", "prototypes.pth"))
    assert protos.shape[:2] == (5, 8) and (counts == 8).all()  # every toyparts class has ≥ 8 sampled cells
    records = list(PseudoLabelReader(os.path.join(base, "pl"), "toyparts_parts_train", "onestage"))
    seen = 0
    for record in records:
        for obj in record["objects"]:
            classes = [p["part_class"] for p in obj["parts"]]
            assert len(classes) == len(set(classes)) and all(0 <= c < 8 for c in classes)
            seen += len(classes)
    assert seen == summary["parts"] > 0


def test_eval_only_with_train_prototypes(onestage, tmp_path):
    base, _ = onestage
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file",
            CONFIG,
            "--eval-only",
            "MODEL.ONE_STAGE.PROTOTYPES",
            os.path.join(base, "out", "prototypes.pth"),
            "DATASETS.TEST",
            "('toyparts_parts_val',)",
            "OUTPUT_DIR",
            str(tmp_path),
            *SIZE,
        ]
    )
    results = train_net.main(args)
    miou = results["part_miou_clustered"]
    assert miou["num_objects"] > 0 and 0 < miou["C-mIoU"] <= 100 and 0 < miou["A-mIoU"] <= 100


def test_missing_prototypes_file_is_a_config_error(tmp_path):
    cfg = load_cfg(CONFIG, ["MODEL.ONE_STAGE.PROTOTYPES", str(tmp_path / "nope.pth")])
    with pytest.raises(ConfigError, match="MODEL.ONE_STAGE.PROTOTYPES"):
        build_model(cfg)
    torch.save({"prototypes": torch.zeros(1)}, tmp_path / "bad.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name in ("bad.pth", "garbage.pth"):
        with pytest.raises(ConfigError, match="not a prototypes file"):
            load_prototypes(str(tmp_path / name))
    # prototypes of another feature width (e.g. a ranking file of 256-d query features) are refused up front
    model = build_model(load_cfg(RGB_CONFIG))
    with pytest.raises(ConfigError, match=r"do not fit this model's \[C, K, 6\] features"):
        model.set_prototypes(torch.zeros(5, 8, 256), torch.full((5,), 8))


def test_prototypes_move_with_the_model_and_stay_out_of_checkpoints(tmp_path):
    """Prototypes loaded at build time (CPU) must follow ``model.to(...)``; found on a GPU run, where
    indexing CPU prototypes with CUDA class ids failed."""
    path = tmp_path / "protos.pth"
    torch.save({"prototypes": torch.rand(5, 8, 6), "num_clusters": torch.full((5,), 8)}, path)
    model = build_model(load_cfg(RGB_CONFIG, ["MODEL.ONE_STAGE.PROTOTYPES", str(path)]))
    assert any(b is model.prototypes for b in model.buffers())
    model.to(torch.float64)  # moves/casts floating buffers exactly as .to("cuda") would move them
    assert model.prototypes.dtype == torch.float64 and model.num_clusters.dtype == torch.long
    assert "prototypes" not in model.state_dict() and "num_clusters" not in model.state_dict()
    model.set_prototypes(None, None)  # back to the cluster pass
    assert model.prototypes is None
