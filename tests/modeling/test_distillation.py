"""Stage 4: PartDistillationModel — per-object-class part classifiers that scale as O×P×D, gradients only in the
GT object class's classifier, training on a store whose parts carry part_class, object-conditioned inference,
and INIT_FROM a stage-2 proposal checkpoint."""

import logging
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.data.gt_parts import write_gt_part_store
from part_distillation.data.skips import skip_counts
from part_distillation.engine import Trainer, load_cfg
from part_distillation.modeling.meta_arch.distillation import (
    DISTILLATION_INIT_PREFIXES,
    PartDistillationModel,
    PerObjectPartClassifier,
    object_part_inference,
)
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, tiny_quick_opts

QUICK_STAGE4 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml")
QUICK_STAGE2 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")
STORE_NAME = "toyparts_train_pseudo_ranking"
P = 8


@pytest.fixture(scope="module")
def store_root(datasets_root, tmp_path_factory):
    """The toyparts GT parts as a stage-3 store: part_class = the part's index within its object class's parts,
    objects with their class (data/gt_parts.py)."""
    root = str(tmp_path_factory.mktemp("pseudo_labels"))
    # category_id = part_class: detectron2's class histogram needs P thing classes
    write_gt_part_store(
        "toyparts_parts_train",
        root,
        "toyparts_train",
        "ranking",
        part_classes=True,
        shard_size=6,
        config="toyparts GT, part_class",
        register_as=STORE_NAME,
        thing_classes=[f"part {k}" for k in range(P)],
    )
    return root


@pytest.fixture
def stage4_cfg(store_root, tmp_path):
    def make(max_iter=4, extra=()):
        opts = tiny_quick_opts(tmp_path / "out", max_iter) + [
            "DATASETS.PSEUDO_LABEL_ROOT",
            store_root,
            "DATASETS.TRAIN",
            f"('{STORE_NAME}',)",
        ]
        return load_cfg(QUICK_STAGE4, opts + list(extra))

    return make


@pytest.fixture(scope="module")
def model(store_root, tmp_path_factory):
    cfg = load_cfg(QUICK_STAGE4, tiny_quick_opts(tmp_path_factory.mktemp("m"), 1))
    torch.manual_seed(0)
    return build_model(cfg)


def test_store_and_mapper_carry_part_and_object_classes(stage4_cfg):
    dicts = DatasetCatalog.get(STORE_NAME)
    assert {a["part_class"] for d in dicts for a in d["annotations"]} <= set(range(P))
    mapper = build_dataset_mapper(stage4_cfg(), is_train=True)
    out = next(o for o in map(mapper, dicts) if o is not None)
    inst = out["instances"]
    assert inst.gt_classes.max() < P and inst.gt_object_classes.min() >= 0
    # every part's object class is the one its GT category belongs to
    assert inst.gt_object_classes.max() < 5 and len(inst.gt_object_classes) == len(inst)


def test_classifier_scales_as_o_p_d_without_dense_layer(model):
    d = model.sem_seg_head.predictor.class_embed.in_features
    assert model.sem_seg_head.predictor.class_embed.out_features == 2  # objectness: part, no-part
    assert model.criterion.num_classes == 1 and "loss_part_ce_0" in model.criterion.weight_dict
    small = sum(p.numel() for p in model.part_classifier.parameters())
    assert small == 5 * P * (d + 1)
    # O = 21000 (ImageNet-21K): O×P×(D+1) parameters in an embedding table, no O·P-way linear layer
    big = PerObjectPartClassifier(21000, P, d)
    assert sum(p.numel() for p in big.parameters()) == 21000 * P * (d + 1)
    assert not any(isinstance(m, torch.nn.Linear) for m in big.modules())
    assert all(max(p.shape) <= P * d for p in big.parameters() if p.dim() > 1 and p.shape[0] != 21000)
    feats = torch.randn(3, d)
    logits = big(feats, torch.tensor([0, 20999, 7]))
    assert logits.shape == (3, P)
    w = big.weight.weight[20999].view(P, d)
    assert torch.allclose(logits[1], w @ feats[1] + big.bias.weight[20999], atol=1e-5)
    # the whole model at O = 21000: only the table grows, and no layer has O·P = 168K outputs
    cfg = load_cfg(QUICK_STAGE4, ["MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES", "21000"])
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    full = build_model(cfg)
    total = sum(p.numel() for p in full.parameters())
    assert total - sum(p.numel() for p in model.parameters()) == (21000 - 5) * P * (d + 1)
    assert max(m.out_features for m in full.modules() if isinstance(m, torch.nn.Linear)) < 21000 * P
    del full
    with pytest.raises(ConfigError, match="NUM_CLASSES 1"):
        PartDistillationModel.from_config(load_cfg(QUICK_STAGE4, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"]))


def test_gradient_reaches_only_gt_object_rows(model):
    model.train()
    torch.manual_seed(1)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    inst = Instances((64, 64))
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32] = True
    masks[1, 32:] = True
    inst.gt_masks = masks
    inst.gt_classes = torch.tensor([1, 5])
    inst.gt_object_classes = torch.tensor([3, 3])
    model.zero_grad(set_to_none=True)
    losses = model([{"image": image, "instances": inst}])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_part_ce"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss_part_ce")).backward()
    grad_w, grad_b = model.part_classifier.weight.weight.grad, model.part_classifier.bias.weight.grad
    others = [o for o in range(5) if o != 3]
    assert torch.count_nonzero(grad_w[others]) == 0 and torch.count_nonzero(grad_b[others]) == 0
    assert grad_w[3].abs().sum() > 0 and grad_b[3].abs().sum() > 0
    # the objectness head gets no gradient from the part loss
    assert (
        model.sem_seg_head.predictor.class_embed.weight.grad is None
        or not model.sem_seg_head.predictor.class_embed.weight.grad.any()
    )
    # the total loss (objectness, masks, parts, all prediction sets) leaves the other rows untouched too
    model.zero_grad(set_to_none=True)
    sum(model([{"image": image, "instances": inst}]).values()).backward()
    grad_w = model.part_classifier.weight.weight.grad
    assert torch.count_nonzero(grad_w[others]) == 0 and grad_w[3].abs().sum() > 0
    assert model.sem_seg_head.predictor.class_embed.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    inst.gt_object_classes = torch.tensor([3, 9])
    with pytest.raises(ConfigError, match="outside"):
        model([{"image": image, "instances": inst}])
    model.eval()


class RecordLoss(HookBase):
    def __init__(self):
        self.losses, self.part = [], []

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())
        self.part.append(self.trainer.storage.history("loss_part_ce").latest())


def test_training_on_part_class_store_lowers_loss(stage4_cfg):
    cfg = stage4_cfg(max_iter=30)
    trainer = Trainer(cfg)
    recorder = RecordLoss()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    table = trainer.model.part_classifier.weight.weight.detach().clone()
    with torch.jit.optimized_execution(False):
        trainer.train()
    first, last = np.mean(recorder.losses[:8]), np.mean(recorder.losses[-8:])
    assert len(recorder.losses) == 30 and last < 0.85 * first, (first, last)
    assert np.mean(recorder.part[-8:]) < np.mean(recorder.part[:8])
    assert not torch.equal(table, trainer.model.part_classifier.weight.weight)


def test_object_part_inference_hand_built():
    logits = torch.full((3, 8, 8), -5.0)
    logits[0, :, 0:3] = 5.0
    logits[1, :, 5:8] = 5.0  # outside the object
    logits[2, :, 1:4] = 5.0
    objectness = torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    part_logits = torch.zeros(3, P)
    part_logits[0, 2] = 4.0
    part_logits[2, 6] = 4.0
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[:, 0:4] = True
    masks, scores, labels = object_part_inference(objectness, part_logits, logits, obj, topk=3)
    assert labels.tolist() == [2, 6]
    expected = torch.softmax(objectness[0], 0)[0] * torch.softmax(part_logits[0], 0)[2]
    assert torch.isclose(scores[0], expected)
    assert masks[0].any(0).nonzero().flatten().tolist() == [0, 1, 2] and masks[1].any(
        0
    ).nonzero().flatten().tolist() == [3]
    # the same part class on two queries merges into one mask with the best score
    _, _, _, queries = object_part_inference(objectness, part_logits, logits, obj, topk=3, return_queries=True)
    assert queries.tolist() == [0, 2]  # query 1 lies outside the object
    part_logits[2] = part_logits[0]
    masks, scores, labels, queries = object_part_inference(
        objectness, part_logits, logits, obj, topk=3, return_queries=True
    )
    assert labels.tolist() == [2] and masks[0].any(0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert queries.tolist() == [0]  # the merged part keeps its best-scoring query


def test_inference_per_object_part_classes(model):
    model.eval()
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)
    objects = Instances((128, 96))
    masks = torch.zeros(3, 128, 96, dtype=torch.bool)
    masks[0, 8:70, 8:60] = True
    masks[1, 80:120, 30:90] = True
    masks[2, 0:10, 0:10] = True
    objects.gt_masks = masks
    objects.gt_classes = torch.tensor([4, 0, -1])  # the last has no known class: skipped and counted
    before = skip_counts().get("object_without_class", 0)
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 48, "objects": objects}])[0]
    assert skip_counts()["object_without_class"] - before == 1
    with torch.no_grad():
        inst = out["instances"]
        free = model([{"image": image, "height": 64, "width": 48}])[0]["instances"]
    assert inst.image_size == (64, 48) and len(inst) > 0 and len(free) > 0
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < P)).all()
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert set(inst.pred_object_index.tolist()) <= {0, 1} and set(inst.pred_object_classes.tolist()) <= {4, 0}
    small = torch.nn.functional.interpolate(masks[None].float(), size=(64, 48), mode="bilinear")[0] >= 0.5
    pred = inst.pred_masks.bool()
    for m in (0, 1):
        mine = pred[inst.pred_object_index == m]
        assert inst.pred_features.shape == (len(inst), model.part_classifier.hidden_dim)
        assert not (mine & ~small[m]).any() and (mine.sum(0) <= 1).all()
        labels = inst.pred_classes[inst.pred_object_index == m]
        assert len(labels.unique()) == len(labels)  # merged by part class
    parts = out["part_instances"]
    assert torch.equal(parts.features, inst.pred_features) and torch.equal(parts.object_index, inst.pred_object_index)
    # the scores are objectness × the object class's part probability
    objects.gt_classes = torch.tensor([4, 4, -1])
    with torch.no_grad():
        same = model([{"image": image, "height": 64, "width": 48, "objects": objects}])[0]["instances"]
    assert set(same.pred_object_classes.tolist()) == {4}


def test_init_from_proposal_checkpoint(stage4_cfg, tmp_path, caplog):
    cfg2 = load_cfg(QUICK_STAGE2, tiny_quick_opts(tmp_path / "s2", 1))
    proposal = build_model(cfg2)
    with torch.no_grad():
        for value in proposal.state_dict().values():
            if value.is_floating_point():
                value.add_(0.5)
    DetectionCheckpointer(proposal, save_dir=str(tmp_path)).save("proposal")
    path = os.path.join(str(tmp_path), "proposal.pth")
    theirs = proposal.state_dict()
    with caplog.at_level(logging.INFO, logger="part_distillation.modeling.meta_arch.proposal"):
        model = build_model(stage4_cfg(extra=["MODEL.PART_DISTILLATION.INIT_FROM", path]))
    ours = model.state_dict()
    report = model.init_report
    shared = {n for n in ours if n.startswith(DISTILLATION_INIT_PREFIXES)}  # all but part_classifier/criterion
    assert not any(n.startswith("part_classifier.") for n in shared)
    assert set(report["loaded"]) == shared and not report["shape_mismatch"] and not report["missing"]
    assert "sem_seg_head.predictor.class_embed.weight" in report["loaded"]  # the objectness head too
    for name in shared:
        assert torch.equal(ours[name], theirs[name]), name
    assert f"Initialised {len(shared)} tensors" in caplog.text
    with pytest.raises(ConfigError, match="INIT_FROM"):
        build_model(stage4_cfg(extra=["MODEL.PART_DISTILLATION.INIT_FROM", str(tmp_path / "missing.pth")]))


def test_clustered_path_has_one_part_per_query(model):
    """part_query_instances: the parts before the same-class merge, each with its own query feature; OR-ing them
    by (object, part class) gives the merged part_instances that mIoU-mapped reads."""
    model.eval()
    torch.manual_seed(1)
    image = torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8)
    objects = Instances((96, 96))
    objects.gt_masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    objects.gt_masks[0, 4:60, 4:60] = True
    objects.gt_masks[1, 60:96, 20:90] = True
    objects.gt_classes = torch.tensor([1, 2])
    with torch.no_grad():
        out = model([{"image": image, "objects": objects}])[0]
    merged, per_query = out["part_instances"], out["part_query_instances"]
    assert len(per_query) >= len(merged) > 0
    assert per_query.features.shape == (len(per_query), model.part_classifier.hidden_dim)
    for m in (0, 1):
        mine = per_query.object_index == m
        for c in per_query.pred_classes[mine].unique():
            union = per_query.pred_masks[mine & (per_query.pred_classes == c)].any(dim=0)
            row = (merged.object_index == m) & (merged.pred_classes == c)
            assert row.sum() == 1 and torch.equal(merged.pred_masks[row][0], union)
    model.merge_same_class = False
    try:
        with torch.no_grad():
            plain = model([{"image": image, "objects": objects}])[0]
    finally:
        model.merge_same_class = True
    assert torch.equal(plain["part_instances"].pred_masks, per_query.pred_masks)
    assert torch.equal(plain["part_query_instances"].features, per_query.features)
