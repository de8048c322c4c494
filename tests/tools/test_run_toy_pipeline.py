"""`make demo`'s entry point runs the whole pipeline end to end (tiny schedules) and reports every stage."""

import os
import sys

from conftest import REPO_ROOT, tiny_quick_opts

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import run_toy_pipeline as demo  # noqa: E402


def test_demo_runs_all_stages(datasets_root, tmp_path, capsys):
    # OUTPUT_DIR comes from --output; a 30-iteration proposal model scores below the reference code's score thresholds
    # τs, so keep all parts
    opts = tiny_quick_opts(tmp_path / "unused", max_iter=30)[2:] + ["MODEL.PART_RANKING.MIN_SCORE", "0.0"]
    results = demo.main(["--output", str(tmp_path / "demo"), "--num-vis", "2", *opts])
    assert 0.0 <= results["stage0"]["segm"]["AP"] <= 100.0
    for stage in ("stage1", "stage1_rgb"):
        assert results[stage]["complete"] and 0.0 < results[stage]["ar"]["AR@10"] <= 100.0
    assert 0.0 <= results["stage2"]["part_proposals"]["AR@10"] <= 100.0
    assert 0.0 <= results["stage4"]["part_miou_clustered"]["C-mIoU"] <= 100.0
    assert 0.0 <= results["stage4_mapped"]["part_miou_mapped"]["C-mIoU"] <= 100.0
    for name in ("rgb_kmeans", "onestage_labels", "onestage"):
        clustered, mapped = results[name]
        assert 0.0 < clustered["part_miou_clustered"]["C-mIoU"] <= 100.0, name
        assert 0.0 < mapped["part_miou_mapped"]["C-mIoU"] <= 100.0, name
    for d in ("stage0", "stage2", "stage4", "baseline_onestage"):
        assert os.path.isfile(tmp_path / "demo" / d / "model_final.pth")
    assert len(os.listdir(tmp_path / "demo" / "stage0_predictions")) == 2
    assert len(os.listdir(tmp_path / "demo" / "stage1_val" / "vis")) == 2
    assert os.path.isfile(tmp_path / "demo" / "stage3" / "prototypes.pth")
    # stage-4 overlays: a folder per object class of the val objects, at most --num-vis pictures each
    folders = os.listdir(tmp_path / "demo" / "stage4_parts")
    assert folders and all(1 <= len(os.listdir(tmp_path / "demo" / "stage4_parts" / f)) <= 2 for f in folders)
    assert len(results["overlays"]) == sum(len(os.listdir(tmp_path / "demo" / "stage4_parts" / f)) for f in folders)
    out = capsys.readouterr().out
    assert "PartDistillation (stages 1-4)" in out and "raw-RGB K-means" in out and "raw RGB (baseline)" in out
