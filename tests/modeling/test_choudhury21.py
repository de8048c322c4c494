"""Choudhury et al. 2021 head: its losses on hand-computed cases, the warp/jitter, and the head through
PartDiscovery, the Trainer, checkpoints and ``tools/train_net.py --eval-only`` (CPU, tiny toyparts)."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from PIL import Image
from pycocotools import mask as mask_util

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.engine import Trainer, load_cfg
from part_distillation.modeling.losses.contrastive_reconstruction import (
    contrastive_loss,
    equivariance_loss,
    part_consistency_loss,
    part_descriptors,
    rgb_to_lab,
    sample_positives,
)
from part_distillation.modeling.part_heads import PART_HEAD_REGISTRY
from part_distillation.modeling.part_heads.choudhury21 import (
    ASPPClassifier,
    Choudhury21Head,
    color_jitter,
    hsv_to_rgb,
    random_warp_grid,
    rgb_to_hsv,
)
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, run_train_net

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules", "discovery_choudhury21_toyparts.yaml")
TAU = 0.19


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def test_rgb_to_lab_known_values():
    # white → (100, 0, 0), black → (0, 0, 0), sRGB red → (53.24, 80.09, 67.20) (CIE D65 tables)
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T[None, :, :, None]  # [1, 3, 3, 1]
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.01)
    assert torch.allclose(lab[1], torch.zeros(3), atol=1e-4)
    assert torch.allclose(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.02)
    skimage_color = pytest.importorskip("skimage.color")
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    ref = skimage_color.rgb2lab(x.permute(0, 2, 3, 1).double().numpy())
    assert np.abs(rgb_to_lab(x).permute(0, 2, 3, 1).numpy() - ref).max() < 1e-3


def _literal_consistency(probs, feats, mask, eps=1e-5):
    """The literal per-image form (K×C×N intermediate), for comparison."""
    m = mask.flatten(1).float()[:, None, None]  # [B, 1, 1, N]
    big_m = probs.flatten(2)[:, :, None] * m  # [B, K, 1, N]
    phi = feats.flatten(2)[:, None] * m  # [B, 1, C, N]
    z = (big_m * phi).sum(-1, keepdim=True) / (big_m.sum(-1, keepdim=True) + eps)  # [B, K, C, 1]
    return (big_m * m * (phi - z) ** 2).sum((1, 2, 3)) / (m.flatten(1).sum(-1) + eps)


def test_part_consistency_two_pixels():
    # Two fg pixels with φ = 0 and 2, both split 50/50 between K = 2 parts: z_1 = z_2 = 1, each part has
    # Σ_u 0.5·(φ_u − 1)² = 1, total 2, divided by the fg area 2 → 1. A third, masked-out pixel (φ = 100) is ignored.
    probs = torch.full((1, 2, 1, 3), 0.5)
    feats = torch.tensor([0.0, 2.0, 100.0]).view(1, 1, 1, 3)
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert part_consistency_loss(probs, feats, mask).item() == pytest.approx(1.0, rel=1e-4)
    # hard assignment, one pixel per part: every part is uniform → 0
    hard = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]).view(1, 2, 1, 3)
    assert part_consistency_loss(hard, feats, mask).item() == pytest.approx(0.0, abs=1e-5)
    # the expanded form equals the literal one (random soft masks and features)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 4, 5, 6, generator=g).softmax(1)
    f = torch.randn(3, 7, 5, 6, generator=g) * 3 + 2
    m = torch.rand(3, 5, 6, generator=g)
    assert torch.allclose(part_consistency_loss(p, f, m), _literal_consistency(p, f, m), rtol=1e-4)


def test_contrastive_orthogonal_descriptors():
    # B = 2 images, K = 2 parts: part 0 = e0 and part 1 = e1 in both images. Anchor logits: positive (the
    # same part of the other image) cos 1 → 1/τ; negatives (the other part) cos 0 → 0.
    # Code form: 2 negatives (both images) → CE = log(e^{1/τ} + 2) − 1/τ; paper form: 1 negative.
    eye = torch.eye(4)[:2]
    z = torch.stack([eye, eye])  # [2, 2, 4]
    positives = sample_positives(2, 2, torch.Generator().manual_seed(0))
    assert positives.tolist() == [[1, 1], [0, 0]]
    code = contrastive_loss(z, positives, TAU, own_image_negatives=True)
    paper = contrastive_loss(z, positives, TAU, own_image_negatives=False)
    assert code.item() == pytest.approx(math.log(math.exp(1 / TAU) + 2) - 1 / TAU, rel=1e-5)
    assert paper.item() == pytest.approx(math.log(math.exp(1 / TAU) + 1) - 1 / TAU, rel=1e-5)
    # positives come from another image, uniformly
    pos = sample_positives(3, 2000, torch.Generator().manual_seed(1))
    assert (pos != torch.arange(3)[:, None]).all()
    assert all(set(pos[n].tolist()) == set(range(3)) - {n} for n in range(3))


def test_part_descriptors_are_normalised_part_means():
    probs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    feats = torch.tensor([[3.0, 3.0, 0.0], [4.0, 4.0, 5.0]]).view(1, 2, 1, 3)
    z = part_descriptors(probs, feats, torch.ones(1, 1, 3))
    assert torch.allclose(z[0], torch.tensor([[0.6, 0.8], [0.0, 1.0]]), atol=1e-6)


def test_equivariance_known_values():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 4, 4)
    assert equivariance_loss(logits, logits, mask).item() == pytest.approx(0.0, abs=1e-6)
    # 2 classes: target softmax(0, 0) = (1/2, 1/2), prediction softmax(0, ln 3) = (1/4, 3/4):
    # KL(q‖p) = ½ln(½/¼) + ½ln(½/¾) = ½ln(4/3); KL(p‖q) = ¼ln(½) + ¾ln(3/2)
    target = torch.zeros(1, 2, 1, 2)
    pred = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    kl_qp, kl_pq = 0.5 * math.log(4 / 3), 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    both = torch.ones(1, 1, 2)
    assert equivariance_loss(pred, target, both).item() == pytest.approx(kl_qp, rel=1e-5)
    assert equivariance_loss(pred, target, both, symmetric=True).item() == pytest.approx(kl_qp + kl_pq, rel=1e-5)
    # normalised by the mask area: pixels outside the (warped) fg do not count
    pred2 = pred.clone()
    pred2[..., 1] = torch.tensor([5.0, -5.0]).view(1, 2, 1)
    assert equivariance_loss(pred2, target, torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(kl_qp, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Warp and colour jitter
# ------------------------------------------------------------------------------------------------
def test_warp_grid_identity_zoom_and_tps():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 8, 8, generator=g)
    identity = random_warp_grid(2, (8, 8), g, rotation=0, zoom=(1, 1), translation=0, tps_sigma=0)
    warped = torch.nn.functional.grid_sample(image, identity, align_corners=False)
    assert torch.allclose(warped, image, atol=1e-5)
    # zoom 2: the sampling grid is half the identity's (the centre is magnified)
    zoomed = random_warp_grid(1, (8, 8), g, rotation=0, zoom=(2, 2), translation=0, tps_sigma=0)
    assert torch.allclose(zoomed, identity[:1] * 0.5, atol=1e-6)
    # a TPS through exactly similarity-mapped control points is that similarity
    affine = random_warp_grid(3, (8, 8), torch.Generator().manual_seed(5), tps_sigma=0)
    tps = random_warp_grid(3, (8, 8), torch.Generator().manual_seed(5), tps_sigma=1e-9)
    assert torch.allclose(affine, tps, atol=1e-5)
    jittered = random_warp_grid(3, (8, 8), torch.Generator().manual_seed(5), tps_sigma=0.01)
    assert 0 < (jittered - affine).abs().max() < 0.05


def test_color_jitter_and_hsv():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 3, 6, 6, generator=g)
    assert torch.equal(color_jitter(rgb, g, p=0.0, grayscale_p=0.0), rgb)
    gray = color_jitter(rgb, g, p=0.0, grayscale_p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    jittered = color_jitter(rgb, g)
    assert jittered.shape == rgb.shape and jittered.min() >= 0 and jittered.max() <= 1
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    skimage_color = pytest.importorskip("skimage.color")
    ref = skimage_color.rgb2hsv(rgb[0].permute(1, 2, 0).numpy())
    assert np.abs(rgb_to_hsv(rgb[0]).permute(1, 2, 0).numpy() - ref).max() < 1e-5


# ------------------------------------------------------------------------------------------------
# The head
# ------------------------------------------------------------------------------------------------
def test_head_from_plain_args_and_aspp_shape():
    head = Choudhury21Head(num_parts=4, feature_levels=["res5"], in_channels=8, lambda_feat=0, lambda_contrastive=0)
    assert head.trainable and head.external_background
    assert [c.in_channels for c in head.classifier.convs] == [4] * 4  # the second half of 8 channels
    assert [c.dilation for c in head.classifier.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(2, 8, 9, 11)
    assert head.logits({"res5": x}).shape == (2, 4, 9, 11)
    assert head.logits({"res5": x}, size=(36, 44)).shape == (2, 4, 36, 44)
    # only channels 4..7 matter (2-branch)
    y = x.clone()
    y[:, :4] = torch.randn(2, 4, 9, 11)
    assert torch.equal(head.logits({"res5": x}), head.logits({"res5": y}))
    aspp = ASPPClassifier(1024, 4)
    assert 0.008 < aspp.convs[0].weight.std().item() < 0.012
    assert aspp(torch.zeros(1, 1024, 33, 33)).shape == (1, 4, 33, 33)
    with pytest.raises(ConfigError, match="NEGATIVES"):
        Choudhury21Head(num_parts=4, feature_levels=["res5"], in_channels=8, negatives="some")
    assert "Choudhury21Head" in PART_HEAD_REGISTRY


@pytest.fixture(scope="module")
def quick_model():
    return build_model(load_cfg(QUICK, ["MODEL.PART_DISCOVERY.REQUIRE_FG_MASK", "False"])).eval()


def test_inference_canonical_layout(quick_model):
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fg = torch.zeros(128, 128, dtype=torch.bool)
    fg[20:100, 30:90] = True
    with_mask, without = quick_model([{"image": image, "fg_mask": fg}, {"image": image}])
    seg, probs = with_mask["part_seg"], with_mask["part_probs"]
    assert seg.shape == (128, 128) and probs.shape == (5, 128, 128)
    assert (seg[~fg] == 0).all() and (seg[fg] > 0).all() and seg.max() <= 4
    assert torch.allclose(probs.sum(0), torch.ones(128, 128), atol=1e-5)
    assert (without["part_seg"] > 0).all()  # no fg mask: every pixel is a part


# ------------------------------------------------------------------------------------------------
# Training through the Trainer, checkpoints, --eval-only
# ------------------------------------------------------------------------------------------------
class _RecordLosses(HookBase):
    def __init__(self):
        self.history = []

    def after_step(self):
        s = self.trainer.storage
        self.history.append({k: s.history(k).latest() for k in ("total_loss", "loss_feat", "loss_visual")})


@pytest.fixture(scope="module")
def fixed_pair(datasets_root, tmp_path_factory):
    """'choudhury21_fixed_pair': two toyparts images with their object union as fg_mask_file (batch 2, no flip: the
    same batch every iteration)."""
    name = "choudhury21_fixed_pair"
    mask_dir = tmp_path_factory.mktemp("c21_masks")
    records = []
    for i, record in enumerate(DatasetCatalog.get("toyparts_parts_train")[:2]):
        record = dict(record)
        union = np.logical_or.reduce([mask_util.decode(a["segmentation"]) > 0 for a in record["annotations"]])
        path = str(mask_dir / f"{i}.png")
        Image.fromarray(union.astype(np.uint8) * 255).save(path)
        record["fg_mask_file"] = path
        records.append(record)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(evaluator_type="part_nmi_ari")
    return name


def test_trains_through_the_trainer_and_checkpoints(fixed_pair, tmp_path):
    iters = 10
    cfg = load_cfg(
        QUICK,
        [
            "OUTPUT_DIR",
            str(tmp_path),
            "DATASETS.TRAIN",
            f"('{fixed_pair}',)",
            "DATASETS.TEST",
            "()",
            "INPUT.PAIRED_VIEW.FLIP_PROB",
            "0.0",
            "SOLVER.MAX_ITER",
            str(iters),
        ],
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    recorder = _RecordLosses()
    trainer.register_hooks([recorder])
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert not model.head._perceptual[0].training  # φ stays frozen, outside the state dict
    assert not any(k.startswith("head._perceptual") for k in model.state_dict())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("head.classifier") for k in changed)
    # L_f + L_v are deterministic on the fixed batch (L_e, L_c draw warps and positives): they must go down
    h = recorder.history
    assert len(h) == iters and all(math.isfinite(x["total_loss"]) for x in h)
    consistency = [x["loss_feat"] + x["loss_visual"] for x in h]
    assert np.mean(consistency[-3:]) < np.mean(consistency[:3]), consistency
    # checkpoint round trip: identical predictions
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert os.path.isfile(weights)
    fresh = Trainer.build_model(cfg)
    DetectionCheckpointer(fresh).load(weights)
    model.eval(), fresh.eval()
    x = build_dataset_mapper(cfg, is_train=False)(DatasetCatalog.get(fixed_pair)[0])
    a, b = model([x])[0], fresh([x])[0]
    assert torch.equal(a["part_seg"], b["part_seg"]) and torch.allclose(a["part_probs"], b["part_probs"])

    # --eval-only through the CLI, part_nmi_ari on toyparts_parts_val
    returncode, log = run_train_net(
        "--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "eval"
    )
    assert returncode == 0, log[-3000:]
    assert "Part NMI/ARI (masks) on toyparts_parts_val (6 images)" in log and "FG-NMI" in log
