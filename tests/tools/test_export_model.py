"""tools/export_model.py: TorchScript of the proposal and distillation networks matches eager within 1e-4."""

import json
import os

import pytest
import torch
from conftest import REPO_ROOT
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules")
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "DATASETS.TEST", "('toyparts_parts_val',)"]


@pytest.mark.parametrize("config", ["stage2_proposals_toyparts.yaml", "stage4_distillation_toyparts.yaml"])
def test_torchscript_parity_on_toyparts(config, datasets_root, tmp_path, repo_script):
    from part_distillation.engine import load_cfg
    from part_distillation.engine.export import ExportableHead

    cfg = load_cfg(os.path.join(QUICK, config), SMALL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # random weights, saved as a checkpoint: what the tool loads
    DetectionCheckpointer(model, str(tmp_path)).save("weights")
    tool = repo_script("tools/export_model.py")
    info = tool.main(
        [
            "--config-file",
            os.path.join(QUICK, config),
            "--output",
            str(tmp_path / "export"),
            "--object-class",
            "1",
            "--opts",
            *SMALL,
            "MODEL.WEIGHTS",
            str(tmp_path / "weights.pth"),
        ]
    )
    assert info["input_size"] == [128, 128] and info["torchscript_max_abs_diff"] <= 1e-4
    with open(tmp_path / "export" / "export.json") as f:
        assert json.load(f)["outputs"] == info["outputs"]
    distill = "stage4" in config
    assert info["outputs"] == (
        ["part_logits", "pred_logits", "pred_masks", "query_feats"] if distill else ["pred_logits", "pred_masks"]
    )
    # the saved graph on a different toyparts image (and object class) than the one it was traced on
    loaded = torch.jit.load(str(tmp_path / "export" / "model.ts"))
    images, _ = tool._sample(cfg, DatasetCatalog.get("toyparts_parts_val")[3]["file_name"])
    object_class = torch.tensor([3])
    with torch.no_grad():
        eager = ExportableHead(model)(images, object_class)
        outputs = loaded(images, object_class) if distill else loaded(images)
        for name, value in zip(info["outputs"], outputs):
            assert value.shape == eager[name].shape
            assert (value - eager[name]).abs().max() <= 1e-4, name
        if distill:  # the object class is an input of the graph, not a traced constant
            assert (outputs[0] - loaded(images, torch.tensor([1]))[0]).abs().max() > 1e-3


def test_onnx_export_when_available(datasets_root, tmp_path, repo_script):
    onnx = pytest.importorskip("onnx")
    tool = repo_script("tools/export_model.py")
    info = tool.main(
        [
            "--config-file",
            os.path.join(QUICK, "stage2_proposals_toyparts.yaml"),
            "--output",
            str(tmp_path),
            "--format",
            "onnx",
            "--opts",
            *SMALL,
        ]
    )
    graph = onnx.load(info["files"]["onnx"])
    onnx.checker.check_model(graph)
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_masks"]
