"""AR@k of part proposals: identical to pycocotools' COCOeval AR on generated predictions."""

import copy

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from part_distillation.evaluation.proposal_ar import DEFAULT_MAX_DETS, ProposalAREvaluator, match_ranks

from conftest import register_records

H = W = 48


def _random_dataset(rng, num_images=12):
    """Images with 0–5 rectangular GT parts belonging to one of 2 object classes."""
    records = []
    for i in range(num_images):
        anns = []
        for j in range(rng.integers(0, 6)):
            m = np.zeros((H, W), np.uint8)
            y, x = rng.integers(0, H - 8, 2)
            m[y : y + rng.integers(4, 20), x : x + rng.integers(4, 20)] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append(
                {
                    "segmentation": rle,
                    "category_id": int(rng.integers(0, 4)),
                    "object_id": 1000 * i + j,
                    "iscrowd": 0,
                    "bbox": list(mask_util.toBbox(rle)),
                    "area": float(m.sum()),
                }
            )
        records.append({"image_id": i, "height": H, "width": W, "file_name": f"{i}.jpg", "annotations": anns})
    return records


def _random_predictions(rng, records):
    """Noisy copies of GT masks plus random boxes, with random scores (ties included)."""
    preds = {}
    for r in records:
        masks = []
        for ann in r["annotations"]:
            m = mask_util.decode(ann["segmentation"]).astype(bool)
            if rng.random() < 0.8:
                masks.append(np.roll(m, rng.integers(-3, 4, 2), axis=(0, 1)))
        for _ in range(rng.integers(0, 25)):
            m = np.zeros((H, W), bool)
            y, x = rng.integers(0, H - 8, 2)
            m[y : y + rng.integers(4, 24), x : x + rng.integers(4, 24)] = True
            masks.append(m)
        scores = np.round(rng.random(len(masks)), 1)  # ties exercise the stable ordering
        preds[r["image_id"]] = (np.array(masks).reshape(-1, H, W), scores)
    return preds


def _cocoeval_ar(records, preds, max_dets):
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "part"}]}
    for r in records:
        gt["images"].append({"id": r["image_id"], "height": H, "width": W})
        for k, ann in enumerate(r["annotations"]):
            gt["annotations"].append(
                dict(copy.deepcopy(ann), id=len(gt["annotations"]) + 1, image_id=r["image_id"], category_id=1)
            )
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    dts = []
    for image_id, (masks, scores) in preds.items():
        for m, s in zip(masks, scores):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            dts.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(s)})
    coco_dt = coco_gt.loadRes(dts)
    ev = COCOeval(coco_gt, coco_dt, "segm")
    ev.params.maxDets = list(max_dets)
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.evaluate()
    ev.accumulate()
    recall = ev.eval["recall"]  # [T, K, A, M]
    return {k: 100.0 * recall[:, 0, 0, i].mean() for i, k in enumerate(max_dets)}


@pytest.fixture
def registered(request):
    rng = np.random.default_rng(request.param)
    records = _random_dataset(rng)
    name = register_records(
        f"ar_fixture_{request.param}", records, object_classes=["A", "B"], part_to_object=[0, 0, 1, 1]
    )
    return name, records, _random_predictions(rng, records)


def _run(name, records, preds, **kwargs):
    ev = ProposalAREvaluator(name, distributed=False, merge_same_class_parts=False, **kwargs)
    ev.reset()
    for r in records:
        masks, scores = preds[r["image_id"]]
        inst = Instances((H, W), pred_masks=torch.from_numpy(masks), scores=torch.from_numpy(scores).float())
        ev.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    return ev.evaluate()["part_proposals"]


@pytest.mark.parametrize("registered", [0, 1, 2], indirect=True)
def test_matches_cocoeval(registered):
    name, records, preds = registered
    ours = _run(name, records, preds)
    reference = _cocoeval_ar(records, preds, DEFAULT_MAX_DETS)
    for k in DEFAULT_MAX_DETS:
        assert ours[f"AR@{k}"] == pytest.approx(reference[k], abs=1e-9), k


@pytest.mark.parametrize("registered", [3], indirect=True)
def test_per_object_class_pools_to_overall(registered):
    name, records, preds = registered
    res = _run(name, records, preds)
    part_to_object = [0, 0, 1, 1]
    obj = [part_to_object[a["category_id"]] for r in records for a in r["annotations"]]
    n = {c: obj.count(c) for c in (0, 1)}
    pooled = (res["AR@10-A"] * n[0] + res["AR@10-B"] * n[1]) / (n[0] + n[1])
    assert pooled == pytest.approx(res["AR@10"])
    assert res["num_gt_parts"] == n[0] + n[1]


def test_match_ranks_hand_case():
    # two predictions, two GT; the higher-scored prediction overlaps both, prefers the better IoU
    ious = np.array([[0.6, 0.9], [0.55, 0.0]])
    ranks = match_ranks(ious, thresholds=[0.5, 0.7])
    assert ranks[0].tolist() == [1, 0]  # t=0.5: det0 → gt1 (0.9), det1 → gt0 (0.55)
    assert ranks[1, 1] == 0 and ranks[1, 0] > 10**9  # t=0.7: gt0 unmatched


def test_merging_same_class_parts_of_one_object():
    """Two GT pieces of the same part class in one object count as one GT part."""
    m1 = np.zeros((H, W), np.uint8)
    m1[0:10, 0:10] = 1
    m2 = np.zeros((H, W), np.uint8)
    m2[20:30, 20:30] = 1
    anns = []
    for m in (m1, m2):
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append({"segmentation": rle, "category_id": 0, "object_id": 7, "iscrowd": 0})
    records = [{"image_id": 0, "height": H, "width": W, "annotations": anns}]
    DatasetCatalog.register("ar_merge_fixture", lambda: records)
    ev = ProposalAREvaluator("ar_merge_fixture", distributed=False)
    ev.reset()
    union = torch.from_numpy((m1 | m2).astype(bool))[None]
    ev.process([{"image_id": 0}], [{"instances": Instances((H, W), pred_masks=union, scores=torch.ones(1))}])
    res = ev.evaluate()["part_proposals"]
    assert res["num_gt_parts"] == 1 and res["AR@1"] == pytest.approx(100.0)
