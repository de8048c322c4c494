"""Part mIoU (mapped / clustered / direct) on tiny label maps whose IoUs are computed by hand."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances

from part_distillation.clustering.prototypes import cluster_features_per_class
from part_distillation.evaluation import build_evaluator
from part_distillation.evaluation.part_miou import (
    PartMIoUEvaluator,
    majority_vote_mapping,
    mapped_confusion,
    miou_from_confusion,
)

from conftest import register_records

PART_CLASSES = ["A head", "A body", "B x", "B y"]  # G = 4, background column 4
OBJECT_CLASSES = ["A", "B"]
PART_TO_OBJECT = [0, 0, 1, 1]

# Object A (4×5): head = 6 px, body = 6 px, background = 8 px.
GT_A = np.array(
    [
        [0, 0, 0, -1, -1],
        [0, 0, 0, -1, -1],
        [1, 1, 1, -1, -1],
        [1, 1, 1, -1, -1],
    ]
)
# Object B (4×5): part "B x" = 4 px; part "B y" is never annotated.
GT_B = np.array(
    [
        [2, 2, -1, -1, -1],
        [2, 2, -1, -1, -1],
        [-1, -1, -1, -1, -1],
        [-1, -1, -1, -1, -1],
    ]
)
H, W = GT_A.shape


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# Predictions on A, painted in order. id 9 is painted last: it takes r1c2 from id 5 and covers
# 1 head + 2 body + 6 background px ("mostly background", still mapped to body: 2 > 1).
PRED_A = [(_box(0, 2, 0, 3), 5), (_box(2, 4, 0, 2), 7), (_box(1, 4, 2, 5), 9)]
# Predictions on B: id 0 = exactly "B x"; id 1 lies on background only → no part overlap → part 0 ("A head"),
# a part absent from B's GT that still enters B's denominator.
PRED_B = [(_box(0, 2, 0, 2), 0), (_box(2, 4, 3, 5), 1)]

# Hand-computed: head IoU 5/6 (pred 5 px, all correct); body: pred = id7 (4) + id9 (9 px, 2 body) = 13 px,
# tp 6 → IoU 6/(6+13−6) = 6/13. B: IoU(B x) = 1, predicted-but-absent part 0 → mIoU_B = 1/2.
MIOU_A = (5 / 6 + 6 / 13) / 2
MIOU_B = 1.0 / 2


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _parts(gt, object_id):
    return [
        {"segmentation": _rle(gt == c), "category_id": int(c), "object_id": object_id, "iscrowd": 0}
        for c in np.unique(gt)
        if c >= 0
    ]


def _register(name, records):
    return register_records(
        name,
        records,
        part_classes=PART_CLASSES,
        object_classes=OBJECT_CLASSES,
        part_to_object=PART_TO_OBJECT,
        is_part_dataset=True,
    )


@pytest.fixture
def two_objects():
    records = [
        {"image_id": 0, "height": H, "width": W, "annotations": _parts(GT_A, 100)},
        {"image_id": 1, "height": H, "width": W, "annotations": _parts(GT_B, 200)},
    ]
    return _register("miou_two_objects", records)


def _instances(preds, features=None):
    inst = Instances((H, W))
    inst.pred_masks = torch.from_numpy(np.stack([m for m, _ in preds]))
    inst.pred_classes = torch.tensor([c for _, c in preds])
    inst.object_index = torch.zeros(len(preds), dtype=torch.long)
    if features is not None:
        inst.features = torch.tensor(features, dtype=torch.float32)
    return inst


def _run(name, outputs, **kwargs):
    kwargs.setdefault("distributed", False)
    ev = PartMIoUEvaluator(name, **kwargs)
    ev.reset()
    for image_id, out in enumerate(outputs):
        ev.process([{"image_id": image_id}], [out])
    return ev.evaluate()


def test_confusion_helpers_by_hand():
    # rows = predicted ids, columns = parts 0, 1 + background
    confusion = np.array([[6, 0, 0], [1, 2, 6], [0, 0, 3], [0, 4, 0]])
    mapping = majority_vote_mapping(confusion, 2)
    assert mapping.tolist() == [0, 1, 0, 1]  # row 2: background only → part 0 (reference tie rule)
    m = mapped_confusion(confusion, np.array([0, 0, 5]), mapping, 2)
    assert m.tolist() == [[6, 0, 3], [1, 6, 6], [0, 0, 5]]
    scores = miou_from_confusion(m)
    assert scores["iou"][0] == pytest.approx(6 / (7 + 9 - 6)) and scores["iou"][1] == pytest.approx(6 / (6 + 13 - 6))
    assert scores["miou"] == pytest.approx((0.6 + 6 / 13) / 2)
    assert scores["prec"][1] == pytest.approx(6 / 13) and scores["acc"][0] == pytest.approx(6 / 7)


def test_mapped_hand_computed(two_objects, tmp_path):
    res = _run(
        two_objects,
        [{"part_instances": _instances(PRED_A)}, {"part_instances": _instances(PRED_B)}],
        mode="mapped",
        output_dir=str(tmp_path),
    )["part_miou_mapped"]
    assert res["mIoU-A"] == pytest.approx(100 * MIOU_A)
    assert res["mIoU-B"] == pytest.approx(100 * MIOU_B)
    assert res["C-mIoU"] == pytest.approx(100 * (MIOU_A + MIOU_B) / 2)
    # A-mIoU: entries with GT (A head, A body, B x); the absent part is not an entry
    assert res["A-mIoU"] == pytest.approx(100 * (5 / 6 + 6 / 13 + 1.0) / 3)
    assert res["IoU-A head"] == pytest.approx(100 * 5 / 6) and res["IoU-B x"] == pytest.approx(100.0)
    assert "IoU-B y" not in res  # keyed by part_classes (thing_classes bug fixed): all G parts addressable
    # mACC: head 5/6, body 6/6 over A's 2 classes; B: 1 / 2 classes
    assert res["C-mACC"] == pytest.approx(100 * ((5 / 6 + 1) / 2 + 0.5) / 2)
    assert res["C-mIoPred"] == pytest.approx(100 * ((1 + 6 / 13) / 2 + 0.5) / 2)
    assert res["num_objects"] == 2 and res["num_object_classes"] == 2
    assert (tmp_path / "part_miou_mapped_mapping.json").is_file()


def test_part_seg_label_map_matches_instances(two_objects):
    """A per-object label map (0 = bg, k = id k − 1) gives the same result as the painted instances."""
    seg_a = np.zeros((H, W), np.int64)
    for mask, pid in PRED_A:
        seg_a[mask] = pid + 1
    seg_b = np.zeros((H, W), np.int64)
    for mask, pid in PRED_B:
        seg_b[mask] = pid + 1
    res = _run(two_objects, [{"part_seg": torch.from_numpy(seg_a)}, {"part_seg": torch.from_numpy(seg_b)[None]}])
    assert res["part_miou_mapped"]["C-mIoU"] == pytest.approx(100 * (MIOU_A + MIOU_B) / 2)
    # at twice the GT resolution (resized back by nearest), through the single-process gather path
    up = [torch.from_numpy(np.kron(s, np.ones((2, 2), np.int64))) for s in (seg_a, seg_b)]
    res = _run(two_objects, [{"part_seg": up[0]}, {"part_seg": up[1][None]}], distributed=True)
    assert res["part_miou_mapped"]["C-mIoU"] == pytest.approx(100 * (MIOU_A + MIOU_B) / 2)


def test_direct_mode_predicted_but_absent(two_objects):
    """Supervised ids: a part predicted on B but absent from its GT is a 0 in B's mean."""
    preds_b = [(_box(0, 2, 0, 2), 2), (_box(3, 4, 0, 5), 3)]  # "B x" exact, "B y" on background
    preds_a = [(GT_A == 0, 0), (GT_A == 1, 1)]
    res = _run(
        two_objects, [{"part_instances": _instances(preds_a)}, {"part_instances": _instances(preds_b)}], mode="direct"
    )["part_miou_direct"]
    assert res["mIoU-A"] == pytest.approx(100.0)
    assert res["mIoU-B"] == pytest.approx(50.0)
    assert res["A-mIoU"] == pytest.approx(100.0)


def test_clustered_uses_features_not_ids(two_objects):
    """Cluster ids replace pred_classes: identical features → same cluster → mapped like the hand case."""
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    garbage_a = [(m, 42) for m, _ in PRED_A]  # one id for all three: mapped mode would merge them
    out_a = {"part_instances": _instances(garbage_a, features=[e1, e2, e2])}
    out_b = {"part_instances": _instances(PRED_B, features=[e1, [0.0, 0.0, 1.0]])}
    res = _run(two_objects, [out_a, out_b], mode="clustered", num_clusters=8)["part_miou_clustered"]
    # A: clusters {id5} and {id7, id9}, exactly the mapped hand case; B: its 2 features are 2 clusters
    assert res["mIoU-A"] == pytest.approx(100 * MIOU_A)
    assert res["mIoU-B"] == pytest.approx(100 * MIOU_B)
    merged = _run(two_objects, [{"part_instances": _instances(garbage_a)}, {"part_instances": _instances(PRED_B)}])
    assert merged["part_miou_mapped"]["mIoU-A"] < res["mIoU-A"]


def test_clustered_needs_features(two_objects):
    with pytest.raises(ValueError, match="features"):
        _run(two_objects, [{"part_instances": _instances(PRED_A)}], mode="clustered")


def test_cluster_features_per_class_separates_groups():
    rng = np.random.default_rng(0)
    centers = np.eye(4)[:3] * 5
    feats = {c: np.concatenate([centers[i] + 0.01 * rng.standard_normal((10, 4)) for i in range(3)]) for c in (0, 3)}
    labels = cluster_features_per_class(feats, k=3, normalize=False)
    for c in (0, 3):
        groups = labels[c].reshape(3, 10)
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3


def test_pooling_over_instances_before_mapping():
    """The majority vote is per object class over all its instances, not per image."""
    records = [{"image_id": i, "height": H, "width": W, "annotations": _parts(GT_A, 10 + i)} for i in range(3)]
    name = _register("miou_pooling", records)
    body_heavy = [(GT_A == 1, 3)]  # id 3 on the body: 6 px
    head_light = [(_box(0, 1, 0, 2), 3)]  # id 3 on 2 head px
    outs = [{"part_instances": _instances(p)} for p in (body_heavy, body_heavy, head_light)]
    res = _run(name, outs)["part_miou_mapped"]
    # pooled row of id 3: head 2, body 12 → body; body IoU = 12 / (18 + 14 − 12), head never predicted: 0
    assert res["IoU-A body"] == pytest.approx(100 * 12 / 20)
    assert res["IoU-A head"] == pytest.approx(0.0)
    assert res["mIoU-A"] == pytest.approx(100 * (12 / 20) / 2)


def test_iou_object_matching_and_resize():
    """Two objects in one image; predictions at half resolution, objects matched through instances."""
    gt = np.full((8, 10), -1)
    gt[0:4, 0:4] = 0  # object 1 ("A head")
    gt[4:8, 6:10] = 2  # object 2 ("B x")
    anns = [
        {"segmentation": _rle(gt == 0), "category_id": 0, "object_id": 1, "iscrowd": 0},
        {"segmentation": _rle(gt == 2), "category_id": 2, "object_id": 2, "iscrowd": 0},
    ]
    name = _register("miou_two_in_one", [{"image_id": 0, "height": 8, "width": 10, "annotations": anns}])
    objs = Instances((4, 5))
    objs.pred_masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    objs.pred_masks[0, 2:4, 3:5] = True  # predicted object 0 = GT object 2 (B)
    objs.pred_masks[1, 0:2, 0:2] = True  # predicted object 1 = GT object 1 (A)
    parts = Instances((4, 5))
    parts.pred_masks = objs.pred_masks.clone()
    parts.pred_classes = torch.tensor([0, 0])
    parts.object_index = torch.tensor([0, 1])
    res = _run(name, [{"instances": objs, "part_instances": parts}], object_matching="iou")["part_miou_mapped"]
    assert res["C-mIoU"] == pytest.approx(100.0) and res["num_objects"] == 2


def test_registered_types_build(two_objects):
    from part_distillation.engine import load_cfg

    cfg = load_cfg("")
    cfg.defrost()
    cfg.TEST.EVALUATOR_TYPE = "part_miou"
    ev = build_evaluator(cfg, two_objects, "/tmp/unused")
    assert isinstance(ev, PartMIoUEvaluator) and ev.mode == "clustered" and ev.num_clusters == 8
    cfg.TEST.EVALUATOR_TYPE = "part_miou_mapped"
    assert build_evaluator(cfg, two_objects, "/tmp/unused").mode == "mapped"


def test_clustered_reads_per_query_parts_mapped_the_merged_ones(two_objects):
    """A model with a same-class merge (PartDistillationModel) gives merged part_instances and per-query
    part_query_instances: mIoU-clustered clusters the per-query features, mIoU-mapped scores the merged parts."""
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    merged_a = _instances([(PRED_A[0][0] | PRED_A[1][0] | PRED_A[2][0], 0)])  # one part: ids of no use here
    out_a = {"part_instances": merged_a, "part_query_instances": _instances(PRED_A, features=[e1, e2, e2])}
    out_b = {"part_instances": _instances(PRED_B), "part_query_instances": _instances(PRED_B, features=[e1, e2])}
    clustered = _run(two_objects, [out_a, out_b], mode="clustered", num_clusters=8)["part_miou_clustered"]
    assert clustered["mIoU-A"] == pytest.approx(100 * MIOU_A)  # clusters {id5}, {id7, id9}: the hand case
    mapped = _run(two_objects, [out_a, out_b])["part_miou_mapped"]
    only_merged = _run(two_objects, [{"part_instances": merged_a}, {"part_instances": _instances(PRED_B)}])
    assert mapped == only_merged["part_miou_mapped"] and mapped["mIoU-A"] < clustered["mIoU-A"]


def test_drop_object_like_parts_switch(two_objects):
    """TEST.PART_MIOU.DROP_OBJECT_LIKE_IOU: a prediction covering the whole object is dropped before scoring."""
    whole_a = (GT_A >= 0, 3)  # IoU 1 with object A: dropped at 0.5; painted last, it would cover every part
    outputs = [{"part_instances": _instances(PRED_A + [whole_a])}, {"part_instances": _instances(PRED_B)}]
    kept = _run(two_objects, outputs, mode="mapped")["part_miou_mapped"]
    dropped = _run(two_objects, outputs, mode="mapped", drop_object_like_iou=0.5)["part_miou_mapped"]
    # dropped: the whole-object part of A, and B's id 0, which is exactly B's only annotated part (= its object)
    assert "num_dropped_object_like" not in kept and dropped["num_dropped_object_like"] == 2
    # on A the scores are those of the hand-computed predictions without the whole-object part
    assert dropped["mIoU-A"] == pytest.approx(100 * MIOU_A) and kept["mIoU-A"] < dropped["mIoU-A"]
    assert dropped["IoU-B x"] == 0.0  # B keeps only its background prediction
    with pytest.raises(Exception, match="DROP_OBJECT_LIKE_IOU"):
        PartMIoUEvaluator(two_objects, drop_object_like_iou=1.5, distributed=False)
