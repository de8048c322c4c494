"""`make demo`'s entry point runs end to end (tiny schedule) and produces its outputs."""
import os
import sys

from conftest import REPO_ROOT, tiny_quick_opts

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import demo  # noqa: E402


def test_demo_runs_stages_0_and_1(datasets_root, tmp_path, capsys):
    opts = [o for o in tiny_quick_opts(tmp_path / "unused", max_iter=3)]
    opts = opts[2:]  # OUTPUT_DIR comes from --output
    results = demo.main(["--output", str(tmp_path / "demo"), "--num-vis", "2", *opts])
    assert "segm" in results["stage0"] and 0.0 <= results["stage0"]["segm"]["AP"] <= 100.0
    for stage in ("stage1", "stage1_rgb"):
        assert results[stage]["complete"] and 0.0 < results[stage]["ar"]["AR@10"] <= 100.0
    assert len(os.listdir(tmp_path / "demo" / "stage1_grouping" / "vis")) == 2
    pictures = os.listdir(tmp_path / "demo" / "stage0_predictions")
    assert len(pictures) == 2 and all(p.endswith(".png") for p in pictures)
    assert os.path.isfile(tmp_path / "demo" / "stage0" / "model_final.pth")
    assert "toyparts_val mask AP" in capsys.readouterr().out
