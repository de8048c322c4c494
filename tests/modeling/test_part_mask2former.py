"""PartMask2Former base: the query-feature decoder equals Mask2Former's decoder, the pure post-processing
functions on hand-built cases, and mIoU-clustered on the ranking model's per-part query features."""

import itertools
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distillation.engine import Trainer, load_cfg
from part_distillation.evaluation.part_miou import PartMIoUEvaluator
from part_distillation.modeling.meta_arch.postprocessing import (
    assign_pixels,
    cat_instances,
    merge_same_class,
    object_masks,
    object_union,
)
from part_distillation.modeling.meta_arch.query_decoder import QueryFeatureTransformerDecoder
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, tiny_quick_opts

RANKING = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage3_ranking_toyparts.yaml")
PROPOSAL = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")


def _decoder_args():
    return dict(
        in_channels=16,
        mask_classification=True,
        num_classes=1,
        hidden_dim=16,
        num_queries=5,
        nheads=2,
        dim_feedforward=32,
        dec_layers=4,
        pre_norm=False,
        mask_dim=16,
        enforce_input_project=False,
    )


def test_query_decoder_is_mask2formers_decoder_plus_features():
    from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
        MultiScaleMaskedTransformerDecoder,
    )

    torch.manual_seed(0)
    upstream = MultiScaleMaskedTransformerDecoder(**_decoder_args()).eval()
    ours = QueryFeatureTransformerDecoder(**_decoder_args()).eval()
    ours.load_state_dict(upstream.state_dict(), strict=True)  # same names and shapes
    x = [torch.randn(2, 16, s, s) for s in (4, 8, 16)]
    mask_features = torch.randn(2, 16, 32, 32)
    normed = []
    upstream.decoder_norm.register_forward_hook(lambda m, i, o: normed.append(o.transpose(0, 1)))
    with torch.no_grad():
        expected = upstream(x, mask_features)
        got = ours(x, mask_features)
    sets_expected = expected["aux_outputs"] + [expected]
    sets_got = got["aux_outputs"] + [got]
    assert len(sets_got) == len(sets_expected) == len(normed) == 5  # dec_layers + 1
    for e, g, feats in zip(sets_expected, sets_got, normed):
        assert torch.equal(e["pred_logits"], g["pred_logits"]) and torch.equal(e["pred_masks"], g["pred_masks"])
        assert g["query_feats"].shape == (2, 5, 16) and torch.equal(g["query_feats"], feats)
        assert torch.allclose(ours.class_embed(g["query_feats"]), g["pred_logits"])


def test_part_models_refuse_a_decoder_without_query_features(datasets_root, tmp_path):
    assert load_cfg("").MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME == "QueryFeatureTransformerDecoder"
    cfg = load_cfg(PROPOSAL, tiny_quick_opts(tmp_path, 1))
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    with pytest.raises(ConfigError, match="TRANSFORMER_DECODER_NAME"):
        build_model(cfg)


def test_assign_pixels_by_hand():
    logits = torch.tensor([[[2.0, 2.0, -1.0]], [[1.0, 3.0, -1.0]]])  # 2 queries, 1×3 pixels
    scores = torch.tensor([0.9, 0.5])
    # pixel 0: 0.9·σ(2) > 0.5·σ(1) → query 0; pixel 1: 0.9·σ(2)=0.79 > 0.5·σ(3)=0.48 → query 0; pixel 2: off
    assert assign_pixels(scores, logits).tolist() == [[[True, True, False]], [[False, False, False]]]
    assert assign_pixels(scores, logits, per_pixel=False).tolist() == [[[True, True, False]], [[True, True, False]]]
    assert assign_pixels(scores[:0], logits[:0]).shape == (0, 1, 3)


def test_merge_same_class_keeps_best_score_and_query():
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)[:, None]
    scores, labels, index = torch.tensor([0.9, 0.8, 0.1]), torch.tensor([3, 1, 3]), torch.tensor([7, 2, 5])
    m, s, lab, idx = merge_same_class(masks, scores, labels, index)
    assert lab.tolist() == [3, 1] and s.tolist() == pytest.approx([0.9, 0.8]) and idx.tolist() == [7, 2]
    assert m[:, 0].tolist() == [[True, False, True], [False, True, False]]


def test_object_masks_resize_and_refuse_other_sizes():
    objects = Instances((4, 4))
    objects.gt_masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    objects.gt_masks[0, :2] = True
    objects.gt_masks[1, 2:] = True
    out = object_masks(objects, (4, 4), (8, 8), "cpu")
    assert out.shape == (2, 8, 8) and out[0, :4].all() and not out[0, 4:].any()
    assert object_union(objects, (4, 4), (8, 8), "cpu").all()
    assert torch.equal(object_masks(objects, (9, 9), (4, 4), "cpu"), objects.gt_masks)  # already at output size
    with pytest.raises(ValueError, match="match neither"):
        object_masks(objects, (5, 5), (8, 8), "cpu")


def test_cat_instances_is_empty_safe():
    empty = {"scores": torch.zeros(0), "features": torch.zeros(0, 3)}
    out = cat_instances((2, 2), {"scores": [], "features": []}, empty)
    assert len(out) == 0 and out.features.shape == (0, 3)
    out = cat_instances((2, 2), {"scores": [torch.ones(2)], "features": [torch.ones(2, 3)]}, empty)
    assert len(out) == 2 and out.features.shape == (2, 3)


def test_ranking_model_gives_mIoU_clustered(datasets_root, tmp_path):
    """PartRankingModel's parts carry ``features`` (one per kept query) that mIoU-clustered clusters."""
    opts = tiny_quick_opts(tmp_path, 1) + [
        "DATASETS.TEST",
        "('toyparts_parts_val',)",
        "INPUT.TEST_DATASET_MAPPER_NAME",
        "PartEvalDatasetMapper",
        "MODEL.PART_RANKING.MIN_SCORE",
        "0.0",
        "MODEL.PART_RANKING.MIN_AREA_RATIO",
        "0.0",
    ]
    cfg = load_cfg(RANKING, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    evaluator = PartMIoUEvaluator("toyparts_parts_val", mode="clustered", num_clusters=2, n_init=1, distributed=False)
    evaluator.reset()
    kept = 0
    with torch.no_grad():
        for batch in itertools.islice(Trainer.build_test_loader(cfg, "toyparts_parts_val"), 3):
            outputs = model(batch)
            for out in outputs:
                parts = out["part_instances"]
                assert parts.features.shape == (len(parts), model.cluster_feature_dim)
                assert torch.allclose(parts.features.norm(dim=1), torch.ones(len(parts)))  # FEATURE_NORM
                assert (parts.pred_classes == 0).all()  # no prototypes yet
                kept += len(parts)
            evaluator.process(batch, outputs)
    results = evaluator.evaluate()["part_miou_clustered"]
    assert kept > 0 and 0.0 <= results["C-mIoU"] <= 100.0
