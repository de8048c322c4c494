"""clustering.prototypes: per-class K-means (batched or one class per call), the prototypes file, soft scores."""

import os

import numpy as np
import pytest
import torch

from part_distillation.clustering.prototypes import (
    cluster_features_per_class,
    cluster_per_class,
    cluster_prototypes,
    load_prototypes,
    prototype_soft_scores,
    save_prototypes,
)
from part_distillation.utils.errors import ConfigError


def _blobs(seed: int, groups: int, per_group: int, dim: int = 4, scale: float = 5.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:groups] * scale
    x = np.concatenate([centers[i] + 0.05 * rng.standard_normal((per_group, dim)) for i in range(groups)])
    return torch.from_numpy(x).float()


def test_batched_classes_give_the_per_class_result():
    two_points = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    feats = {0: _blobs(0, 3, 12), 2: two_points, 5: _blobs(2, 3, 30), 7: torch.zeros(0, 4)}
    batched = cluster_per_class(feats, 3, normalize=False)
    alone = cluster_per_class(feats, 3, normalize=False, batch_classes=False)
    assert set(batched) == set(alone) == {0, 2, 5, 7}
    for c in (0, 2, 5):
        assert torch.equal(batched[c].labels, alone[c].labels)
        torch.testing.assert_close(batched[c].centers, alone[c].centers)
    assert batched[2].num_clusters == 2  # fewer distinct features than K: fewer clusters
    assert batched[7].num_clusters == 0 and batched[7].labels.numel() == 0
    # three blobs of 12: one cluster per blob
    groups = batched[0].labels.reshape(3, 12)
    assert all(len(set(g.tolist())) == 1 for g in groups) and len({int(g[0]) for g in groups}) == 3
    labels = cluster_features_per_class(feats, 3, normalize=False)
    assert labels[0].dtype == np.int64 and np.array_equal(labels[0], batched[0].labels.numpy())


def test_cluster_prototypes_single_process(tmp_path):
    a, b = _blobs(3, 2, 8), _blobs(4, 3, 6) + 1.0
    classes = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.full((len(b),), 2), torch.tensor([-1])])
    feats = torch.cat([a, b, torch.ones(1, 4)])
    prototypes, num_clusters, counts = cluster_prototypes(classes, feats, 3, 3, n_init=10, max_iter=300, seed=0)
    assert prototypes.shape == (3, 3, 4)
    assert counts.tolist() == [16, 0, 18] and num_clusters.tolist()[1] == 0
    assert torch.all(prototypes[1] == 0)
    expected = cluster_per_class({2: b}, 3, normalize=False, batch_classes=False)[2]
    torch.testing.assert_close(prototypes[2], expected.centers)

    path = str(tmp_path / "out" / "prototypes.pth")
    save_prototypes(path, prototypes, num_clusters, counts)
    assert os.listdir(tmp_path / "out") == ["prototypes.pth"]  # no temporary file left behind
    loaded, loaded_counts = load_prototypes(path)
    assert torch.equal(loaded, prototypes) and torch.equal(loaded_counts, num_clusters)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(saved["num_features"], counts)


def test_load_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"--prototypes=.*does not exist; write it with tools/rank_parts.py"):
        load_prototypes(str(tmp_path / "nope.pth"), setting="--prototypes")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"MODEL.ONE_STAGE.PROTOTYPES=.*is not a prototypes file"):
        load_prototypes(str(tmp_path / "garbage.pth"))


def test_soft_scores_ignore_missing_prototypes():
    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    soft = prototype_soft_scores(torch.tensor([[0.0, 0.0]]), protos, 2, temperature=5.0)
    expected = torch.softmax(torch.tensor([0.0, -1.0]), dim=0)  # distances 0 and 5, T = 5
    torch.testing.assert_close(soft[0, :2], expected)
    assert soft[0, 2] == 0 and prototype_soft_scores(torch.zeros(0, 2), protos, 2).shape == (0, 3)
