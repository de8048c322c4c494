"""(FG-)NMI/ARI: the pooled contingency-table scores equal scikit-learn on the flattened label arrays."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Instances
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from part_distillation.evaluation import build_evaluator
from part_distillation.evaluation.nmi_ari import (
    PartNMIARIEvaluator,
    ari_from_contingency,
    nmi_from_contingency,
    paint_part_instances,
    sample_at_points,
)

from conftest import register_records


def _table(gt, pred):
    table = np.zeros((gt.max() + 1, pred.max() + 1), np.int64)
    np.add.at(table, (gt, pred), 1)
    return table


def _sk(gt, pred):
    return 100 * normalized_mutual_info_score(gt, pred), 100 * adjusted_rand_score(gt, pred)


@pytest.mark.parametrize("seed", range(4))
def test_contingency_scores_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    gt = rng.integers(0, rng.integers(1, 8), n)
    pred = (gt + rng.integers(0, 3, n) * (rng.random(n) < 0.4)) % 9 if seed % 2 else rng.integers(0, 6, n)
    table = _table(gt, pred)
    assert nmi_from_contingency(table) == pytest.approx(normalized_mutual_info_score(gt, pred), abs=1e-12)
    assert ari_from_contingency(table) == pytest.approx(adjusted_rand_score(gt, pred), abs=1e-12)


@pytest.mark.parametrize(
    "gt,pred",
    [([0, 0, 0], [1, 1, 1]), ([0, 0, 1], [2, 2, 2]), ([0, 1, 2], [0, 1, 2]), ([0, 1, 1, 0], [0, 0, 1, 1]), ([4], [7])],
)
def test_limit_cases_equal_sklearn(gt, pred):
    gt, pred = np.array(gt), np.array(pred)
    table = _table(gt, pred)
    assert nmi_from_contingency(table) == pytest.approx(normalized_mutual_info_score(gt, pred))
    assert ari_from_contingency(table) == pytest.approx(adjusted_rand_score(gt, pred))


def test_ari_has_no_int64_overflow():
    """10^9 samples: pair counts ~10^18 and their products ~10^36 stay exact (Python integers)."""
    table = np.array([[400_000_000, 100_000_000], [50_000_000, 450_000_000]], dtype=np.int64)
    small = table // 10_000_000  # same proportions at 100 samples
    gt = np.repeat([0, 0, 1, 1], small.ravel())
    pred = np.repeat([0, 1, 0, 1], small.ravel())
    assert ari_from_contingency(table) == pytest.approx(adjusted_rand_score(gt, pred), abs=2e-2)
    assert -1 <= ari_from_contingency(table) <= 1


def _mask_evaluator_run(name, gts, preds, probs=None, **kwargs):
    ev = PartNMIARIEvaluator(name, target="masks", distributed=False, **kwargs)
    ev.reset()
    for i, (gt, pred) in enumerate(zip(gts, preds)):
        out = {"part_seg": torch.from_numpy(pred)}
        if probs is not None:
            out["part_probs"] = torch.from_numpy(probs[i])
        ev.process([{"image_id": i, "sem_seg": torch.from_numpy(gt)}], [out])
    return ev.evaluate()["part_nmi_ari_masks"]


def test_random_masks_pooled_equal_sklearn():
    """Random GT with background 40 and ignore 255 (PartImageNet-Seg encoding), random predictions."""
    rng = np.random.default_rng(0)
    name = register_records("nmi_masks_random", background_label=40, ignore_label=255)
    gts, preds = [], []
    for _ in range(5):
        h, w = rng.integers(6, 20, 2)
        gt = rng.choice([0, 3, 7, 40, 40, 255], size=(h, w))
        gts.append(gt)
        preds.append(np.where(rng.random((h, w)) < 0.6, (gt % 5) + 1, rng.integers(0, 5, (h, w))))
    res = _mask_evaluator_run(name, gts, preds)
    g = np.concatenate([x.ravel() for x in gts])
    p = np.concatenate([x.ravel() for x in preds])
    valid, fg = g != 255, (g != 255) & (g != 40)
    assert (res["NMI"], res["ARI"]) == pytest.approx(_sk(g[valid], p[valid]), abs=1e-9)
    assert (res["FG-NMI"], res["FG-ARI"]) == pytest.approx(_sk(g[fg], p[fg]), abs=1e-9)
    assert res["num_samples"] == valid.sum() and res["num_fg_samples"] == fg.sum()


def test_fg_uses_argmax_over_foreground_channels():
    rng = np.random.default_rng(1)
    name = register_records("nmi_masks_probs", background_label=0)
    gt = rng.integers(0, 4, (12, 12))
    probs = rng.random((5, 12, 12)).astype(np.float32)
    probs[0] *= 3  # background often wins the full argmax
    full = probs.argmax(0)
    res = _mask_evaluator_run(name, [gt], [full], probs=[probs])
    fg_pred = probs[1:].argmax(0) + 1
    fg = gt != 0
    assert (res["FG-NMI"], res["FG-ARI"]) == pytest.approx(_sk(gt[fg], fg_pred[fg]), abs=1e-9)
    assert (res["NMI"], res["ARI"]) == pytest.approx(_sk(gt.ravel(), full.ravel()), abs=1e-9)


@pytest.mark.parametrize("permute", [False, True])
def test_perfect_and_permuted_labeling_score_100(permute):
    rng = np.random.default_rng(2)
    name = register_records("nmi_masks_perfect", background_label=0)
    gts = [rng.integers(0, 5, (10, 7)) for _ in range(3)]
    perm = np.array([6, 3, 1, 4, 2]) if permute else np.arange(5)  # the background label renamed too
    preds = [perm[g] for g in gts]
    res = _mask_evaluator_run(name, gts, preds)
    for key in ("NMI", "ARI", "FG-NMI", "FG-ARI"):
        assert res[key] == pytest.approx(100.0)


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_annotation_gt_and_part_instances_painting():
    """GT painted from part annotations (bg 0), prediction from overlapping part_instances (later wins)."""
    h, w = 8, 9
    gt = np.zeros((h, w), np.int64)
    gt[1:5, 1:5] = 3
    gt[4:8, 3:9] = 2
    anns = [
        {"segmentation": _rle(gt == 3), "category_id": 2, "object_id": 1, "iscrowd": 0},
        {"segmentation": _rle(gt == 2), "category_id": 1, "object_id": 1, "iscrowd": 0},
    ]
    name = register_records("nmi_annotations", [{"image_id": 0, "height": h, "width": w, "annotations": anns}])
    inst = Instances((h, w))
    m1, m2 = np.zeros((h, w), bool), np.zeros((h, w), bool)
    m1[0:6, 0:6] = True
    m2[3:8, 2:9] = True
    inst.pred_masks = torch.from_numpy(np.stack([m1, m2]))
    inst.pred_classes = torch.tensor([4, 0])
    painted = paint_part_instances(inst).numpy()
    expected = np.zeros((h, w), np.int64)
    expected[m1] = 5
    expected[m2] = 1  # the later mask overwrites the overlap
    assert (painted == expected).all()
    ev = PartNMIARIEvaluator(name, distributed=False)
    ev.reset()
    ev.process([{"image_id": 0}], [{"part_instances": inst}])
    res = ev.evaluate()["part_nmi_ari_masks"]
    # painted annotations: category 2 → 3, category 1 → 2, later annotation overwrites: same as gt
    assert (res["NMI"], res["ARI"]) == pytest.approx(_sk(gt.ravel(), expected.ravel()), abs=1e-9)
    fg = gt > 0
    assert (res["FG-NMI"], res["FG-ARI"]) == pytest.approx(_sk(gt[fg], expected[fg]), abs=1e-9)


def test_eval_size_resizes_gt_and_prediction():
    rng = np.random.default_rng(3)
    name = register_records("nmi_masks_resize", background_label=0)
    gt = rng.integers(0, 4, (16, 24))
    pred = rng.integers(0, 3, (8, 8))
    res = _mask_evaluator_run(name, [gt], [pred], eval_size=4)
    g = F.interpolate(torch.from_numpy(gt)[None, None].float(), size=(4, 4), mode="nearest")[0, 0].long().numpy()
    p = F.interpolate(torch.from_numpy(pred)[None, None].float(), size=(4, 4), mode="nearest")[0, 0].long().numpy()
    assert (res["NMI"], res["ARI"]) == pytest.approx(_sk(g.ravel(), p.ravel()), abs=1e-9)


def test_point_sampling_matches_grid_sample_nearest():
    rng = np.random.default_rng(4)
    labels = torch.from_numpy(rng.integers(0, 9, (13, 17)))
    frame = (52, 68)  # prediction at 1/4 of the frame
    xy = np.concatenate([rng.uniform(0, 68, (200, 1)), rng.uniform(0, 52, (200, 1))], axis=1)
    sampled, kept = sample_at_points(labels, xy, frame)
    assert kept.all()
    grid = torch.from_numpy(np.stack([xy[:, 0] / 68 * 2 - 1, xy[:, 1] / 52 * 2 - 1], 1)).float()
    ref = F.grid_sample(labels[None, None].float(), grid[None, None], mode="nearest", align_corners=False)
    assert (sampled.numpy() == ref[0, 0, 0].long().numpy()).all()
    # exactly on a pixel boundary (grid_sample's float rounding is arbitrary there): the pixel containing it
    on_boundary, _ = sample_at_points(labels, np.array([[8.0, 12.0], [0.0, 51.9], [67.99, 0.0]]), frame)
    assert on_boundary.tolist() == [labels[3, 2].item(), labels[12, 0].item(), labels[0, 16].item()]


def test_keypoints_pooled_equal_sklearn():
    """Landmark id vs the part under each visible landmark, pooled over images (mapper keypoints)."""
    rng = np.random.default_rng(5)
    name = register_records("nmi_keypoints", keypoint_names=[str(i) for i in range(6)])
    ev = PartNMIARIEvaluator(name, target="keypoints", distributed=False)
    ev.reset()
    gt_all, full_all, fg_all = [], [], []
    for i in range(6):
        seg = rng.integers(0, 4, (20, 30))
        probs = rng.random((4, 20, 30)).astype(np.float32)
        kps = np.concatenate(
            [rng.integers(0, 30, (6, 1)) + 0.5, rng.integers(0, 20, (6, 1)) + 0.5, (rng.random((6, 1)) < 0.7)], axis=1
        )
        vis = kps[:, 2] > 0.5
        cols, rows = kps[vis, 0].astype(int), kps[vis, 1].astype(int)
        gt_all.append(np.nonzero(vis)[0])
        full_all.append(seg[rows, cols])
        fg_all.append(probs[1:, rows, cols].argmax(0) + 1)
        inp = {"image_id": i, "keypoints": torch.from_numpy(kps).float(), "height": 20, "width": 30}
        ev.process([inp], [{"part_seg": torch.from_numpy(seg), "part_probs": torch.from_numpy(probs)}])
    res = ev.evaluate()["part_nmi_ari_keypoints"]
    g, f, fg = map(np.concatenate, (gt_all, full_all, fg_all))
    assert (res["NMI"], res["ARI"]) == pytest.approx(_sk(g, f), abs=1e-9)
    assert (res["FG-NMI"], res["FG-ARI"]) == pytest.approx(_sk(g, fg), abs=1e-9)
    assert res["num_samples"] == len(g)


def test_keypoints_from_record_scaled_to_prediction():
    """Record keypoints in original pixels; the prediction is at half resolution; perfect parts → 100."""
    kps = [[10.5, 4.5, 1], [30.5, 4.5, 1], [20.5, 30.5, 1], [0.0, 0.0, 0]]
    records = [{"image_id": i, "height": 40, "width": 40, "keypoints": kps} for i in range(2)]
    name = register_records("nmi_keypoints_record", records, keypoint_names=["a", "b", "c", "d"])
    seg = torch.zeros(20, 20, dtype=torch.long)
    seg[:, :10] = 1
    seg[:, 10:] = 2
    seg[10:, :] = 3
    ev = PartNMIARIEvaluator(name, target="keypoints", distributed=False)
    ev.reset()
    for i in range(2):
        ev.process([{"image_id": i}], [{"part_seg": seg}])
    res = ev.evaluate()["part_nmi_ari_keypoints"]
    assert res["NMI"] == pytest.approx(100.0) and res["ARI"] == pytest.approx(100.0)
    assert res["num_samples"] == 6  # invisible landmark 3 skipped


def test_registered_types_build():
    from part_distillation.engine import load_cfg

    cfg = load_cfg("")
    name = register_records("nmi_build", evaluator_type="part_keypoints")
    ev = build_evaluator(cfg, name, "/tmp/unused")
    assert isinstance(ev, PartNMIARIEvaluator) and ev.target == "keypoints"
    name = register_records("nmi_build_masks", evaluator_type="part_nmi_ari")
    ev = build_evaluator(cfg, name, "/tmp/unused")
    assert isinstance(ev, PartNMIARIEvaluator) and ev.target == "masks" and ev.eval_size == 0
