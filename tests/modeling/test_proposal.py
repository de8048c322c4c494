"""Stage 2: ProposalModel builds with one class, trains on a pseudo-label store, loads a stage-0 decoder,
conditions its proposals on objects; the part-evaluation mapper and the evaluator-type switch."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.data.dataset_mappers.part_eval import PartEvalDatasetMapper, decode_segmentation
from part_distillation.data.gt_parts import write_gt_part_store
from part_distillation.engine import Trainer, load_cfg
from part_distillation.evaluation import build_evaluator
from part_distillation.evaluation.proposal_ar import ProposalAREvaluator
from part_distillation.modeling.meta_arch.proposal import INIT_PREFIXES, ProposalModel, proposal_inference
from part_distillation.utils.errors import ConfigError

from conftest import QUICK_STAGE0, REPO_ROOT, RecordLoss, tiny_quick_opts

QUICK_STAGE2 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")
STORE_NAME = "toyparts_train_pseudo_grouping"


@pytest.fixture(scope="module")
def store_root(datasets_root, tmp_path_factory):
    """The toyparts GT parts as a class-agnostic stage-1 store, registered as toyparts_train_pseudo_grouping."""
    root = str(tmp_path_factory.mktemp("pseudo_labels"))
    write_gt_part_store(
        "toyparts_parts_train",
        root,
        "toyparts_train",
        "grouping",
        part_classes=False,
        shard_size=5,
        config="toyparts GT parts",
        register_as=STORE_NAME,
    )
    return root


@pytest.fixture
def stage2_cfg(store_root, tmp_path):
    def make(max_iter=4, extra=()):
        opts = tiny_quick_opts(tmp_path / "out", max_iter) + ["DATASETS.PSEUDO_LABEL_ROOT", store_root]
        return load_cfg(QUICK_STAGE2, opts + list(extra))

    return make


@pytest.fixture(scope="module")
def model(store_root, tmp_path_factory):
    cfg = load_cfg(QUICK_STAGE2, tiny_quick_opts(tmp_path_factory.mktemp("m"), 1))
    return build_model(cfg).eval()


def test_builds_class_agnostic_with_uniform_points(model, stage2_cfg):
    cfg = stage2_cfg()
    assert isinstance(model, ProposalModel)
    assert model.sem_seg_head.predictor.class_embed.out_features == 2  # part + no-object
    assert model.criterion.num_classes == 1
    assert (model.criterion.oversample_ratio, model.criterion.importance_sample_ratio) == (1.0, 0.0)
    assert model.criterion.num_points == cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS
    assert model.per_pixel_assignment and model.apply_object_mask
    with pytest.raises(ConfigError, match="NUM_CLASSES 1"):
        build_model(stage2_cfg(extra=["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]))


def test_store_from_gt_parts(store_root):
    dicts = DatasetCatalog.get(STORE_NAME)
    gt = DatasetCatalog.get("toyparts_parts_train")
    assert len(dicts) == len(gt)
    record, source = dicts[0], gt[0]
    assert record["file_name"] == source["file_name"]
    assert {a["category_id"] for a in record["annotations"]} == {0}  # class-agnostic parts
    # one store object per GT object, each the union of its parts
    assert len(record["objects"]) == len({a["object_id"] for a in source["annotations"]})
    h, w = record["height"], record["width"]
    for obj in record["objects"]:
        union = np.zeros((h, w), dtype=bool)
        for a in record["annotations"]:
            if a["object_id"] == obj["object_id"]:
                union |= decode_segmentation(a["segmentation"], h, w)
        assert np.array_equal(union, decode_segmentation(obj["segmentation"], h, w))


def test_training_on_store_lowers_loss_with_reference_freezing(stage2_cfg):
    cfg = stage2_cfg(
        max_iter=30,
        extra=[
            "MODEL.MASK_FORMER.FREEZE_KEYS",
            '["backbone", "encoder"]',
            "TEST.EVAL_PERIOD",
            "0",
            "DATASETS.TEST",
            "()",
        ],
    )
    trainer = Trainer(cfg)
    recorder = RecordLoss()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    params = dict(trainer.model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if "backbone" in n or "encoder" in n}
    assert any("pixel_decoder.transformer.encoder" in n for n in frozen)
    class_head = params["sem_seg_head.predictor.class_embed.weight"].detach().clone()
    # TorchScript's optimising executor profiles and fuses the criterion's scripted losses on their first
    # calls, which took up to ~20 s on the loaded 2-core test machine; the numbers are the same without it.
    with torch.jit.optimized_execution(False):
        trainer.train()
    losses = recorder.losses
    assert len(losses) == 30
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.85 * first, f"loss did not decrease: first {first:.2f}, last {last:.2f}"
    for name, before in frozen.items():
        assert torch.equal(before, params[name]), name
    assert not torch.equal(class_head, params["sem_seg_head.predictor.class_embed.weight"])


def _stage0_checkpoint(tmp_path):
    cfg = load_cfg(QUICK_STAGE0, tiny_quick_opts(tmp_path / "s0", 1))
    stage0 = build_model(cfg)
    with torch.no_grad():
        for value in stage0.state_dict().values():
            if value.is_floating_point():
                value.add_(0.5)  # distinguishable from any fresh initialisation
    DetectionCheckpointer(stage0, save_dir=str(tmp_path)).save("stage0")
    return stage0, os.path.join(str(tmp_path), "stage0.pth")


def test_init_from_loads_decoder_tensors_only(stage2_cfg, tmp_path, caplog):
    stage0, path = _stage0_checkpoint(tmp_path)
    theirs = stage0.state_dict()
    with caplog.at_level(logging.INFO, logger="part_distillation.modeling.meta_arch.proposal"):
        model = build_model(stage2_cfg(extra=["MODEL.PROPOSAL.INIT_FROM", path]))
    ours = model.state_dict()
    report = model.init_report
    class_head = {"sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias"}
    assert {name for name, _, _ in report["shape_mismatch"]} == class_head
    assert report["shape_mismatch"][0][1][0] == 6 and report["shape_mismatch"][0][2][0] == 2  # Nc+1: 5+1 vs 1+1
    expected = {n for n in ours if n.startswith(INIT_PREFIXES)} - class_head
    assert set(report["loaded"]) == expected and not report["missing"]
    for name in expected:
        assert torch.equal(ours[name], theirs[name]), name
    for name in class_head:
        assert not torch.equal(ours[name][:2], theirs[name][:2])
    backbone = [n for n in ours if n.startswith("backbone.") and ours[n].is_floating_point()]
    assert backbone and not any(torch.equal(ours[n], theirs[n]) for n in backbone)
    assert "Skipped sem_seg_head.predictor.class_embed.weight" in caplog.text
    assert f"Initialised {len(expected)} tensors" in caplog.text

    # a model-zoo style .pkl (numpy arrays) works the same
    pkl = tmp_path / "stage0.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in theirs.items()}, "__author__": "test"}, f)
    model = build_model(stage2_cfg(extra=["MODEL.PROPOSAL.INIT_FROM", str(pkl)]))
    assert set(model.init_report["loaded"]) == expected

    with pytest.raises(ConfigError, match="MODEL.PROPOSAL.INIT_FROM"):
        build_model(stage2_cfg(extra=["MODEL.PROPOSAL.INIT_FROM", str(tmp_path / "missing.pth")]))


def _hand_built():
    """3 queries on 8×8; the object is columns 0-3. q0 fires on cols 0-2, q1 on 5-7 (outside the
    object), q2 on cols 1-3 (overlapping q0, with a lower part probability)."""
    logits = torch.full((3, 8, 8), -5.0)
    logits[0, :, 0:3] = 5.0
    logits[1, :, 5:8] = 5.0
    logits[2, :, 1:4] = 5.0
    mask_cls = torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.0, 0.0]])  # (part, no-object)
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[:, 0:4] = True
    return mask_cls, logits, obj


def _by_column(inst):
    return [tuple(torch.nonzero(m.any(0)).flatten().tolist()) for m in inst.pred_masks.bool()]


def test_object_conditioning_hand_built():
    mask_cls, logits, obj = _hand_built()
    plain = proposal_inference(mask_cls, logits, topk=3)
    assert sorted(_by_column(plain)) == [(0, 1, 2), (1, 2, 3), (5, 6, 7)]

    overlapping = proposal_inference(mask_cls, logits, topk=3, object_mask=obj, per_pixel_assignment=False)
    assert sorted(_by_column(overlapping)) == [(0, 1, 2), (1, 2, 3)]  # q1 (outside the object) vanished

    exclusive = proposal_inference(mask_cls, logits, topk=3, object_mask=obj, per_pixel_assignment=True)
    # columns 1-2 go to q0 (higher s·sigmoid), q2 keeps column 3; q1 vanished
    assert _by_column(exclusive) == [(0, 1, 2), (3,)]
    masks = exclusive.pred_masks.bool()
    assert (masks.sum(0) <= 1).all() and not (masks.any(0) & ~obj).any()
    assert torch.equal(exclusive.pred_classes, torch.zeros(2, dtype=torch.int64))
    assert (exclusive.scores[:-1] >= exclusive.scores[1:]).all()
    p0 = torch.softmax(mask_cls[0], 0)[0]
    assert torch.isclose(exclusive.scores[0], p0 * torch.sigmoid(torch.tensor(5.0)))  # P(part)·mean mask prob

    # top-k by P(part) happens before masking: k=1 keeps only q0
    assert _by_column(proposal_inference(mask_cls, logits, topk=1, object_mask=obj)) == [(0, 1, 2)]
    # no object at all: nothing survives
    assert len(proposal_inference(mask_cls, logits, topk=3, object_mask=torch.zeros_like(obj))) == 0


def test_model_forward_conditions_on_objects(model):
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)
    objects = Instances((128, 96))
    masks = torch.zeros(2, 128, 96, dtype=torch.bool)
    masks[0, 8:70, 8:60] = True
    masks[1, 80:120, 30:90] = True
    objects.gt_masks = masks
    with torch.no_grad():
        free = model([{"image": image, "height": 64, "width": 48}])[0]["instances"]
        inst = model([{"image": image, "height": 64, "width": 48, "objects": objects}])[0]["instances"]
    assert free.image_size == inst.image_size == (64, 48)
    assert len(free) == model.test_topk_per_image and len(inst) > 0
    pred = inst.pred_masks.bool()
    union = (
        torch.nn.functional.interpolate(masks.any(0)[None, None].float(), size=(64, 48), mode="bilinear")[0, 0] >= 0.5
    )
    assert pred.flatten(1).any(1).all()  # empty predictions were dropped
    assert not (pred & ~union).any() and (pred.sum(0) <= 1).all()
    model.per_pixel_assignment = False
    try:
        with torch.no_grad():
            overlapping = model([{"image": image, "height": 64, "width": 48, "objects": objects}])[0]["instances"]
    finally:
        model.per_pixel_assignment = True
    assert not (overlapping.pred_masks.bool() & ~union).any()
    assert len(overlapping) >= len(inst)


def test_part_eval_mapper_objects(stage2_cfg):
    cfg = stage2_cfg(extra=["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    mapper = build_dataset_mapper(cfg, is_train=False)
    assert isinstance(mapper, PartEvalDatasetMapper)
    record = DatasetCatalog.get("toyparts_parts_val")[0]
    out = mapper(record)
    assert (out["height"], out["width"]) == (record["height"], record["width"]) == (128, 128)
    assert tuple(out["image"].shape) == (3, 64, 64) and "annotations" not in out
    objects = out["objects"]
    object_ids = list(dict.fromkeys(a["object_id"] for a in record["annotations"]))
    assert objects.image_size == (64, 64) and tuple(objects.gt_masks.shape) == (len(object_ids), 64, 64)
    # at full size the objects are exactly the unions of their parts
    full = build_dataset_mapper(stage2_cfg(), is_train=False)(record)["objects"].gt_masks.numpy()
    for mask, object_id in zip(full, object_ids):
        union = np.zeros((128, 128), dtype=bool)
        for a in record["annotations"]:
            if a["object_id"] == object_id:
                union |= decode_segmentation(a["segmentation"], 128, 128)
        assert np.array_equal(mask, union)

    # a record with the dataset's own object masks (Pascal-Part style) uses those
    square = np.zeros((128, 128), dtype=bool)
    square[10:50, 20:90] = True
    from part_distillation.data.pseudo_labels import encode_mask

    with_objects = dict(
        record, object_annotations=[{"object_id": 7, "category_id": 3, "segmentation": encode_mask(square)}]
    )
    out = build_dataset_mapper(stage2_cfg(), is_train=False)(with_objects)
    assert np.array_equal(out["objects"].gt_masks.numpy(), square[None])
    assert out["objects"].gt_classes.tolist() == [3]

    with pytest.raises(ConfigError, match="TEST_DATASET_MAPPER_NAME"):
        PartEvalDatasetMapper(cfg, is_train=True)


def test_evaluator_type_override(stage2_cfg):
    cfg = stage2_cfg()
    assert isinstance(build_evaluator(cfg, "toyparts_parts_val"), ProposalAREvaluator)
    cfg.TEST.EVALUATOR_TYPE = ""
    assert isinstance(build_evaluator(cfg, "toyparts_parts_val"), COCOEvaluator)  # the dataset's own type
