"""Stage 3 (tools/rank_parts.py, PartRankingModel): prototypes per object class, a complete ranking store
with part classes and soft scores, τr/τs filtering on a hand-built case, and 1 vs 2 processes agreeing
byte for byte.

The stage-2 checkpoint is an untrained ProposalModel built with a fixed seed (ranking only needs a
deterministic model); objects are the GT objects of toyparts_parts_train (the images and objects of the
GT-part store that stage 2 trains on), their classes from the metadata's part_to_object.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from part_distillation.data.pseudo_labels import PseudoLabelReader, read_manifest
from part_distillation.engine import load_cfg
from part_distillation.clustering.prototypes import prototype_soft_scores
from part_distillation.modeling.meta_arch.ranking import rank_object_parts

from conftest import REPO_ROOT, read_tree, tiny_quick_opts

TOOL = os.path.join(REPO_ROOT, "tools", "rank_parts.py")
CONFIG = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage3_ranking_toyparts.yaml")
DATASET = "toyparts_parts_train"

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import rank_parts  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(datasets_root, tmp_path_factory):
    """A seeded, untrained stage-2 ProposalModel checkpoint of the quick schedule's architecture."""
    out = tmp_path_factory.mktemp("stage2")
    cfg = load_cfg(CONFIG, tiny_quick_opts(out, 1))
    cfg.MODEL.META_ARCHITECTURE = "ProposalModel"
    torch.manual_seed(0)
    model = build_model(cfg)
    path = str(out / "model_final.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _opts(root, out, weights):
    # GT objects of toyparts_parts_train (the quick schedule ranks inside the stage-1 store's objects; see
    # test_ranking_inside_stage1_store_objects)
    return tiny_quick_opts(out, 1) + [
        "MODEL.WEIGHTS",
        weights,
        "DATASETS.PSEUDO_LABEL_ROOT",
        str(root),
        "DATASETS.TEST",
        f"('{DATASET}',)",
        "INPUT.TEST_DATASET_MAPPER_NAME",
        "PartEvalDatasetMapper",
    ]


def _store_files(root):
    return read_tree(os.path.join(root, DATASET, "ranking"))


@pytest.fixture(scope="module")
def ranked(checkpoint, tmp_path_factory):
    """One in-process run (world size 1): (pseudo-label root, output dir, summary)."""
    base = tmp_path_factory.mktemp("rank1")
    root, out = base / "pl", base / "out"
    args = rank_parts.parse_args(["--config-file", CONFIG, "--shard-size", "5", *_opts(root, out, checkpoint)])
    summary = rank_parts.main(args)
    return str(root), str(out), summary


def test_prototypes_per_object_class(ranked):
    _, out, summary = ranked
    saved = torch.load(os.path.join(out, "prototypes.pth"), map_location="cpu", weights_only=True)
    num_classes = len(MetadataCatalog.get(DATASET).object_classes)
    protos, nc, counts = saved["prototypes"], saved["num_clusters"], saved["num_features"]
    assert protos.shape[:2] == (num_classes, 8) and protos.shape[2] > 0
    assert nc.shape == counts.shape == (num_classes,)
    assert int(counts.sum()) == summary["parts"] > 0  # the same parts are clustered and labelled
    # at most min(8, #parts) clusters (fewer when a class has fewer distinct features), one at least
    assert (nc <= counts.clamp(max=8)).all() and ((nc > 0) == (counts > 0)).all()
    for c in range(num_classes):
        assert torch.all(protos[c, nc[c] :] == 0)
        if nc[c]:
            assert torch.isfinite(protos[c, : nc[c]]).all()


def test_ranking_store_is_complete_with_classes_and_soft_scores(ranked):
    root, out, summary = ranked
    assert summary["complete"] and summary["images"] == len(DatasetCatalog.get(DATASET))
    assert not read_manifest(root, DATASET, "ranking")["missing_shards"]
    saved = torch.load(os.path.join(out, "prototypes.pth"), map_location="cpu", weights_only=True)
    part_to_object = MetadataCatalog.get(DATASET).part_to_object
    records = list(PseudoLabelReader(root, DATASET, "ranking"))
    assert len(records) == summary["images"]
    parts = 0
    for record in records:
        for obj in record["objects"]:
            assert 0 <= obj["category_id"] < len(MetadataCatalog.get(DATASET).object_classes)
            for part in obj["parts"]:
                parts += 1
                assert 0 <= part["part_class"] <= 7
                assert part["part_class"] < int(saved["num_clusters"][obj["category_id"]])
                soft = np.asarray(part["soft_scores"])
                assert soft.shape == (8,) and abs(soft.sum() - 1) < 1e-5 and (soft >= 0).all()
                assert int(soft.argmax()) == part["part_class"]
                assert part["score"] > 0.3  # τs
    assert parts == summary["parts"] and set(part_to_object)


def test_area_and_score_filters_hand_built():
    h = w = 10
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[:, :5] = True  # 50 pixels
    logits = torch.full((4, h, w), -5.0)
    logits[0, :, :2] = 5.0  # 20 px of the object: r = 0.4, s = 0.9 → kept
    logits[1, :, 2:5] = 5.0  # 30 px: r = 0.6 but s = 0.2 ≤ τs → dropped
    logits[2, 0, 2] = 10.0  # steals 1 px from query 1: r = 0.02 ≤ τr → dropped
    logits[3, :, 5:] = 5.0  # outside the object only → empty → dropped
    prob = torch.tensor([0.9, 0.2, 0.95, 0.99])
    index, masks, ratios = rank_object_parts(prob, logits, obj, 0.05, 0.3)
    assert index.tolist() == [0] and masks[0].sum() == 20 and torch.allclose(ratios, torch.tensor([0.4]))
    # only τr: query 1 survives with its 29 pixels; only τs: query 2's single pixel survives too
    index, masks, ratios = rank_object_parts(prob, logits, obj, 0.05, 0.0)
    assert index.tolist() == [0, 1] and masks[1].sum() == 29
    index, _, _ = rank_object_parts(prob, logits, obj, 0.0, 0.3)
    assert index.tolist() == [0, 2]
    # without per-pixel assignment masks overlap (query 1 keeps its 30 pixels)
    index, masks, _ = rank_object_parts(prob, logits, obj, 0.05, 0.0, per_pixel=False)
    assert index.tolist() == [0, 1] and masks[1].sum() == 30
    # soft scores: softmax(-||f - mu||) over the class's clusters, zeros beyond
    protos = torch.zeros(8, 2)
    protos[0], protos[1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    soft = prototype_soft_scores(torch.tensor([[1.0, 0.0]]), protos, 2)
    expected = torch.softmax(torch.tensor([0.0, -(2**0.5)]), dim=0)
    assert torch.allclose(soft[0, :2], expected) and torch.all(soft[0, 2:] == 0)


def test_two_processes_match_one(ranked, checkpoint, tmp_path):
    root1, out1, _ = ranked
    root2, out2 = tmp_path / "pl", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTORCH_JIT="0")
    proc = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--config-file",
            CONFIG,
            "--num-gpus",
            "2",
            "--dist-url",
            "auto",
            "--shard-size",
            "5",
            *_opts(root2, out2, checkpoint),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = torch.load(os.path.join(out1, "prototypes.pth"), map_location="cpu", weights_only=True)
    two = torch.load(os.path.join(out2, "prototypes.pth"), map_location="cpu", weights_only=True)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert _store_files(root1) == _store_files(str(root2))


def test_ranking_inside_stage1_store_objects(checkpoint, tmp_path):
    """The quick schedule's route: objects (and classes) from a stage-1 store, result = sibling stage "ranking"."""
    from part_distillation.data.gt_parts import write_gt_part_store

    root = tmp_path / "pl"
    # a class-agnostic stage-1-like store of toyparts_train: GT objects with their class, GT parts without classes
    write_gt_part_store(
        DATASET,
        str(root),
        "toyparts_train",
        "grouping",
        part_classes=False,
        register_as="toyparts_train_pseudo_grouping",
    )
    opts = tiny_quick_opts(tmp_path / "out", 1) + ["MODEL.WEIGHTS", checkpoint, "DATASETS.PSEUDO_LABEL_ROOT", str(root)]
    summary = rank_parts.main(rank_parts.parse_args(["--config-file", CONFIG, "--shard-size", "5", *opts]))
    assert summary["complete"] and summary["store"] == os.path.join(str(root), "toyparts_train", "ranking")
    stored = list(PseudoLabelReader(str(root), "toyparts_train", "grouping"))
    ranked = list(PseudoLabelReader(str(root), "toyparts_train", "ranking"))
    assert [r["image_id"] for r in ranked] == [r["image_id"] for r in stored]
    for a, b in zip(stored, ranked):  # the ranking keeps the stored objects, in order, with their classes
        assert [o["category_id"] for o in b["objects"]] == [o["category_id"] for o in a["objects"]]
    parts = [p for r in ranked for o in r["objects"] for p in o["parts"]]
    assert len(parts) == summary["parts"] > 0 and all(0 <= p["part_class"] < 8 for p in parts)
