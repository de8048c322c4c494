"""Tests of the batched torch K-means (clustering.kmeans, .kmeans_lloyd): sklearn parity, edge cases, metrics."""

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from part_distillation.clustering import assign, batched_kmeans, pairwise_distance, soft_assign
from part_distillation.clustering import kmeans_lloyd


@pytest.fixture(autouse=True)
def _single_threaded_sklearn():
    """scikit-learn's OpenMP/BLAS threads next to torch's oversubscribe 2 shared cores: tiny fits
    then take ~0.2 s instead of ~3 ms. One thread keeps the file well under its time budget."""
    with threadpool_limits(limits=1):
        yield


def _pad(arrays):
    """List of [n_i, C] arrays -> padded float32 tensor [B, N_max, C] and validity mask."""
    n_max = max(len(a) for a in arrays)
    x = torch.full((len(arrays), n_max, arrays[0].shape[1]), 1e3)  # padding far from the data
    valid = torch.zeros(len(arrays), n_max, dtype=torch.bool)
    for i, a in enumerate(arrays):
        x[i, : len(a)] = torch.as_tensor(a, dtype=torch.float32)
        valid[i, : len(a)] = True
    return x, valid


def _sklearn_inertia(points, k):
    return KMeans(n_clusters=k, n_init=10, init="k-means++", random_state=0).fit(points).inertia_


def _parity_cases():
    """Gaussian blobs (separated and overlapping) and structureless uniform data, as float32."""
    cases = []
    for seed, (n, centers, std) in enumerate([(150, 4, 0.6), (200, 6, 2.5), (120, 3, 4.0), (180, 8, 1.5)]):
        points, _ = make_blobs(n, n_features=16, centers=centers, cluster_std=std, random_state=seed)
        cases.append(points.astype(np.float32))
    rng = np.random.default_rng(0)
    cases += [rng.random((n, 16), dtype=np.float32) for n in (90, 160)]
    return cases


@pytest.mark.parametrize("k", [3, 5])
def test_inertia_matches_sklearn(k):
    cases = _parity_cases()
    x, valid = _pad(cases)
    result = batched_kmeans(x, valid, k)
    for i, points in enumerate(cases):
        reference = _sklearn_inertia(points, k)
        assert result.inertia[i].item() <= reference * 1.01, (i, result.inertia[i].item(), reference)
        # The reported inertia is the objective of the returned labels and centers.
        labels = result.labels[i, : len(points)]
        direct = (torch.from_numpy(points) - result.centers[i, labels]).pow(2).sum()
        assert result.inertia[i].item() == pytest.approx(direct.item(), rel=1e-4)
        assert torch.equal(assign(torch.from_numpy(points), result.centers[i]), labels)
    assert (result.num_clusters == k).all()


def test_lloyd_matches_sklearn_from_the_same_seeds():
    # Seeding randomness differs from scikit-learn's, but from the same seeds (max_iter=0 returns
    # them) the Lloyd part - bounds, incremental sums, tol and n_iter semantics - must agree.
    for seed, points in enumerate(_parity_cases()):
        x = torch.from_numpy(points)[None]
        for k in (2, 4, 7):
            seeds = batched_kmeans(x, None, k, n_init=1, max_iter=0, seed=seed).centers[0].numpy()
            ours = batched_kmeans(x, None, k, n_init=1, seed=seed)
            reference = KMeans(n_clusters=k, init=seeds, n_init=1).fit(points)
            assert np.array_equal(ours.labels[0].numpy(), reference.labels_), (seed, k)
            assert ours.n_iter.item() == reference.n_iter_, (seed, k)
            assert ours.inertia.item() == pytest.approx(reference.inertia_, rel=1e-4)


def test_recovers_separated_blobs():
    arrays, truths = [], []
    for seed in range(3):
        points, truth = make_blobs(100 + 20 * seed, n_features=32, centers=4, cluster_std=0.5, random_state=seed)
        arrays.append(points.astype(np.float32))
        truths.append(truth)
    x, valid = _pad(arrays)
    result = batched_kmeans(x, valid, 4)
    for i, truth in enumerate(truths):
        assert adjusted_rand_score(truth, result.labels[i, : len(truth)].numpy()) == 1.0
        assert (result.labels[i, len(truth) :] == -1).all()


def test_deterministic_with_seed_and_generator():
    x, valid = _pad(_parity_cases()[:3])
    first = batched_kmeans(x, valid, 4, seed=3)
    again = batched_kmeans(x, valid, 4, seed=3)
    from_generator = batched_kmeans(x, valid, 4, generator=torch.Generator().manual_seed(3))
    for a, b, c in zip(first, again, from_generator):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_batched_equals_per_instance_and_padding_is_ignored():
    cases = _parity_cases()
    rng = np.random.default_rng(1)
    n_max = 200
    x = torch.from_numpy(rng.normal(size=(len(cases), n_max, 16)).astype(np.float32)) * 50  # junk padding
    valid = torch.zeros(len(cases), n_max, dtype=torch.bool)
    for i, points in enumerate(cases):  # valid points scattered over the row, not a prefix
        where = torch.from_numpy(np.sort(rng.choice(n_max, len(points), replace=False)))
        x[i, where] = torch.from_numpy(points)
        valid[i, where] = True
    batched = batched_kmeans(x, valid, 4)
    chunked = batched_kmeans(x, valid, 4, max_elements=1)  # one instance per chunk
    for i, points in enumerate(cases):
        alone = batched_kmeans(torch.from_numpy(points)[None], None, 4)
        for result in (batched, chunked):
            assert torch.equal(result.labels[i, valid[i]], alone.labels[0])
            assert (result.labels[i, ~valid[i]] == -1).all()
            torch.testing.assert_close(result.centers[i], alone.centers[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(result.inertia[i], alone.inertia[0], rtol=1e-4, atol=1e-4)
            assert result.n_iter[i] == alone.n_iter[0]


def test_fewer_valid_points_than_k():
    x = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])
    # 3 distinct points, then the same 2 distinct points repeated.
    x = torch.cat([x, torch.tensor([[[1.0, 1.0], [1.0, 1.0], [2.0, 5.0], [2.0, 5.0]]])])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    result = batched_kmeans(x, valid, 5)
    assert result.num_clusters.tolist() == [3, 2]
    assert sorted(result.labels[0, :3].tolist()) == [0, 1, 2] and result.labels[0, 3] == -1
    assert result.labels[1, 0] == result.labels[1, 1] != result.labels[1, 2] == result.labels[1, 3]
    assert torch.isfinite(result.centers).all() and torch.isfinite(result.inertia).all()
    assert result.inertia.abs().max() < 1e-5
    assert (result.centers[0, 3:] == 0).all() and (result.centers[1, 2:] == 0).all()
    torch.testing.assert_close(result.centers[0, result.labels[0, :3]], x[0, :3])


def test_empty_instance():
    x = torch.randn(3, 20, 4)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1] = False
    result = batched_kmeans(x, valid, 3)
    assert (result.labels[1] == -1).all()
    assert result.inertia[1] == 0 and result.num_clusters[1] == 0 and result.n_iter[1] == 0
    assert (result.centers[1] == 0).all()
    assert (result.num_clusters[[0, 2]] == 3).all() and (result.labels[[0, 2]] >= 0).all()
    assert all(torch.isfinite(t.float()).all() for t in result)
    none = batched_kmeans(torch.zeros(0, 5, 4), None, 3)
    assert none.labels.shape == (0, 5) and none.centers.shape == (0, 3, 4)


def test_duplicates_are_never_seeded_twice():
    # 4 distinct points, one of them repeated 60 times: every k-means++ run (n_init=1, many seeds)
    # must seed the 4 distinct points, which is the zero-inertia solution.
    distinct = torch.tensor([[0.0, 0.0, 1.0], [5.0, 5.0, 5.0], [-3.0, 2.0, 0.0], [0.5, -4.0, 2.0]])
    x = torch.cat([distinct[:1].expand(60, 3), distinct[1:]])[None] + 100.0  # large common offset
    for seed in range(20):
        result = batched_kmeans(x, None, 4, n_init=1, seed=seed, max_iter=0)
        assert result.num_clusters.item() == 4
        assert result.inertia.item() < 1e-3
        assert len(set(result.labels[0, -4:].tolist())) == 4


def test_empty_cluster_takes_the_farthest_point():
    points = torch.tensor([[[0.0], [1.0], [2.0], [10.0]]])
    data = kmeans_lloyd.prepare_chunk(
        points, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]), "l2", kmeans_lloyd.Workspace()
    )
    seeds = torch.tensor([[[[1.0], [50.0]]]]) - data.mean[:, None, None]  # cluster 1 gets no point
    seed_d2 = (seeds[:, :, :, None, 0] - data.x[:, None, None, :, 0]).pow(2)  # [b, r, k, n]
    slot_active = torch.ones(1, 1, 2, dtype=torch.bool)
    state = kmeans_lloyd._LloydState(data, seeds, seed_d2, slot_active)
    assert (state.labels == 0).all() and state.counts[0, 0].tolist() == [4.0, 0.0]
    kmeans_lloyd._update_centers(state, data, slot_active, torch.zeros(1, 1, dtype=torch.bool), spherical=False)
    # As scikit-learn: the farthest point (10) re-seeds the empty cluster and leaves cluster 0.
    torch.testing.assert_close(state.centers[0, 0, :, 0] + data.mean[0, 0], torch.tensor([1.0, 10.0]))
    assert state.labels[0, :, 0].tolist() == [0, 0, 0, 1]


def test_dot_metric_fits_euclidean_then_labels_by_dot_product():
    # Reference code: Euclidean K-means, then every point goes to argmax x.c. Centers
    # (1, 0) and (10, 0): the point (1, 0) has x.c = 1 and 10, so "dot" labels it with (10, 0).
    x = torch.tensor([[[1.0, 0.0]] * 5 + [[10.0, 0.0]] * 5])
    l2 = batched_kmeans(x, None, 2, metric="l2")
    dot = batched_kmeans(x, None, 2, metric="dot")
    torch.testing.assert_close(dot.centers, l2.centers)
    torch.testing.assert_close(dot.inertia, l2.inertia)
    big = int(l2.centers[0, :, 0].argmax())
    assert (l2.labels[0, :5] != big).all() and (dot.labels[0] == big).all()
    assert torch.equal(dot.labels[0], assign(x[0], dot.centers[0], "dot"))


def test_cosine_metric_groups_by_direction():
    # Two directions, very different norms: Euclidean K-means splits by norm, cosine by direction.
    x = torch.tensor([[[1.0, 0.1], [20.0, -1.0], [1.0, -0.1], [20.0, 1.0], [0.1, 1.0], [-1.0, 20.0], [0.0, 1.0]]])
    result = batched_kmeans(x, None, 2, metric="cosine")
    labels = result.labels[0].tolist()
    assert labels[:4] == [labels[0]] * 4 and labels[4:] == [labels[4]] * 3 and labels[0] != labels[4]
    torch.testing.assert_close(result.centers[0].norm(dim=-1), torch.ones(2))
    expected = pairwise_distance(x[0], result.centers[0], "cosine").min(dim=-1).values.sum()
    torch.testing.assert_close(result.inertia[0], expected)
    assert result.inertia[0] < 0.05  # sum of 1 - cos over 7 points within ~0.1 rad of their center
    assert (batched_kmeans(x, None, 2, metric="l2").labels[0, [0, 1]].unique().numel()) == 2


def test_assign_and_soft_assign():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    centers = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert assign(x, centers).tolist() == [0, 1]
    torch.testing.assert_close(pairwise_distance(x, centers), torch.tensor([[1.0, 4.0], [4.0, 1.0]]))
    probs = soft_assign(x, centers, temperature=0.5)
    e = math.exp(-2.0) / (math.exp(-2.0) + math.exp(-8.0))
    torch.testing.assert_close(probs, torch.tensor([[e, 1 - e], [1 - e, e]]))
    assert assign(x, centers, "dot").tolist() == [0, 1]  # ties -> first; 3*2 > 3*1
    torch.testing.assert_close(
        soft_assign(x[1:], centers, "dot", temperature=1.0), torch.softmax(torch.tensor([[3.0, 6.0]]), -1)
    )
    points, prototypes = torch.randn(2, 30, 5), torch.randn(2, 4, 5)  # batched inputs
    sharp = soft_assign(points, prototypes, "cosine", temperature=1e-4)
    assert sharp.shape == (2, 30, 4)
    torch.testing.assert_close(sharp.sum(-1), torch.ones(2, 30))
    assert torch.equal(sharp.argmax(-1), assign(points, prototypes, "cosine"))


def test_half_input_and_iteration_cap():
    points, _ = make_blobs(120, n_features=8, centers=3, cluster_std=0.5, random_state=0)
    x = torch.from_numpy(points.astype(np.float32))[None]
    full = batched_kmeans(x, None, 3)
    half = batched_kmeans(x.half(), None, 3)
    assert half.centers.dtype == torch.float16 and half.inertia.dtype == torch.float32
    assert adjusted_rand_score(full.labels[0].numpy(), half.labels[0].numpy()) == 1.0
    seeds_only = batched_kmeans(x, None, 3, max_iter=0)
    assert seeds_only.n_iter.item() == 0
    # With no Lloyd step the centers are the k-means++ seeds, i.e. data points.
    gaps = (seeds_only.centers[0][:, None] - x[0][None]).norm(dim=-1).min(dim=1).values
    assert gaps.max() < 1e-5


def _mixtures(num, points, channels, components=6, seed=0):
    """Instances of Gaussian mixtures (more components than k) on a shared offset, like backbone features."""
    rng = np.random.default_rng(seed)
    offset = np.abs(rng.normal(size=channels))
    x = np.zeros((num, points, channels), dtype=np.float32)
    valid = np.zeros((num, points), dtype=bool)
    for b in range(num):
        n = int(rng.integers(points // 2, points + 1))
        means = rng.normal(scale=0.3, size=(components, channels))
        labels = rng.choice(components, size=n, p=rng.dirichlet(np.full(components, 2.0)))
        x[b, :n] = offset + means[labels] + rng.normal(size=(n, channels))
        valid[b, :n] = True
    return torch.from_numpy(x), torch.from_numpy(valid)


def test_projected_kmeans_is_within_one_percent_of_exact_and_deterministic():
    x, valid = _mixtures(12, 240, 384)
    exact = batched_kmeans(x, valid, 4, seed=0)
    projected = batched_kmeans(x, valid, 4, seed=0, project_dim=64)
    assert projected.inertia.mean() <= exact.inertia.mean() * 1.01, (projected.inertia.mean(), exact.inertia.mean())
    # finished by exact Lloyd: a full-dimensional fixed point whose reported inertia is its objective
    for i in range(len(x)):
        points, labels = x[i][valid[i]], projected.labels[i][valid[i]]
        assert torch.equal(assign(points, projected.centers[i]), labels)
        direct = (points - projected.centers[i, labels]).pow(2).sum()
        assert projected.inertia[i].item() == pytest.approx(direct.item(), rel=1e-4)
        assert (projected.labels[i][~valid[i]] == -1).all()
    again = batched_kmeans(x, valid, 4, seed=0, project_dim=64)
    from_generator = batched_kmeans(x, valid, 4, project_dim=64, generator=torch.Generator().manual_seed(0))
    for a, b, c in zip(projected, again, from_generator):
        assert torch.equal(a, b) and torch.equal(a, c)
    # the projection is shared by all instances: an instance gets the same result alone
    alone = batched_kmeans(x[3:4], valid[3:4], 4, seed=0, project_dim=64)
    assert torch.equal(alone.labels[0], projected.labels[3])
    torch.testing.assert_close(alone.inertia[0], projected.inertia[3])


def test_project_dim_at_least_the_feature_size_is_exact():
    x, valid = _mixtures(3, 60, 16, seed=1)
    exact = batched_kmeans(x, valid, 3)
    for a, b in zip(exact, batched_kmeans(x, valid, 3, project_dim=16)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="project_dim"):
        batched_kmeans(x, valid, 3, project_dim=-1)
