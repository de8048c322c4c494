"""PartFormer head (Xia et al., TPAMI 2024): hand-checked losses, the head, training and evaluation (CPU)."""

import itertools
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.engine import Trainer, load_cfg
from part_distillation.modeling.losses import (
    PerceptualLoss,
    PerceptualNetwork,
    arcface_logits,
    arcface_loss,
    area_loss,
    concentration_loss,
    transfer,
)
from part_distillation.modeling.part_heads import PART_HEAD_REGISTRY, PartFormerHead
from part_distillation.modeling.part_heads.base import DiscoveryBatch
from part_distillation.modeling.backbone.vit import sincos_pos_embed_2d
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, RecordLoss, run_train_net

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules", "discovery_partformer_toyparts.yaml")
K = 4


# ------------------------------------------------------------------------------------------------
# Losses and transfer, by hand
# ------------------------------------------------------------------------------------------------
def test_transfer_two_tokens_softmax_over_tokens():
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # G_1 = e_x, G_2 = e_y
    f = torch.tensor([math.log(3.0) / 0.8, 0.0]).view(1, 2, 1, 1)  # τ<G_1, F> = ln 3, τ<G_2, F> = 0
    v, s = transfer(g, f, 0.8)
    # V = softmax(ln 3, 0) = (3/4, 1/4) over the tokens; S = 3/4·G_1 + 1/4·G_2 = (0.75, 0.25)
    assert torch.allclose(v.flatten(), torch.tensor([0.75, 0.25]))
    assert torch.allclose(s.flatten(), torch.tensor([0.75, 0.25]))
    # cosine similarity ignores the norms: G ×5 and F ×7 give cos = (1, 0); scale ln 3 → the same V
    v_cos, _ = transfer(5 * g, 7 * f, math.log(3.0), similarity="cosine")
    assert torch.allclose(v_cos.flatten(), torch.tensor([0.75, 0.25]))
    v_many, _ = transfer(torch.randn(2, 5, 3), torch.randn(2, 3, 4, 4))
    assert torch.allclose(v_many.sum(1), torch.ones(2, 4, 4))  # each pixel's distribution over K+1 tokens


def test_concentration_loss_by_hand():
    one_cell = torch.zeros(1, 1, 2, 2)
    one_cell[0, 0, 1, 0] = 1.0
    assert concentration_loss(one_cell).item() == pytest.approx(0.0, abs=1e-12)  # all mass at its centre
    # 2×2 grid: x, y ∈ {−1, 0}. Mass ½ at (x, y) = (−1, −1) and (0, −1): centre (−½, −1), each ‖p − c‖² = ¼,
    # L = ½·¼ + ½·¼ = 0.25. Uniform ¼ on all four: centre (−½, −½), each ‖p − c‖² = ½ → L = 0.5.
    two = torch.tensor([[[[0.5, 0.5], [0.0, 0.0]]]])
    assert concentration_loss(two).item() == pytest.approx(0.25, abs=1e-6)
    uniform = torch.full((1, 1, 2, 2), 0.25)
    assert concentration_loss(uniform).item() == pytest.approx(0.5, abs=1e-6)
    # sum over parts, mean over the batch: [two, uniform] as two parts of one image, then a batch of 2
    both = torch.cat([two, uniform], dim=1)
    assert concentration_loss(both).item() == pytest.approx(0.75, abs=1e-6)
    assert concentration_loss(torch.cat([both, 0 * both + one_cell.expand(1, 2, 2, 2)])).item() == pytest.approx(0.375)


def test_area_loss_by_hand():
    v = torch.zeros(1, 2, 2, 2)
    v[0, 0, 0, 0] = 1.0  # part 1 covers z = 1 cell, part 2 none
    # α = 0.5: 1/(1 + 1/0.5) + 1/(1 + 0) = 1/3 + 1 = 4/3
    assert area_loss(v, 0.5).item() == pytest.approx(4 / 3)
    # α = 2: 1/(1 + 1/2) + 1 = 2/3 + 1
    assert area_loss(v, 2.0).item() == pytest.approx(5 / 3)
    big = torch.ones(1, 1, 32, 32)  # z = 1024 cells: 1/(1 + 2048) ≈ 0
    assert area_loss(big, 0.5).item() == pytest.approx(1 / 2049)


def test_arcface_by_hand():
    w = torch.eye(2)  # W_1 = e_x, W_2 = e_y
    s, m = 20.0, 0.5
    aligned = torch.eye(2)[None]  # G_k = W_k: cos θ_kk = 1, cos θ_tk = 0
    logits = arcface_logits(aligned, w, s, m)
    # target logit s·cos(0 + m) = 20·cos 0.5 = 17.5517, others s·0
    assert logits[0, 0, 0].item() == pytest.approx(20 * math.cos(0.5), abs=1e-4)
    assert logits[0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # L = log(1 + e^{−20 cos 0.5}) ≈ 2.4e-8
    assert arcface_loss(aligned, w, s, m).item() == pytest.approx(math.log1p(math.exp(-20 * math.cos(0.5))), abs=1e-6)
    swapped = torch.eye(2).flip(0)[None]  # G_1 = W_2, G_2 = W_1: cos θ_kk = 0 (θ = π/2), cos θ_tk = 1
    # target: s·cos(π/2 + m) = −20 sin 0.5 = −9.589; other: 20 → L = log(1 + e^{20 + 9.589}) ≈ 29.589
    expected = math.log1p(math.exp(20 + 20 * math.sin(0.5)))
    assert arcface_loss(swapped, w, s, m).item() == pytest.approx(expected, abs=1e-4)
    # θ = π (G = −W) is past π − m: ArcFace's fallback s·(cos θ − sin(π − m)·m) = 20·(−1 − 0.5·sin 0.5) = −24.79
    opposite = arcface_logits(-torch.eye(2)[None], w, s, m)
    assert opposite[0, 0, 0].item() == pytest.approx(20 * (-1 - math.sin(math.pi - 0.5) * 0.5), abs=1e-4)
    # per-sample rows (class-specific W) give the same values as shared ones
    g = torch.randn(3, 2, 5)
    shared = torch.randn(2, 5)
    assert torch.allclose(arcface_loss(g, shared), arcface_loss(g, shared[None].expand(3, 2, 5)))


def test_sincos_position_embedding():
    pos = sincos_pos_embed_2d(8, 2, 3)  # width 8, 2 rows, 3 columns
    assert pos.shape == (6, 8)
    # position (0, 0): sin 0 = 0, cos 0 = 1 in both halves
    assert torch.equal(pos[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    # row half of (1, 2) encodes row 1: [sin 1, sin 1e-2, cos 1, cos 1e-2] (ω = 1, 10000^(−1/2))
    assert torch.allclose(pos[5, :4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))


# ------------------------------------------------------------------------------------------------
# The head from plain arguments
# ------------------------------------------------------------------------------------------------
class _PixelNetwork(PerceptualNetwork):
    """A parameter-free 'perceptual network' (the pixels themselves), to keep the head tests fast."""

    def __init__(self):
        super().__init__(["pixels"])

    def forward(self, x):
        return {"pixels": x}


def _head(**kwargs):
    args = dict(
        num_parts=K,
        feature_levels=["res3"],
        input_shape={"res3": ShapeSpec(channels=8, stride=8)},
        perceptual=PerceptualLoss(network=_PixelNetwork(), layer_weights=[1.0]),
        compress_dims=[16, 8],
        width=16,
        depth=1,
        heads=2,
        mlp_dim=32,
        patch_size=8,
    )
    args.update(kwargs)
    return PartFormerHead(**args)


def _batch(views=2, size=64, b=2, inputs=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (b, 3, size, size), generator=gen).float()
    raw2 = raw.flip(-1) if views == 2 else None
    feats = {"res3": torch.randn(b, 8, size // 8, size // 8, generator=gen)}
    feats2 = {"res3": torch.randn(b, 8, size // 8, size // 8, generator=gen)}

    class _Images:
        def __init__(self, t):
            self.tensor = t

    valid = torch.ones(b, size, size, dtype=torch.bool)
    batch = DiscoveryBatch(
        inputs=inputs or [{} for _ in range(b)],
        images=_Images(raw),
        raw_images=raw,
        valid=valid,
        fg_masks=valid,
        fg_given=torch.zeros(b, dtype=torch.bool),
        input_format="RGB",
        features_of=lambda t: feats2,
        images2=_Images(raw2) if views == 2 else None,
        raw_images2=raw2,
    )
    return feats, batch


def test_head_from_plain_args_losses_and_inference():
    torch.manual_seed(0)
    head = _head()
    assert not head.external_background and head.trainable
    assert "perceptual" not in "".join(head.state_dict())  # the frozen network stays out of checkpoints
    feats, batch = _batch()
    losses = head.losses(feats, batch)
    assert set(losses) == {"loss_rec", "loss_con", "loss_area", "loss_sc"}
    sum(losses.values()).backward()
    for name in (
        "compress.0.weight",
        "partformer.part_tokens",
        "partformer.patch_embed.weight",
        "decoder.layers.0.0.weight",
        "arcface_weight",
    ):
        assert dict(head.named_parameters())[name].grad.abs().sum() > 0, name
    head.eval()
    with torch.no_grad():
        scores = head.inference(feats, batch)
        # canonical layout: channel 0 = the method's last (background) token; ×4 upsampled F (8² → 32²)
        assert scores.shape == (2, K + 1, 32, 32)
        assert torch.allclose(scores.sum(1), torch.ones(2, 32, 32), atol=1e-5)
        g = head.part_representations(batch.raw_images, "RGB")
        f = torch.nn.functional.interpolate(head.pixel_representations(feats), scale_factor=4, mode="bilinear")
        v, _ = transfer(g, f, 0.8)
        assert torch.allclose(scores[:, 0], v[:, K]) and torch.allclose(scores[:, 1:], v[:, :K])


def test_exchange_and_one_view_fallback():
    torch.manual_seed(0)
    head = _head().eval()  # eval: BatchNorm uses running stats, so both streams see the same compression
    feats, batch = _batch()
    batch.features_of = lambda t: feats  # view 2 = view 1 (same features, same pixels)
    batch.raw_images2 = batch.raw_images
    with torch.no_grad():
        same = head.losses(feats, batch)
        head.exchange = False
        no_exchange = head.losses(feats, batch)
        # identical views: exchanging G¹ and G² changes nothing
        assert all(torch.allclose(same[k], no_exchange[k]) for k in same)
        _, flipped = _batch()
        head.exchange = True
        exchanged = head.losses(feats, flipped)
        head.exchange = False
        assert not torch.allclose(exchanged["loss_rec"], head.losses(feats, flipped)["loss_rec"])
        one = head.losses(*_batch(views=1))  # no paired view: one stream on view 1
        assert set(one) == set(same)


def test_class_specific_tokens():
    torch.manual_seed(0)
    head = _head(num_classes=3)
    assert head.partformer.part_tokens.shape[0] == 3 * K + 1 and head.arcface_weight.shape[0] == 3 * K
    index = head._token_index(torch.tensor([0, 2]))
    assert index.tolist() == [[0, 1, 2, 3, 12], [8, 9, 10, 11, 12]]  # the class's K parts, then the shared bg
    feats, batch = _batch(inputs=[{"class_id": 0}, {"class_id": 2}])
    losses = head.losses(feats, batch)
    sum(losses.values()).backward()
    grad = head.partformer.part_tokens.grad.abs().sum(1)
    assert (grad[4:8] == 0).all() and (grad[:4] > 0).all() and (grad[8:] > 0).all()  # class 1 unused
    with pytest.raises(ConfigError, match="class_id"):
        head.losses(*_batch())


# ------------------------------------------------------------------------------------------------
# Through PartDiscovery, the Trainer and tools/train_net.py
# ------------------------------------------------------------------------------------------------
def _cfg(tmp_path, opts=()):
    return load_cfg(QUICK, ["OUTPUT_DIR", str(tmp_path), "SEED", "0", *opts])


def test_inference_canonical_layout(datasets_root, tmp_path):
    cfg = _cfg(tmp_path, ["MODEL.PART_DISCOVERY.PARTFORMER.INFER_UPSAMPLE", "8"])  # stride 8 × 8: the image grid
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert "PartFormerHead" in PART_HEAD_REGISTRY
    mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [mapper(r) for r in DatasetCatalog.get("toyparts_parts_val")[:2]]
    outputs = model(inputs)
    with torch.no_grad():
        batch = model.prepare(inputs)
        head = model.head
        g = head.part_representations(batch.raw_images, batch.input_format)
        f = torch.nn.functional.interpolate(
            head.pixel_representations(model.features_of(batch.images.tensor)), scale_factor=8, mode="bilinear"
        )
        v, _ = transfer(g, f, head.logit_scale)
    for i, out in enumerate(outputs):
        probs = out["part_probs"]
        assert probs.shape == (K + 1, 128, 128) and out["part_seg"].shape == (128, 128)
        assert torch.allclose(probs.sum(0), torch.ones(128, 128), atol=1e-5)
        assert torch.allclose(probs[0], v[i, K], atol=1e-5)  # background = the last token, moved to channel 0
        assert torch.equal(out["part_seg"], probs.argmax(0))


class _FixedBatchTrainer(Trainer):
    """The project Trainer fed one fixed training batch over and over (loss must fall on it)."""

    @classmethod
    def build_train_loader(cls, cfg):
        return itertools.repeat(next(iter(Trainer.build_train_loader(cfg))))


def test_trains_through_trainer_checkpoint_and_eval_only(datasets_root, tmp_path):
    steps = 8
    cfg = _cfg(tmp_path / "train", ["SOLVER.MAX_ITER", str(steps), "SOLVER.BASE_LR", "0.001", "DATASETS.TEST", "()"])
    torch.manual_seed(0)
    trainer = _FixedBatchTrainer(cfg)
    recorder = RecordLoss()
    trainer.register_hooks([recorder])
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    losses = recorder.losses
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))  # frozen
    assert not torch.equal(before["head.partformer.part_tokens"], after["head.partformer.part_tokens"])
    assert not any(k.startswith("head.perceptual") for k in after)  # φ comes from its file, not checkpoints

    # checkpoint round trip: a fresh model loading model_final gives identical outputs
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert os.path.isfile(weights)
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(weights)
    model.eval()
    fresh.eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [mapper(r) for r in DatasetCatalog.get("toyparts_parts_val")[:2]]
    for a, b in zip(model(inputs), fresh(inputs)):
        assert torch.equal(a["part_probs"], b["part_probs"])

    # --eval-only through the CLI with the part_nmi_ari evaluator on the part annotations
    returncode, log = run_train_net(
        "--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "eval"
    )
    assert returncode == 0, log[-3000:]
    assert "Part NMI/ARI (masks) on toyparts_parts_val (6 images)" in log and "FG-NMI" in log
