"""Our buildable Mask2Former, point-sampling switch, and the MSDeformAttn CUDA-op/PyTorch dispatch."""

import sys
import types

import pytest
import torch
from detectron2.modeling import build_model

from part_distillation.modeling.ops import ms_deform_attn as dispatch
from part_distillation.utils.compat import install_fast_eval_api_shim


def _inputs(n=1, size=128):
    from detectron2.structures import Instances

    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 10:60, 10:60] = True
        masks[1, 70:120, 40:100] = True
        inst.gt_masks, inst.gt_classes = masks, torch.tensor([0, 3])
        batch.append({"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8), "instances": inst})
    return batch


def test_builds_trains_and_infers(quick_cfg):
    cfg = quick_cfg()
    model = build_model(cfg)
    assert type(model).__name__ == "Mask2Former"
    model.train()
    losses = model(_inputs(2))
    dec_layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    assert len(losses) == 3 * dec_layers  # ce/mask/dice for the final + each auxiliary prediction
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": _inputs()[0]["image"], "height": 64, "width": 80}])
    inst = out["instances"]
    assert inst.image_size == (64, 80)
    assert len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE
    # boxes are derived from the masks (upstream leaves zeros)
    nonempty = inst.pred_masks.flatten(1).any(1)
    boxes = inst.pred_boxes.tensor[nonempty]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_topk_clamped_to_query_class_pairs(quick_cfg):
    cfg = quick_cfg(extra=["TEST.DETECTIONS_PER_IMAGE", "1000"])
    model = build_model(cfg)
    assert model.test_topk_per_image == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES * cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES


@pytest.mark.parametrize("mode,ratios", [("uniform", (1.0, 0.0)), ("importance", (3.0, 0.75))])
def test_point_sampling_switch(quick_cfg, mode, ratios):
    model = build_model(quick_cfg(extra=["MODEL.MASK_FORMER.POINT_SAMPLING", mode]))
    assert (model.criterion.oversample_ratio, model.criterion.importance_sample_ratio) == ratios


def _msda_inputs():
    torch.manual_seed(0)
    shapes = torch.tensor([[8, 8], [4, 4]])
    start = torch.tensor([0, 64])
    value = torch.randn(2, 80, 4, 8)  # N, sum(HW), heads, dim
    loc = torch.rand(2, 5, 4, 2, 3, 2)  # N, Lq, heads, levels, points, xy
    attn = torch.softmax(torch.randn(2, 5, 4, 6), -1).view(2, 5, 4, 2, 3)
    return value, shapes, start, loc, attn


@pytest.fixture
def fake_cuda_op(monkeypatch):
    """A stand-in compiled extension module that records calls."""
    calls = []
    fake = types.ModuleType("MultiScaleDeformableAttention")
    fake.ms_deform_attn_forward = lambda *a: calls.append(a) or torch.zeros(a[0].shape[0], a[3].shape[1], 32)
    monkeypatch.setitem(sys.modules, "MultiScaleDeformableAttention", fake)
    monkeypatch.setattr(dispatch, "_MSDA_CHECKED", False)
    yield calls
    dispatch._MSDA_CHECKED = False


def test_cpu_uses_pytorch_path_without_extension():
    """The real situation on this machine: no compiled extension importable."""
    from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

    dispatch._MSDA_CHECKED = False
    assert dispatch.load_cuda_op() is None
    args = _msda_inputs()
    out = dispatch.DispatchingMSDeformAttnFunction.apply(*args, 64)
    assert torch.equal(out, ms_deform_attn_core_pytorch(args[0], args[1], args[3], args[4]))


def test_extension_is_used_only_for_cuda_tensors(fake_cuda_op, monkeypatch):
    args = _msda_inputs()
    assert dispatch.load_cuda_op() is sys.modules["MultiScaleDeformableAttention"]
    dispatch.DispatchingMSDeformAttnFunction.apply(*args, 64)
    assert fake_cuda_op == []  # CPU tensors: PyTorch path even though the extension imports
    monkeypatch.setattr(dispatch, "use_cuda_op", lambda value: True)  # as if the tensors were on a GPU
    out = dispatch.DispatchingMSDeformAttnFunction.apply(*args, 64)
    assert len(fake_cuda_op) == 1 and out.shape == (2, 5, 32)


def test_mask2former_module_is_patched():
    from mask2former.modeling.pixel_decoder.ops.modules import ms_deform_attn as m

    import part_distillation  # noqa: F401

    assert m.MSDeformAttnFunction is dispatch.DispatchingMSDeformAttnFunction


def test_fast_eval_api_shim():
    import detectron2.evaluation.fast_eval_api as f
    from pycocotools.cocoeval import COCOeval

    install_fast_eval_api_shim()  # idempotent
    assert f.COCOeval_opt is COCOeval


@pytest.mark.parametrize(
    "backbone_opts",
    [
        [
            "MODEL.BACKBONE.NAME",
            "D2SwinTransformer",
            "MODEL.SWIN.EMBED_DIM",
            "32",
            "MODEL.SWIN.DEPTHS",
            "[1, 1, 1, 1]",
            "MODEL.SWIN.NUM_HEADS",
            "[1, 2, 4, 8]",
            "MODEL.SWIN.WINDOW_SIZE",
            "4",
        ],
        [
            "MODEL.BACKBONE.NAME",
            "build_resnet_backbone",
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
        ],
    ],
    ids=["swin", "resnet18"],
)
def test_upstream_backbones_still_build(quick_cfg, backbone_opts):
    """Users with Swin/ResNet checkpoints keep Mask2Former's and detectron2's backbones."""
    cfg = quick_cfg(extra=backbone_opts + ["MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]"])
    model = build_model(cfg)
    model.train()
    losses = model(_inputs(1))
    assert all(torch.isfinite(v) for v in losses.values())
