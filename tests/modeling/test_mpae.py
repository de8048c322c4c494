"""MPAE head: its losses on hand-computed cases, the head's wiring, training and evaluation (CPU, seconds)."""

import json
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torch import nn

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.engine import Trainer, load_cfg
from part_distillation.modeling.losses.mpae import (
    arc_margin_logits,
    entropy_loss,
    presence_loss,
    radial_weight,
    restoration_loss,
    semantic_consistency_loss,
    total_variation_loss,
)
from part_distillation.modeling.part_heads import PART_HEAD_REGISTRY, MPAEHead
from part_distillation.modeling.part_heads.mpae import MaskedRestorer, sincos_pos_embed_2d
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, run_train_net, train_frozen_backbone

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules", "discovery_mpae_toyparts.yaml")
K = 4
SIZE = 128


# ------------------------------------------------------------------------------------------------
# Losses on hand-computable inputs
# ------------------------------------------------------------------------------------------------
def test_arc_margin_logits():
    target = torch.tensor([0])
    # aligned: θ = 0 → target 20·cos(0.5) = 17.5517; the other class (cos 0) → 0
    out = arc_margin_logits(torch.tensor([[1.0, 0.0]]), target, 20.0, 0.5)
    torch.testing.assert_close(out, torch.tensor([[17.551651, 0.0]]))
    # orthogonal: θ = π/2 → 20·cos(π/2 + 0.5) = −20·sin(0.5) = −9.5885; the other class (cos 1) → 20
    out = arc_margin_logits(torch.tensor([[0.0, 1.0]]), target, 20.0, 0.5)
    torch.testing.assert_close(out, torch.tensor([[-9.588511, 20.0]]))
    # θ + m past π (cos −0.95 ≤ cos(π − 0.5) = −0.8776): fallback 20·(−0.95 − sin(π − 0.5)·0.5) = −23.7943
    out = arc_margin_logits(torch.tensor([[-0.95, 0.3]]), target, 20.0, 0.5)
    torch.testing.assert_close(out, torch.tensor([[-23.794255, 6.0]]))


def _two_part_map(present2=True):
    """A [1, 3, 2, 2]: part 1 = left column, part 2 = right column (or background there); F: e1 left, e2 right."""
    sim = torch.zeros(1, 3, 2, 2)
    sim[0, 1, :, 0] = 1
    sim[0, 2 if present2 else 0, :, 1] = 1
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0, :, 0] = 1
    feats[0, 1, :, 1] = 1
    return sim, feats


def test_semantic_consistency_loss():
    sim, feats = _two_part_map()
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # r_1 = 0.5·e1, r_2 = 0.5·e2. Descriptors aligned (G_1 = e1, G_2 = e2): CE = log(1 + e^−17.5517) ≈ 2.4e-8
    aligned = torch.stack([torch.zeros(2), e1, e2])[None]
    assert semantic_consistency_loss(sim, feats, aligned).item() < 1e-6
    # swapped (G_1 = e2, G_2 = e1): target logit −9.5885, other 20 → CE = log(e^−9.5885 + e^20) + 9.5885 = 29.5885
    swapped = torch.stack([torch.zeros(2), e2, e1])[None]
    torch.testing.assert_close(semantic_consistency_loss(sim, feats, swapped), torch.tensor(29.588511))
    # part 2 absent (no mass): its term is zeroed but still counted in the mean over B·K → 29.5885 / 2
    sim_absent, _ = _two_part_map(present2=False)
    torch.testing.assert_close(semantic_consistency_loss(sim_absent, feats, swapped), torch.tensor(14.794255))


def test_total_variation_and_entropy():
    sim = torch.zeros(1, 2, 2, 2)
    sim[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    sim[0, 1] = 1 - sim[0, 0]
    # each channel: vertical |0−1| + |0−0| = 1, horizontal |0−1| + |0−0| = 1 → 2; two channels → 4; / (B·h·w = 4) = 1
    torch.testing.assert_close(total_variation_loss(sim), torch.tensor(1.0))
    torch.testing.assert_close(total_variation_loss(torch.full((2, 3, 4, 5), 1 / 3)), torch.tensor(0.0))
    # entropy: one-hot cells → 0; uniform over 2 channels → ln 2
    assert entropy_loss(sim).item() < 1e-6
    torch.testing.assert_close(entropy_loss(torch.full((1, 2, 3, 3), 0.5)), torch.tensor(math.log(2)))


def test_presence_loss():
    # radial weight (x² + y²)/2 on a 3×3 grid: corners 1, edges 0.5, centre 0
    torch.testing.assert_close(radial_weight(3, 3), torch.tensor([[1.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 1.0]]))
    sim = torch.zeros(2, 3, 3, 3)
    # image 0: background 1 in the top-left corner, part 2 everywhere else (part 1 absent)
    sim[0, 0, 0, 0] = 1
    sim[0, 2] = 1 - sim[0, 0]
    # image 1: background 0.5 on the 4 edge cells, part 1 elsewhere (1) and on the edges (0.5); part 2 absent
    edges = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sim[1, 0] = 0.5 * edges
    sim[1, 1] = 1 - sim[1, 0]
    # pool 1 (no smoothing). bg: image 0 peak 1·1 → BCE 0; image 1 peak 0.5·0.5 = 0.25 → −ln 0.25; mean = ln 2.
    # fg, q = [[0, 1], [1, 0]]. One group of 2: every part appears (max over images 1, 1) and every image has a
    # part (1, 1) → 0. Groups of 1: each image misses one of its 2 parts → 1 − mean(0, 1) = 0.5; every image → 0.
    bg, fg = presence_loss(sim, group_size=2, pool=1)
    torch.testing.assert_close(bg, torch.tensor(math.log(2)))
    torch.testing.assert_close(fg, torch.tensor(0.0))
    _, fg1 = presence_loss(sim, group_size=1, pool=1)
    torch.testing.assert_close(fg1, torch.tensor(0.5))
    # 3×3 pooling of a 3×3 map leaves one cell; an image whose parts are all weak (max 0.5) costs 1 − 0.5 each term
    weak = torch.full((1, 3, 4, 4), 0.5)
    weak[:, 0] = 0.0
    _, fg_weak = presence_loss(weak, group_size=8, pool=3)
    torch.testing.assert_close(fg_weak, torch.tensor(1.0))
    with pytest.raises(ValueError, match="group_size"):
        presence_loss(sim, group_size=0)


def test_restoration_loss():
    pred, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)

    class Constant(nn.Module):
        def forward(self, a, b):
            return torch.tensor(2.0)

    # 0.1 · mean|0 − 1| = 0.1; plus the structural term (here a constant 2)
    torch.testing.assert_close(restoration_loss(pred, target, 0.1), torch.tensor(0.1))
    torch.testing.assert_close(restoration_loss(pred, target, 0.1, Constant()), torch.tensor(2.1))


def test_sincos_pos_embed():
    emb = sincos_pos_embed_2d(8, 2, 3)  # rows then columns; frequencies 1 and 10000^(−1/2) = 0.01
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    r, c = 1.0, 2.0  # the last cell (row 1, column 2)
    want = [
        math.sin(r),
        math.sin(r / 100),
        math.cos(r),
        math.cos(r / 100),
        math.sin(c),
        math.sin(c / 100),
        math.cos(c),
        math.cos(c / 100),
    ]
    torch.testing.assert_close(emb[5], torch.tensor(want))


# ------------------------------------------------------------------------------------------------
# The head from plain arguments
# ------------------------------------------------------------------------------------------------
def _small_head(**kw):
    args = dict(
        num_parts=K,
        feature_levels=["res4"],
        input_shape={"res4": ShapeSpec(channels=112, stride=16)},
        image_size=SIZE,
        feature_dim=32,
        descriptor_patch_size=16,
        descriptor_width=32,
        descriptor_depth=1,
        descriptor_heads=2,
        descriptor_mlp_dim=64,
        mae_patch_size=16,
        mae_dim=32,
        encoder_layers=1,
        encoder_heads=2,
        decoder_layers=1,
        group_size=2,
    )
    args.update(kw)
    return MPAEHead(**args)


def test_head_builds_from_plain_args():
    head = _small_head()
    assert PART_HEAD_REGISTRY.get("MPAEHead") is MPAEHead
    assert head.trainable and not head.external_background and head.num_parts == K
    assert head.proj.in_channels == 112 and head.proj.bias is None
    assert head.descriptor.part_tokens.shape == (1, K + 1, 32) and head.descriptor.patch_embed.bias is None
    assert head.perceptual is None  # no structural penalty unless given
    with pytest.raises(ConfigError, match="TRAIN_VIEW"):
        _small_head(train_view="both")
    with pytest.raises(ConfigError, match="MASK_RATIO"):
        _small_head(mask_ratio=1.0)


def test_restorer_fills_masked_cells_from_r():
    """With mask ratio 0.9 on an 8×8 grid 6 cells are encoded; the other 58 decode from R alone."""
    torch.manual_seed(0)
    mae = MaskedRestorer(
        patch_size=16,
        dim=32,
        encoder_layers=1,
        encoder_heads=2,
        decoder_dim=32,
        decoder_layers=0,
        rec_patch_size=4,
        mask_ratio=0.9,
    )
    image, filled = torch.randn(1, 3, 128, 128), torch.randn(1, 32, 8, 8)
    out = mae(image, filled)
    assert out.shape == (1, 3, 32, 32)
    # without decoder blocks, a cell's pixels depend only on its own token: cells equal to those decoded from R
    pos = sincos_pos_embed_2d(32, 8, 8)
    from_r = mae.decoder_pred(mae.decoder_norm(filled.flatten(2).transpose(1, 2) + pos))  # [1, 64, 48]
    cells = out.reshape(1, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(1, 64, 48)
    same = torch.isclose(cells, from_r, atol=1e-5).all(-1)[0]
    assert int(same.sum()) == 64 - 6


def test_losses_and_inference_of_the_head():
    torch.manual_seed(0)
    head = _small_head()
    feats = {"res4": torch.randn(2, 112, 8, 8)}

    class Batch:
        raw_images = torch.rand(2, 3, SIZE, SIZE) * 255
        images2 = None

    losses = head.losses(feats, Batch)
    assert set(losses) == {
        "loss_rec",
        "loss_tv",
        "loss_entropy",
        "loss_presence_bg",
        "loss_presence_fg",
        "loss_semantic",
    }
    sum(losses.values()).backward()
    assert head.proj.weight.grad is not None and head.descriptor.part_tokens.grad is not None
    scores = head.inference(feats, Batch)
    assert scores.shape == (2, K + 1, 64, 64)  # 8×8 grid × INFERENCE_UPSAMPLE 8
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 64, 64))
    with pytest.raises(ConfigError, match="image2"):
        _small_head(train_view="view2").losses(feats, Batch)


# ------------------------------------------------------------------------------------------------
# Through PartDiscovery, the Trainer and tools/train_net.py
# ------------------------------------------------------------------------------------------------
def _cfg(tmp_path, opts=()):
    return load_cfg(QUICK, ["OUTPUT_DIR", str(tmp_path), "SEED", "0", *opts])


def test_inference_canonical_layout(datasets_root, tmp_path):
    """part_probs are the head's A (background = channel 0), normalised, at the view's resolution."""
    cfg = _cfg(tmp_path, ["MODEL.PART_DISCOVERY.MPAE.INFERENCE_UPSAMPLE", "16"])  # 8×8 × 16 = the 128² view
    model = build_model(cfg).eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [mapper(r) for r in DatasetCatalog.get("toyparts_parts_val")[:2]]
    out = model(inputs)
    with torch.no_grad():
        batch = model.prepare(inputs)
        scores = model.head.inference(model.features_of(batch.images.tensor), batch)
    for i, o in enumerate(out):
        assert o["part_probs"].shape == (K + 1, SIZE, SIZE) and o["part_seg"].shape == (SIZE, SIZE)
        torch.testing.assert_close(o["part_probs"], scores[i], atol=1e-5, rtol=1e-4)
        assert torch.equal(o["part_seg"], o["part_probs"].argmax(0))
        assert 0 <= int(o["part_seg"].min()) and int(o["part_seg"].max()) <= K


def test_loss_decreases_on_a_fixed_batch(datasets_root, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path)
    model = build_model(cfg).train()
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get("toyparts_train")[:4]]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for _ in range(16):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.9 * first, totals


def test_trains_checkpoints_and_evaluates(datasets_root, tmp_path):
    cfg = _cfg(tmp_path / "train", ["SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()"])
    trainer = Trainer(cfg)
    model = trainer.model
    after = train_frozen_backbone(trainer, "head.proj.weight")
    assert not any(k.startswith("head.perceptual") for k in after)  # the frozen perceptual net is not saved
    metrics = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert any({"loss_rec", "loss_tv", "loss_presence_fg", "loss_semantic", "total_loss"} <= set(m) for m in metrics)
    # checkpoint round trip: a fresh model loaded from model_final.pth predicts the same
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(weights)
    assert all(torch.equal(v, after[k]) for k, v in fresh.state_dict().items())
    mapper = build_dataset_mapper(cfg, is_train=False)
    x = [mapper(DatasetCatalog.get("toyparts_parts_val")[0])]
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(x)[0]["part_probs"], fresh(x)[0]["part_probs"])
    # --eval-only through the CLI with the part_nmi_ari evaluator on the part annotations
    returncode, log = run_train_net(
        "--config-file",
        QUICK,
        "--eval-only",
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        tmp_path / "eval",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert returncode == 0, log[-3000:]
    assert "Part NMI/ARI (masks) on toyparts_parts_val (6 images)" in log and "FG-NMI" in log
