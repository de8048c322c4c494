"""Part-discovery protocol fixes: unmasked FG labels, two independent PartFormer warps, Choudhury's losses on
the jittered copy, configurable Adam betas (tiny tensors, seconds on CPU)."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image
from torch import nn

import part_distillation.data.dataset_mappers.paired_view as pvm
import part_distillation.structures.geometry as geo
from part_distillation.config import add_part_distillation_config
from part_distillation.engine.optimizer import build_optimizer
from part_distillation.evaluation.nmi_ari import predicted_part_maps
from part_distillation.modeling.meta_arch.discovery import PartDiscovery
from part_distillation.modeling.part_heads import Choudhury21Head
from part_distillation.modeling.part_heads.base import PartHead
from part_distillation.utils.errors import ConfigError


class _Backbone(nn.Module):
    """A 3×3 conv at stride 2 ("res3"), counting its calls."""

    size_divisibility = 2

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return {"res3": self.conv(x)}


class _ConstantPartsHead(PartHead):
    """Takes its background from the fg mask; scores part 3 highest everywhere."""

    external_background = True

    def __init__(self):
        super().__init__(num_parts=4, feature_levels=["res3"])

    def inference(self, features, batch):
        b, _, h, w = features["res3"].shape
        scores = torch.tensor([0.0, 0.1, 0.2, 0.6, 0.1]).view(1, 5, 1, 1)
        return scores.expand(b, 5, h, w).clone()


def _model(head, freeze=True):
    return PartDiscovery(
        backbone=_Backbone(), head=head, freeze_backbone=freeze, pixel_mean=[127.0] * 3, pixel_std=[128.0] * 3
    )


def test_fg_labels_come_from_the_unmasked_part_scores():
    """FG-NMI/ARI take the argmax of the K part scores, not of the masked probabilities (which are 0 on every
    part outside the mask, so every such pixel would become part 1)."""
    model = _model(_ConstantPartsHead()).eval()
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    fg = torch.zeros(16, 16, dtype=torch.bool)
    fg[:, :8] = True
    (out,) = model([{"image": image, "fg_mask": fg, "height": 32, "width": 32}])
    full, fg_labels = predicted_part_maps(out)
    assert (full[:, :14] == 3).all() and (full[:, 18:] == 0).all()  # masked: background outside the mask
    assert out["part_fg_probs"].shape == (4, 32, 32)
    assert (fg_labels == 3).all()  # the part argmax everywhere, inside the mask or not
    # the masked probabilities stay what NME centroids and full NMI use
    assert torch.allclose(out["part_probs"].sum(0), torch.ones(32, 32), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# PartFormer: each view under its own random similarity
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def smooth_record(tmp_path):
    yy, xx = np.mgrid[:48, :64].astype(np.float64)
    img = np.stack([120 + 80 * np.sin(xx / 7.0), 110 + 70 * np.cos(yy / 5.0), 100 + 60 * np.sin((xx + yy) / 9.0)], -1)
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "img.png")
    return {"file_name": str(tmp_path / "img.png"), "image_id": 3, "height": 48, "width": 64}


def test_independent_warps_move_both_views(smooth_record):
    args = dict(image_format="RGB", image_size=64, scale=0.1, rotation=30.0, translation=4.0, flip_prob=0.0)
    base = pvm.PairedViewDatasetMapper(is_train=False, **args)(smooth_record)["image"].float()
    mapper = pvm.PairedViewDatasetMapper(is_train=True, independent_warps=True, **args)
    moved = 0
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(smooth_record)
        v1, v2, a = out["image"].float(), out["image2"].float(), out["transform"]
        valid1 = out["valid1"]
        # view 1 itself is warped (not the base view) ...
        moved += int((v1 - base).abs()[:, valid1].mean() > 5.0)
        # ... and ``transform`` still maps view 1 onto view 2 where both come from the base view
        inner = out["valid2"].clone()
        inner[1:-1, 1:-1] &= out["valid2"][:-2, 1:-1] & out["valid2"][2:, 1:-1]
        inner[1:-1, 1:-1] &= out["valid2"][1:-1, :-2] & out["valid2"][1:-1, 2:]
        assert inner.float().mean() > 0.3
        warped = geo.warp_to_view2(v1[None], a)[0]
        assert (warped - v2).abs()[:, inner].mean() < 6.0
    assert moved == 4


def test_partformer_configs_warp_both_views_with_its_betas():
    from part_distillation.engine import load_cfg

    from conftest import REPO_ROOT

    cfg = load_cfg(f"{REPO_ROOT}/configs/discovery/partformer/toyparts.yaml")
    assert cfg.INPUT.PAIRED_VIEW.INDEPENDENT_WARPS
    assert tuple(cfg.SOLVER.BETAS) == (0.9, 0.95)
    assert pvm.PairedViewDatasetMapper(cfg, is_train=True).independent_warps


# ------------------------------------------------------------------------------------------------
# Choudhury et al.: L_f, L_v, L_c on the jittered copy
# ------------------------------------------------------------------------------------------------
def _choudhury_model(losses_on_jittered):
    head = Choudhury21Head(
        num_parts=3,
        feature_levels=["res3"],
        in_channels=4,
        two_branch=False,
        dilations=(1,),
        lambda_feat=0,
        lambda_contrastive=0,
        lambda_visual=1.0,
        lambda_eqv=1.0,
        losses_on_jittered=losses_on_jittered,
        brightness=0.9,
        jitter_prob=1.0,
        grayscale_prob=0.0,
        tps_sigma=0.0,
        seed=0,
    )
    return _model(head, freeze=False).train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    fg = torch.zeros(16, 16, dtype=torch.bool)
    fg[3:13, 2:14] = True
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(2)]
    return [{"image": image, "fg_mask": fg} for image in images]


def test_choudhury_losses_use_the_jittered_copy():
    inputs = _inputs()
    model = _choudhury_model(True)
    losses = model(inputs)
    assert set(losses) == {"loss_visual", "loss_eqv"}
    calls = model.backbone.calls
    assert len(calls) == 2  # cj1 (L_v and the L_e target, one pass) and the warped cj2
    plain = (torch.stack([x["image"] for x in inputs]).float() - 127.0) / 128.0
    assert all(not torch.allclose(c, plain, atol=1e-3) for c in calls)  # never the un-jittered image
    sum(losses.values()).backward()
    assert model.head.classifier.convs[0].weight.grad.abs().sum() > 0

    old = _choudhury_model(False)
    old(inputs)
    assert len(old.backbone.calls) == 3 and torch.allclose(old.backbone.calls[0], plain, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# SOLVER.BETAS
# ------------------------------------------------------------------------------------------------
def test_solver_betas_reach_adamw():
    cfg = add_part_distillation_config(get_cfg())
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.95)
    opt = build_optimizer(cfg, nn.Linear(3, 2))
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    cfg.SOLVER.BETAS = (0.9, 1.5)
    with pytest.raises(ConfigError, match="SOLVER.BETAS"):
        build_optimizer(cfg, nn.Linear(3, 2))


# ------------------------------------------------------------------------------------------------
# DeepFashion: the parsing map is the foreground; a head that needs a mask refuses inputs without one
# ------------------------------------------------------------------------------------------------
def test_deepfashion_parsing_map_is_the_foreground(tmp_path):
    from part_distillation.data.datasets.deepfashion import DEEPFASHION_PARSING_COLORS

    parsing = np.zeros((12, 10, 3), dtype=np.uint8)  # black = background
    parsing[2:6, 3:8] = DEEPFASHION_PARSING_COLORS[3]
    parsing[6:10, 3:8] = DEEPFASHION_PARSING_COLORS[11]
    Image.fromarray(parsing).save(tmp_path / "x_segment.png")
    fg = pvm.read_fg_mask({"parsing_file_name": str(tmp_path / "x_segment.png")}, (12, 10))
    expected = np.zeros((12, 10), dtype=bool)
    expected[2:10, 3:8] = True
    assert fg is not None and np.array_equal(fg, expected)


def test_a_head_that_needs_a_mask_refuses_inputs_without_one():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    model = PartDiscovery(
        backbone=_Backbone(),
        head=_ConstantPartsHead(),
        freeze_backbone=True,
        pixel_mean=[127.0] * 3,
        pixel_std=[128.0] * 3,
        require_fg_mask=True,
    ).eval()
    with pytest.raises(ConfigError, match="REQUIRE_FG_MASK.*foreground|x.jpg"):
        model([{"image": image, "file_name": "x.jpg"}])
    assert model([{"image": image, "fg_mask": torch.ones(16, 16, dtype=torch.bool)}])[0]["part_seg"].min() > 0
    model.require_fg_mask = False  # explicit opt-out: every pixel is foreground
    assert (model([{"image": image}])[0]["part_seg"] > 0).all()


# ------------------------------------------------------------------------------------------------
# PASCAL-Part: per-class object crops, the 20 % bbox-area filter, NMI/ARI inside the crop
# ------------------------------------------------------------------------------------------------
def _pascal_like_record():
    from part_distillation.data.datasets.pascal_part import build_record

    h, w = 40, 50
    big, small, other = (np.zeros((h, w), dtype=bool) for _ in range(3))
    big[5:30, 4:34] = True  # 25×30 = 37.5 % of the image
    small[32:38, 40:48] = True  # 2.4 %
    other[2:20, 36:49] = True
    head, body = big.copy(), big.copy()
    head[15:] = False
    body[:15] = False
    objects = [
        (16, big, [(0, head), (1, body)]),  # a sheep (VOC index 16) with two parts
        (16, small, [(0, small)]),  # a sheep too small for the crop view
        (7, other, [(5, other)]),  # a cat
    ]
    import itertools

    return build_record("x.jpg", "2010_000001", h, w, objects, itertools.count(1), parts_view=False)


def test_pascal_part_object_crops_keep_large_objects_of_one_class():
    from part_distillation.data.datasets.pascal_part import object_crop_records

    crops = object_crop_records([_pascal_like_record()], 16)
    assert len(crops) == 1
    (crop,) = crops
    assert crop["image_id"] == "2010_000001_0" and crop["bbox"] == [4.0, 5.0, 30.0, 25.0]
    assert sorted(a["category_id"] for a in crop["annotations"]) == [0, 1]  # only this object's parts
    assert len(object_crop_records([_pascal_like_record()], 16, min_bbox_area=0.02)) == 2
    # the mapper crops around the object, and its fg mask is the object's parts
    fg = pvm.read_fg_mask(crop, (40, 50))
    assert fg.sum() == 25 * 30


def test_nmi_ari_inside_the_crop():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from part_distillation.data.datasets.pascal_part import object_crop_records
    from part_distillation.evaluation.nmi_ari import PartNMIARIEvaluator

    (crop,) = object_crop_records([_pascal_like_record()], 16)
    name = "_test_pascal_crop"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [crop])
    box = (2, 3, 36, 32)  # x0, y0, x1, y1 around the object
    h, w = box[3] - box[1], box[2] - box[0]
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (h, w), generator=g)
    pred[8:20, 4:30] = 1  # roughly the head rows
    ev = PartNMIARIEvaluator(name, distributed=False)
    ev.reset()
    ev.process([{"image_id": crop["image_id"], "crop_box": box}], [{"part_seg": pred}])
    res = ev.evaluate()["part_nmi_ari_masks"]
    gt = np.zeros((40, 50), dtype=np.int64)
    gt[5:15, 4:34] = 1
    gt[15:30, 4:34] = 2
    gt = gt[box[1] : box[3], box[0] : box[2]].ravel()
    assert res["num_samples"] == h * w
    assert res["NMI"] == pytest.approx(100 * normalized_mutual_info_score(gt, pred.numpy().ravel()), abs=1e-6)
    assert res["ARI"] == pytest.approx(100 * adjusted_rand_score(gt, pred.numpy().ravel()), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Configs: the PartDistillation supplement's Choudhury port, the Choudhury CUB NME config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, k, lambdas, size",
    [
        ("partdistillation_port", 4, (30.0, 5700.0, 5.0, 2300.0), 256),
        ("partdistillation_port_manual", 8, (1.0, 1000.0, 100.0, 10000.0), 640),
    ],
)
def test_choudhury_port_configs(name, k, lambdas, size):
    from conftest import REPO_ROOT

    from part_distillation.engine import load_cfg

    cfg = load_cfg(f"{REPO_ROOT}/configs/discovery/choudhury21/{name}.yaml")
    c = cfg.MODEL.PART_DISCOVERY.CHOUDHURY21
    assert (c.LAMBDA_VISUAL, c.LAMBDA_EQV, c.LAMBDA_FEAT, c.LAMBDA_CONTRASTIVE) == lambdas
    assert cfg.MODEL.PART_DISCOVERY.NUM_PARTS == k and cfg.INPUT.PAIRED_VIEW.IMAGE_SIZE == size
    assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer" and cfg.MODEL.SWIN.EMBED_DIM == 192
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (
        "ADAMW",
        1e-5,
        30000,
        16,
    )


def test_choudhury_cub_nme_config():
    from conftest import REPO_ROOT

    from part_distillation.engine import load_cfg

    cfg = load_cfg(f"{REPO_ROOT}/configs/discovery/choudhury21/cub_nme.yaml")
    assert cfg.TEST.EVALUATOR_TYPE == "part_landmark_nme" and cfg.TEST.LANDMARK_NME.FIT_DATASET == "cub_train"
    assert tuple(cfg.DATASETS.TEST) == ("cub_train", "cub_test")
    assert cfg.INPUT.KEYPOINT_VIEW.BBOX_SQUARE and cfg.INPUT.KEYPOINT_VIEW.BBOX_MARGIN == 0.05
