"""Tests of the EfficientNet-Lite0 detectron2 backbone and its ImageNet weight loading."""

import importlib.util
import logging
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

_MODULE = "part_distillation.modeling.backbone.efficientnet_lite"
try:
    effnet = importlib.import_module(_MODULE)
except ImportError:
    # The package's other modules may be missing while it is being written; load this
    # module on its own (it only imports torch and detectron2).
    effnet = sys.modules.get(_MODULE)
    if effnet is None:
        _path = os.path.join(os.path.dirname(__file__), "..", "..", *_MODULE.split(".")[:-1], "efficientnet_lite.py")
        _spec = importlib.util.spec_from_file_location(_MODULE, _path)
        effnet = importlib.util.module_from_spec(_spec)
        sys.modules[_MODULE] = effnet
        _spec.loader.exec_module(effnet)

EfficientNetLite0 = effnet.EfficientNetLite0
load_efficientnet_lite0_weights = effnet.load_efficientnet_lite0_weights

# name -> (channels, stride), as documented in the module
EXPECTED_FEATURES = {"res2": (24, 4), "res3": (40, 8), "res4": (112, 16), "res5": (320, 32)}
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def checkpoint():
    path = effnet.default_efficientnet_lite0_weights_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _add_efficientnet_keys(cfg):
    """Adds the MODEL.EFFICIENTNET keys unless the project's config already did."""
    try:
        from part_distillation.config import add_part_distillation_config

        add_part_distillation_config(cfg)
    except ImportError:
        pass
    if "EFFICIENTNET" not in cfg.MODEL:
        from detectron2.config import CfgNode as CN

        cfg.MODEL.EFFICIENTNET = CN()
        cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.EFFICIENTNET.NORM = "FrozenBN"
        cfg.MODEL.EFFICIENTNET.PRETRAINED = True
        cfg.MODEL.EFFICIENTNET.WEIGHTS = ""
    return cfg


def _backbone_keys(checkpoint, keep_counters):
    keys = set(checkpoint) - effnet.UNUSED_CLASSIFIER_KEYS
    if not keep_counters:
        keys = {k for k in keys if not k.endswith("num_batches_tracked")}
    return keys


def _preprocess(img, size=224):
    """Resize the short side to 256, center crop, normalise as the module documents (RGB)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
    x = x.clamp(0, 255)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(effnet.EFFICIENTNET_LITE0_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(effnet.EFFICIENTNET_LITE0_PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("hw", [(128, 96), (100, 75)])
def test_output_names_strides_channels(hw):
    model = EfficientNetLite0().eval()
    assert model.size_divisibility == 32
    shapes = model.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    for name, (channels, stride) in EXPECTED_FEATURES.items():
        assert shapes[name] == ShapeSpec(channels=channels, stride=stride)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, (channels, stride) in EXPECTED_FEATURES.items():
        # any input size works; each map is ceil(size / stride)
        expected = (1, channels, -(-hw[0] // stride), -(-hw[1] // stride))
        assert tuple(out[name].shape) == expected, name


def test_out_feature_subset_and_validation():
    model = EfficientNetLite0(out_features=["res5", "res3"]).eval()
    assert list(model.output_shape()) == ["res3", "res5"]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"res3", "res5"}
    assert out["res5"].shape == (2, 320, 2, 2)
    with pytest.raises(ValueError, match="res6"):
        EfficientNetLite0(out_features=["res6"])
    with pytest.raises(ValueError, match="norm"):
        EfficientNetLite0(norm="GN")


@pytest.mark.parametrize("norm", ["FrozenBN", "BN", "SyncBN"])
def test_bundled_weights_every_tensor_matched(norm, checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger=_MODULE):
        model = EfficientNetLite0(norm=norm, weights="")  # "" -> bundled package file
    state = model.state_dict()
    # FrozenBatchNorm2d keeps no num_batches_tracked counter; BN/SyncBN load it too.
    assert set(state) == _backbone_keys(checkpoint, keep_counters=norm != "FrozenBN")
    for key, value in state.items():
        assert torch.equal(value, checkpoint[key]), key
    # the loaded values really are the file's (not only shapes): a few explicit spot checks
    for key in [
        "_conv_stem.weight",
        "_blocks.7._bn1.running_var",
        "_blocks.15._project_conv.weight",
    ]:
        assert torch.equal(state[key], checkpoint[key])
        assert state[key].abs().sum() > 0
    assert f"Loaded all {len(state)} EfficientNet-Lite0 tensors" in caplog.text


def test_classifier_loads_every_checkpoint_tensor(checkpoint):
    model = EfficientNetLite0(norm="BN", with_classifier=True)
    n = load_efficientnet_lite0_weights(model, effnet.default_efficientnet_lite0_weights_path())
    assert n == len(checkpoint) and set(model.state_dict()) == set(checkpoint)


@pytest.mark.parametrize(
    "corruption, key, message",
    [
        ("drop", "_blocks.3._bn1.running_var", "missing keys"),
        ("reshape", "_blocks.5._project_conv.weight", "shape mismatches"),
        ("add", "_blocks.16._project_conv.weight", "unexpected keys"),
    ],
)
def test_corrupted_checkpoint_raises(corruption, key, message, checkpoint, tmp_path):
    state = dict(checkpoint)
    if corruption == "drop":
        del state[key]
    elif corruption == "reshape":
        state[key] = torch.zeros(81, 240, 1, 1)
    else:
        state[key] = torch.zeros(1)
    path = tmp_path / "corrupted.pth"
    torch.save(state, path)
    model = EfficientNetLite0()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=message) as excinfo:
        load_efficientnet_lite0_weights(model, str(path))
    assert key in str(excinfo.value)
    # nothing was loaded: no half-initialised model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_imagenet_predictions_prove_pretrained_weights():
    """Real photos are classified correctly: the weights (and the normalisation) are right."""
    from skimage import data

    model = EfficientNetLite0(with_classifier=True, weights="").eval()
    with torch.no_grad():
        logits = model.classify(torch.cat([_preprocess(data.chelsea()), _preprocess(data.coffee())]))
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert top5[0][0] in CAT_CLASSES, top5[0]
    assert COFFEE_CLASSES & set(top5[1]), top5[1]
    assert top5[1][0] == 967, top5[1]  # espresso


def _expected_frozen_prefixes(freeze_at):
    groups = [
        ["_conv_stem.", "_bn0.", "_blocks.0."],  # stem: everything at stride 2
        [f"_blocks.{i}." for i in (1, 2)],  # res2
        [f"_blocks.{i}." for i in (3, 4)],  # res3
        [f"_blocks.{i}." for i in range(5, 11)],  # res4
        [f"_blocks.{i}." for i in range(11, 16)],  # res5
    ]
    return tuple(p for g in groups[:freeze_at] for p in g)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_freeze_at(freeze_at):
    model = EfficientNetLite0(norm="BN", freeze_at=freeze_at)
    frozen = _expected_frozen_prefixes(freeze_at)
    params = dict(model.named_parameters())
    assert params, "the model must have parameters"
    for name, p in params.items():
        assert p.requires_grad == (not name.startswith(frozen)), name
    # BatchNorms of frozen parts become FrozenBatchNorm2d, the others stay trainable BN
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            assert isinstance(m, FrozenBatchNorm2d) == (name + ".").startswith(frozen), name


def test_freeze_then_load_keeps_keys_matching(checkpoint):
    model = EfficientNetLite0(norm="BN", freeze_at=3, weights="")
    state = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, checkpoint[key]), key
    assert not model._blocks[4]._bn1.weight.requires_grad  # res3: frozen
    assert model._blocks[5]._bn1.weight.requires_grad  # res4: trainable


@pytest.mark.parametrize("weights", ["", "bundled-path"])
def test_build_from_config(weights, checkpoint):
    assert "build_efficientnet_lite0_backbone" in BACKBONE_REGISTRY
    cfg = _add_efficientnet_keys(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite0_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True
    cfg.MODEL.EFFICIENTNET.WEIGHTS = effnet.default_efficientnet_lite0_weights_path() if weights else ""
    backbone = build_backbone(cfg)
    assert isinstance(backbone, EfficientNetLite0)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        k: EXPECTED_FEATURES[k] for k in ["res3", "res4", "res5"]
    }
    assert torch.equal(backbone._blocks[9]._depthwise_conv.weight, checkpoint["_blocks.9._depthwise_conv.weight"])
    assert not backbone._blocks[2]._project_conv.weight.requires_grad
    assert backbone._blocks[3]._project_conv.weight.requires_grad


def test_build_from_config_without_pretrained(checkpoint):
    cfg = _add_efficientnet_keys(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite0_backbone"
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    backbone = build_backbone(cfg)
    assert not torch.equal(backbone._conv_stem.weight, checkpoint["_conv_stem.weight"])
