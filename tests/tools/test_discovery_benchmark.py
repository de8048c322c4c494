"""The discovery benchmark's pieces: toyparts part-centre landmarks, loss curves, seed summaries (fast)."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from part_distillation.data.datasets.toyparts_landmarks import part_centre_keypoints
from part_distillation.data.dataset_mappers.part_eval import decode_segmentation
from part_distillation.engine.discovery_benchmark import format_summary, read_loss_curve, summarize_runs


def test_toyparts_landmarks_are_part_centroids(datasets_root):
    records = DatasetCatalog.get("toyparts_landmarks_val")
    parts = DatasetCatalog.get("toyparts_parts_val")
    assert [r["image_id"] for r in records] == [r["image_id"] for r in parts]
    names = MetadataCatalog.get("toyparts_landmarks_val").keypoint_names
    for r in records:
        kps = np.asarray(r["keypoints"]).reshape(-1, 3)
        assert kps.shape == (len(names), 3)
        present = {a["category_id"] for a in r["annotations"]}
        assert set(np.nonzero(kps[:, 2] > 0)[0]) == present
        for c in present:
            mask = np.zeros((r["height"], r["width"]), dtype=bool)
            for a in r["annotations"]:
                if a["category_id"] == c:
                    mask |= decode_segmentation(a["segmentation"], r["height"], r["width"])
            ys, xs = np.nonzero(mask)
            assert kps[c, :2] == pytest.approx([xs.mean() + 0.5, ys.mean() + 0.5])
    assert part_centre_keypoints({"height": 4, "width": 4, "annotations": []}, 2) == [0.0] * 6


def test_loss_curve_keeps_the_latest_run(tmp_path):
    lines = [
        {"iteration": 19, "total_loss": 9.0, "loss_a": 5.0},
        {"iteration": 39, "total_loss": 8.0, "loss_a": 4.0},
        {"iteration": 19, "total_loss": 7.0, "loss_a": 3.0, "lr": 0.1},
        {"iteration": 20, "eval": 1.0},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_loss_curve(str(tmp_path)) == [{"iteration": 19, "total_loss": 7.0, "loss_a": 3.0}]
    assert read_loss_curve(str(tmp_path / "missing")) == []


def test_summary_mean_and_spread_over_seeds():
    def run(method, seed, v):
        metrics = {"NMI": v, "ARI": v, "FG-NMI": v, "FG-ARI": v + 1, "NME": 10 - v}
        return {"method": method, "seed": seed, "metrics": metrics, "iterations": 5, "seconds": 2.0 * seed}

    summary = summarize_runs([run("a", 0, 1.0), run("a", 1, 3.0), run("b", 0, 2.0)])
    assert summary["a"]["FG-NMI"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert summary["a"]["seconds_mean"] == 1.0 and summary["b"]["seeds"] == [0]
    assert "| a | 2.0 ± 1.0 |" in format_summary(summary)


def test_one_run_trains_scores_and_keeps_its_curves(datasets_root, tmp_path):
    """The benchmark's unit of work on the tiny toyparts: 2 iterations of Choudhury et al., every metric (NMI,
    ARI, FG-NMI, FG-ARI, landmark NME) from the one evaluator pass, the loss curve and a checkpoint's metrics."""
    import os

    from conftest import REPO_ROOT

    from part_distillation.engine.discovery_benchmark import METHODS, METRICS, run_discovery_method

    config, trained = METHODS["choudhury21"]
    opts = ["INPUT.PAIRED_VIEW.IMAGE_SIZE", "64", "SOLVER.IMS_PER_BATCH", "2"]
    run = run_discovery_method(
        "choudhury21", os.path.join(REPO_ROOT, "configs", config), trained, str(tmp_path), 3, 2, opts, eval_every=1
    )
    assert run["iterations"] == 2 and run["seed"] == 3 and run["seconds"] > 0
    assert set(run["metrics"]) == set(METRICS)
    assert all(np.isfinite(v) for v in run["metrics"].values()), run["metrics"]
    assert [c["iteration"] for c in run["metric_curve"]] == [1, 2]
    assert run["metric_curve"][-1]["metrics"] == run["metrics"]


def _stage4_model(tmp_path):
    """(tiny overrides, a random stage-4 PartDistillationModel) of the stage-4 quick schedule."""
    import os

    import torch
    from detectron2.modeling import build_model

    from conftest import REPO_ROOT, tiny_quick_opts

    from part_distillation.engine import load_cfg

    opts = tiny_quick_opts(tmp_path, 1)
    stage4 = load_cfg(os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml"), opts)
    torch.manual_seed(0)
    return opts, build_model(stage4)


def test_partdistillation_checkpoint_scored_by_the_same_evaluators(datasets_root, tmp_path, repo_script):
    """benchmarks/discovery.py --stage4-weights: the landmark view gives the objects their classes, so a (random)
    stage-4 model predicts parts inside them and every metric is non-zero (all 0 when the objects had no class);
    iterations come from the checkpoint, training seconds and loss curve from the metrics.json next to it."""
    import torch

    from part_distillation.engine.discovery_benchmark import METRICS

    bench = repo_script("benchmarks/discovery.py")
    opts, model = _stage4_model(tmp_path)
    weights = str(tmp_path / "stage4.pth")
    torch.save({"model": model.state_dict(), "iteration": 299}, weights)
    lines = [{"iteration": 19, "time": 2.0, "total_loss": 5.0}, {"iteration": 39, "time": 3.0, "total_loss": 4.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = bench._stage4_run(weights, str(tmp_path / "work"), opts)
    assert run["method"] == "partdistillation" and set(run["metrics"]) == set(METRICS)
    assert all(0.0 < run["metrics"][m] <= 100.0 for m in ("NMI", "ARI", "FG-NMI")), run["metrics"]
    assert run["metrics"]["NME"] > 0.0
    assert run["iterations"] == 300 and run["seconds"] == 2.0 * 20 + 3.0 * 20
    assert [c["iteration"] for c in run["loss_curve"]] == [19, 39]


def _register_copy(name, records):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    meta = MetadataCatalog.get("toyparts_landmarks_val").as_dict()
    MetadataCatalog.get(name).set(**{k: v for k, v in meta.items() if k not in ("name", "part_to_object")})


class _FailIfCalled(DatasetEvaluator):
    def process(self, inputs, outputs):
        raise AssertionError("inference ran on a split without object classes")


def test_scoring_an_object_conditioned_model_without_object_classes_is_an_error(datasets_root, tmp_path, monkeypatch):
    """Records whose objects all lack a class (no object_annotations, no part_to_object table): PartDistillation
    would predict no part and score 0 — an error naming the dataset, before any inference."""
    import os

    from conftest import REPO_ROOT

    from part_distillation.engine import Trainer
    from part_distillation.engine.checks import check_object_classes, object_class_count
    from part_distillation.engine.discovery_benchmark import evaluate_discovery_model, method_cfg
    from part_distillation.engine.skip_aware import SkipAwareModel
    from part_distillation.utils.errors import ConfigError

    records = [
        {k: v for k, v in r.items() if k != "object_annotations"} for r in DatasetCatalog.get("toyparts_landmarks_val")
    ]
    name = "toyparts_landmarks_val_unclassed_test"
    _register_copy(name, records)
    opts, model = _stage4_model(tmp_path)
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml")
    cfg = method_cfg(config, str(tmp_path / "eval"), 0, 0, opts)
    try:
        with pytest.raises(ConfigError, match=f"{name}: none of its \\d+ objects has an object class"):
            evaluate_discovery_model(cfg, model, fit_dataset=name, eval_dataset=name)
        # the same refusal in the trainer's test loop (tools/train_net.py --eval-only), before any inference
        cfg.defrost()
        cfg.DATASETS.TEST = (name,)
        with pytest.raises(ConfigError, match=f"{name}: none of its \\d+ objects has an object class"):
            Trainer.test(cfg, model, evaluators=[_FailIfCalled()])
        assert object_class_count(SkipAwareModel(model)) == object_class_count(model) > 0
        # several processes: a rank whose share has no class does not refuse alone (counts summed over ranks)
        from detectron2.utils import comm

        monkeypatch.setattr(comm, "get_world_size", lambda: 2)
        monkeypatch.setattr(comm, "all_gather", lambda counts: [counts, (0, 7)])
        unclassed, total = check_object_classes(cfg, name, object_class_count(model))
        assert unclassed == total - 7 > 0
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_a_few_unclassed_objects_are_a_counted_skip(datasets_root, tmp_path):
    """One image's objects without a class: counted, not refused (the model skips and counts each when it runs);
    none on the real view; a sample of the first batches sees them too."""
    import os

    from conftest import REPO_ROOT

    from part_distillation.engine.checks import check_object_classes
    from part_distillation.engine.discovery_benchmark import method_cfg

    records = [dict(r) for r in DatasetCatalog.get("toyparts_landmarks_val")]
    records[0]["object_annotations"] = [dict(o, category_id=-1) for o in records[0]["object_annotations"]]
    expected = len(records[0]["object_annotations"])
    total = sum(len(r["object_annotations"]) for r in records)
    name = "toyparts_landmarks_val_few_unclassed_test"
    _register_copy(name, records)
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml")
    cfg = method_cfg(config, str(tmp_path / "eval"), 0, 0, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    try:
        assert check_object_classes(cfg, name, 5) == (expected, total)
        assert check_object_classes(cfg, "toyparts_landmarks_val", 5) == (0, total)
        unclassed, sampled = check_object_classes(cfg, name, 5, max_batches=1)
        assert unclassed == expected and expected < sampled < total  # read on past the unclassed first image
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
