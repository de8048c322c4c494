"""tools/discovery_table.py: heads trained and evaluated through one engine, PartDistillation scored by the same
evaluator, one table + JSON (tiny data, 2 iterations)."""

import json
import os
import sys

import torch
from detectron2.modeling import build_model

from part_distillation.engine import load_cfg

from conftest import REPO_ROOT, tiny_quick_opts

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import discovery_table  # noqa: E402


def test_table_of_heads_baselines_and_partdistillation(datasets_root, tmp_path, capsys):
    stage4 = load_cfg(os.path.join(REPO_ROOT, "configs", discovery_table.STAGE4_CONFIG), tiny_quick_opts(tmp_path, 1))
    torch.manual_seed(0)
    weights = str(tmp_path / "stage4.pth")
    torch.save({"model": build_model(stage4).state_dict()}, weights)
    opts = [
        "INPUT.PAIRED_VIEW.IMAGE_SIZE",
        "128",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "128",
    ]
    rows = discovery_table.main(
        [
            "--output",
            str(tmp_path / "out"),
            "--methods",
            "kmeans",
            "choudhury21",
            "--max-iter",
            "2",
            "--stage4-weights",
            weights,
            *opts,
        ]
    )
    assert [r["method"] for r in rows] == ["kmeans", "choudhury21", "partdistillation (stage 4)"]
    assert rows[0]["iterations"] == 0 and rows[1]["iterations"] == 2 and rows[1]["seconds"] > 0
    for r in rows:
        assert all(-100.0 <= r["metrics"][m] <= 100.0 for m in discovery_table.METRICS), r
    assert os.path.isfile(tmp_path / "out" / "choudhury21" / "model_final.pth")
    assert json.load(open(tmp_path / "out" / "discovery_table.json")) == json.loads(json.dumps(rows))
    out = capsys.readouterr().out
    assert "| method | NMI | ARI | FG-NMI | FG-ARI |" in out and "| choudhury21 |" in out
