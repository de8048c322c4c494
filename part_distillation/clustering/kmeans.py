"""Batched K-means in PyTorch: many small clustering problems solved as one padded tensor problem.

PartDistillation clusters features in several places (PartDistillation supp. §2-§4):

* stage 1 pixel grouping: one K=4 K-means per object instance on its stride-8 res3+res4 features;
* stage 3 part ranking and the mIoU-clustered evaluator: one K=8 K-means per object class over
  query embeddings;
* the discovery baselines.

The reference fits ``sklearn.cluster.KMeans(n_clusters=K, n_init=10, random_state=0)`` once per
problem on the CPU. Here all B problems and all ``n_init`` restarts of each run at once on the
features' device, as batched matrix products. The data is never replicated per restart: restarts
only add centers, so one ``[B, N, C] @ [B, C, n_init * k]`` product serves every restart of every
instance, and the only restart-sized tensors are ``[B, N, n_init * k]`` distances.

Algorithm. From the same seeds it is scikit-learn's Lloyd ``KMeans`` (same labels, ``n_iter_``
and inertia up to float rounding, see the tests); only the random stream of the seeding differs.

* **Seeding**: scikit-learn's *greedy* k-means++: the first center is a uniformly drawn point;
  every further center is the best (lowest resulting potential) of ``2 + floor(ln k)`` candidates
  drawn with probability proportional to the squared distance to the closest chosen center
  (``n_local_trials=1`` gives classic k-means++; it was not faster overall and slightly worse).
  Points at distance 0 from a chosen center have weight 0, so duplicates of a chosen point are
  never picked while distinct points remain; when none remain (fewer distinct points than k) the
  remaining center slots are disabled and ``num_clusters`` reports the effective k.
* **Randomness**: the uniform numbers are drawn once from ``generator`` (or a generator seeded
  with ``seed``) and shared by all instances, so an instance gets the same result whether it is
  clustered alone, in any position of a batch, or with any amount of padding.
* **Lloyd iterations** with scikit-learn's stopping rule per restart: stop when no label changed
  ("strict convergence") or when the total squared center shift is at most
  ``tol * mean per-feature variance`` of that instance's data; at most ``max_iter`` iterations.
  Converged restarts are frozen.
* **Less work than plain Lloyd, same result**: the first assignment reuses the seeding
  distances; Hamerly's bounds (upper bound to the own center, lower bound to the others, moved by
  the center shifts) skip the distance computation of points whose label cannot change, so late
  iterations and frozen restarts cost almost nothing; cluster sums are updated with the points
  that changed cluster only.
* **Empty clusters** are re-seeded with the points farthest from their assigned centers, as
  scikit-learn does (the point moves to the empty cluster and leaves its old one).
* The best restart per instance is the one with the lowest inertia (ties up to rounding: lowest
  restart index).

Approximate mode (``project_dim=d``, stage 1's default d = 64 for its 1536-d features): seeding and
at most ``_PROJECT_MAX_ITER`` plain Lloyd iterations of every restart run on a Gaussian random
projection of the data to d dimensions, and the ``_PROJECT_REFINE`` restarts of lowest projected
inertia are finished by the exact Lloyd above in full dimension (see :func:`batched_kmeans`).

Distances use ``||x||^2 - 2 x.c + ||c||^2`` in float32 (float64 for float64 input) on data
centred per instance, which, as in scikit-learn, keeps the expansion accurate when features share
a large offset (e.g. post-ReLU features).
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .kmeans_lloyd import (  # public there; private aliases keep this module's code unchanged
    Prepared as _Prepared,
    Workspace as _Workspace,
    compute_dtype as _compute_dtype,
    gather_points as _gather_points,
    lloyd as _lloyd,
    per_cluster_sums as _cluster_sums,
    plain_lloyd as _plain_lloyd,
    prepare_chunk as _prepare_chunk,
    seeding_distances as _seeding_distances,
)

__all__ = ["KMeansResult", "batched_kmeans", "pairwise_distance", "assign", "soft_assign", "METRICS"]

METRICS = ("l2", "dot", "cosine")

# Projected K-means (``project_dim``): Lloyd iterations in the projection (at most), and restarts of
# lowest projected inertia finished in full dimension. On the stage-1 benchmark (1536-d) and the tests'
# mixtures, 3 finished restarts keep the mean inertia within ~0.45 % of the exact best of 10 (1: ~1 %);
# more projected iterations did not lower it.
_PROJECT_MAX_ITER = 6
_PROJECT_REFINE = 3


class KMeansResult(NamedTuple):
    """Output of :func:`batched_kmeans` (best restart per instance).

    Attributes:
        labels: [B, N] long, cluster of every point, -1 for invalid points.
        centers: [B, k, C] in x's dtype; only the first ``num_clusters[b]`` rows of instance b are
            clusters, the remaining rows are zeros and must be ignored.
        inertia: [B] float, the minimised objective (see ``batched_kmeans``); 0 for empty instances.
        n_iter: [B] long, Lloyd iterations of the best restart (scikit-learn's ``n_iter_``).
        num_clusters: [B] long, effective k: min(k, number of distinct valid points).
    """

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor
    num_clusters: torch.Tensor


# --------------------------------------------------------------------------------------------
# Public helpers: distances to given centers (prototypes)
# --------------------------------------------------------------------------------------------


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"Unknown K-means metric {metric!r}; expected one of {METRICS}.")


def pairwise_distance(x: torch.Tensor, centers: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distance of every point to every center, the quantity :func:`assign` minimises.

    Args:
        x: [..., N, C] points.
        centers: [..., k, C] centers (leading dims broadcast with x's).
        metric: "l2": squared Euclidean distance; "dot": negative dot product -x.c (the
            reference's ``DISTANCE_METRIC="dot"`` labels pixels by the largest x.c); "cosine":
            1 - cos(x, c).

    Returns:
        [..., N, k] float32 (float64 for float64 input).
    """
    _check_metric(metric)
    dtype = _compute_dtype(x.dtype)
    x = x.to(dtype)
    centers = centers.to(dtype)
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
        centers = F.normalize(centers, dim=-1)
    dots = torch.matmul(x, centers.transpose(-1, -2))
    if metric == "dot":
        return dots.neg_()
    if metric == "cosine":
        return dots.neg_().add_(1.0)
    d2 = dots.mul_(-2.0)
    d2.add_(x.pow(2).sum(-1, keepdim=True)).add_(centers.pow(2).sum(-1).unsqueeze(-2))
    return d2.clamp_(min=0.0)


def assign(x: torch.Tensor, centers: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Index of the nearest center under ``metric`` (see :func:`pairwise_distance`), [..., N] long.

    Used to label new points (e.g. full-resolution pixels, or proposals of another image) with
    centers fitted by :func:`batched_kmeans`. Drop the ignored center rows
    (``>= num_clusters``) before calling it.
    """
    return pairwise_distance(x, centers, metric).argmin(dim=-1)


def soft_assign(x: torch.Tensor, centers: torch.Tensor, metric: str = "l2", temperature: float = 1.0) -> torch.Tensor:
    """Soft cluster memberships ``softmax_k(-distance(x, c_k) / temperature)``, [..., N, k].

    Distances are those of :func:`pairwise_distance` (squared for "l2"), so ``temperature -> 0``
    recovers :func:`assign`'s one-hot labels.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    return torch.softmax(pairwise_distance(x, centers, metric).div_(-temperature), dim=-1)


# --------------------------------------------------------------------------------------------
# Batched K-means
# --------------------------------------------------------------------------------------------


def _sample(weights: torch.Tensor, uniforms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling of point indices ∝ ``weights`` [b, r, n] with ``uniforms`` [r, t].

    Returns indices [b, r, t] and a [b, r] flag "any positive weight". A point of zero weight is
    never returned when some weight is positive (the first cumulative sum exceeding u·total has
    positive weight); rows without positive weight return garbage indices, flagged False.
    """
    cumulative = torch.cumsum(weights, dim=-1)
    total = cumulative[..., -1:]
    values = uniforms[None].to(weights.dtype) * total
    # u < 1 can round to u * total == total in float32: stay strictly below the last step.
    values = torch.minimum(values, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cumulative, values, right=True)
    return index.clamp_(max=weights.shape[-1] - 1), total[..., 0] > 0


def _kmeans_plusplus(
    data: _Prepared, k: int, n_init: int, uniforms: torch.Tensor, n_local_trials: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy k-means++ for every (instance, restart).

    ``uniforms``: [n_init + (k - 1) * n_init * n_local_trials] numbers in [0, 1), shared by all
    instances. A slot is disabled (mask False) when every valid point already coincides with a
    chosen center, i.e. the instance has fewer distinct points than k.

    Returns centers [b, r, k, C], slot mask [b, r, k] and the squared distances of every point to
    every chosen center [b, r, k, n], which the first Lloyd assignment reuses.
    """
    b, n, c = data.x.shape
    first_u, trial_u = uniforms[:n_init], uniforms[n_init:].view(max(k - 1, 0), n_init, n_local_trials)
    index, active = _sample(data.valid.to(data.x.dtype)[:, None, :].expand(b, n_init, n), first_u[:, None])
    first = _gather_points(data, index[..., 0])  # [b, r, C]
    centers = data.x.new_zeros(b, n_init, k, c)
    centers[:, :, 0] = first
    slot_active = torch.zeros(b, n_init, k, dtype=torch.bool, device=data.x.device)
    slot_active[:, :, 0] = active
    closest = _seeding_distances(data, first)  # [b, r, n]
    seed_d2 = data.x.new_zeros(b, n_init, k, n)
    seed_d2[:, :, 0] = closest
    for step in range(1, k):
        candidates, active = _sample(closest, trial_u[step - 1])  # [b, r, t]
        points = _gather_points(data, candidates.view(b, -1))  # [b, r * t, C]
        raw = _seeding_distances(data, points).view(b, n_init, n_local_trials, n)
        trial = torch.minimum(raw, closest[:, :, None, :])
        best = trial.sum(dim=-1).argmin(dim=-1)[:, :, None, None]  # lowest potential after adding it
        closest = trial.gather(2, best.expand(b, n_init, 1, n)).squeeze(2)
        seed_d2[:, :, step] = raw.gather(2, best.expand(b, n_init, 1, n)).squeeze(2)
        chosen = points.view(b, n_init, n_local_trials, c).gather(2, best.expand(b, n_init, 1, c)).squeeze(2)
        active &= slot_active[:, :, step - 1]
        centers[:, :, step] = chosen * active[..., None]
        slot_active[:, :, step] = active
    return centers, slot_active, seed_d2


def _projected_kmeans(
    data: _Prepared,
    projection: torch.Tensor,
    k: int,
    n_init: int,
    max_iter: int,
    tol: torch.Tensor,
    uniforms: torch.Tensor,
    n_local_trials: int,
    spherical: bool,
    workspace: _Workspace,
):
    """Approximate K-means: every restart in a random projection, the best ones finished exactly.

    1. ``z = x R`` with ``R`` [C, d] Gaussian of variance 1/d, so squared distances are preserved
       in expectation (Johnson-Lindenstrauss); the packed data is centred and zero-padded, so z is.
    2. Greedy k-means++ (the exact path's code) and at most ``_PROJECT_MAX_ITER`` plain Lloyd
       iterations of all ``n_init`` restarts on z (Euclidean even for "cosine"), at about d / C
       of the exact path's matrix-product cost.
    3. The ``_PROJECT_REFINE`` restarts of lowest projected inertia give labels; the full-dimensional
       means of their clusters start exact full-dimensional Lloyd (Hamerly bounds, the same
       stopping rule); the caller keeps the lowest full-dimensional inertia. The result is thus a
       Lloyd fixed point of the data and its inertia the exact objective.

    Returns centers [b, t, k, C], labels [b, n, t], inertia [b, t], n_iter [b, t] (projected plus
    full-dimensional iterations) and the slot mask [b, t, k] of the t refined restarts.
    """
    b, n, c = data.x.shape
    z = torch.matmul(data.x, projection)  # padding rows stay 0
    zdata = _Prepared(z, z.pow(2).sum(dim=-1), data.valid, data.num_valid, z.new_zeros(b, z.shape[-1]), data.order)
    seeds, slot_active, seed_d2 = _kmeans_plusplus(zdata, k, n_init, uniforms, n_local_trials)
    labels, inertia, n_iter = _plain_lloyd(zdata, seeds, seed_d2, slot_active, min(max_iter, _PROJECT_MAX_ITER))
    t = min(_PROJECT_REFINE, n_init)
    # lowest projected inertia first; the stable sort keeps the lowest restart index on ties
    best = torch.sort(inertia, dim=1, stable=True).indices[:, :t]
    labels = labels.gather(2, best[:, None, :].expand(b, n, t))
    slot_active = slot_active.gather(1, best[..., None].expand(b, t, k))
    sums, sqsums, counts = _cluster_sums(data, labels, k)
    centers = sums / counts.clamp(min=1)[..., None]
    if spherical:
        origin = data.mean[:, None, None, :]
        centers = F.normalize(centers + origin, dim=-1) - origin
    centers = centers * slot_active[..., None]
    full_d2 = _seeding_distances(data, centers.view(b, t * k, c)).view(b, t, k, n)
    centers, labels, inertia, full_iter = _lloyd(
        data, centers, full_d2, slot_active, tol, max_iter, spherical, workspace, (labels, sums, sqsums, counts)
    )
    return centers, labels, inertia, n_iter.gather(1, best) + full_iter, slot_active


def _select_best(
    centers: torch.Tensor,
    labels: torch.Tensor,
    inertia: torch.Tensor,
    n_iter: torch.Tensor,
    slot_active: torch.Tensor,
):
    """Best restart per instance: the first one whose inertia is the lowest up to rounding.

    Restarts that reach the same partition have the same inertia up to float rounding, which
    depends on the order of the (incremental) sums; treating values within a relative 1e-6 as
    ties keeps the choice, hence the label numbering, independent of batching and padding.
    """
    lowest = inertia.min(dim=1, keepdim=True).values
    best = (inertia <= lowest + lowest.abs() * 1e-6).to(torch.uint8).argmax(dim=1)  # first maximum
    index = torch.arange(best.shape[0], device=best.device)
    return (
        centers[index, best],  # [b, k, C]
        labels[index, :, best],  # [b, n]
        inertia[index, best],
        n_iter[index, best],
        slot_active[index, best],
    )


def _kmeans_chunk(
    x: torch.Tensor,
    valid: torch.Tensor,
    instances: torch.Tensor,
    k: int,
    n_init: int,
    max_iter: int,
    tol: float,
    metric: str,
    uniforms: torch.Tensor,
    n_local_trials: int,
    workspace: _Workspace,
    projection: Optional[torch.Tensor] = None,
) -> KMeansResult:
    """K-means of one chunk of instances (all restarts at once); see :func:`batched_kmeans`."""
    data = _prepare_chunk(x, valid, instances, metric, workspace)
    n_features = data.x.shape[-1]
    # scikit-learn's tol: relative to the mean per-feature variance of the instance's data.
    variance = data.sqnorm.sum(dim=1) / (data.num_valid.clamp(min=1) * n_features).to(data.x.dtype)
    spherical = metric == "cosine"
    if projection is None:
        seeds, slot_active, seed_d2 = _kmeans_plusplus(data, k, n_init, uniforms, n_local_trials)
        centers, labels, inertia, n_iter = _lloyd(
            data, seeds, seed_d2, slot_active, variance * tol, max_iter, spherical, workspace
        )
    else:
        centers, labels, inertia, n_iter, slot_active = _projected_kmeans(
            data, projection, k, n_init, max_iter, variance * tol, uniforms, n_local_trials, spherical, workspace
        )
    centers, labels, inertia, n_iter, slot_active = _select_best(centers, labels, inertia, n_iter, slot_active)
    centers = centers + data.mean[:, None, :]  # back to the caller's coordinates
    if metric == "cosine":
        centers = F.normalize(centers, dim=-1)
        inertia = inertia * 0.5  # ||x̂ - ĉ||^2 = 2 (1 - cos)
    elif metric == "dot":
        # The reference fits Euclidean K-means, then labels points by the largest dot product.
        dots = torch.bmm(data.x, centers.transpose(1, 2)) + (data.mean[:, None, :] * centers).sum(-1)[:, None]
        labels = dots.masked_fill_(~slot_active[:, None, :], float("-inf")).argmax(dim=-1)
    centers = centers * slot_active[..., None]
    return _scatter_back(x, data, labels, centers, inertia, n_iter, slot_active.sum(dim=1))


def _scatter_back(x, data, labels, centers, inertia, n_iter, num_clusters) -> KMeansResult:
    """Undo the packing: labels at the instances' original point positions, -1 elsewhere."""
    out = torch.full((data.x.shape[0], x.shape[1]), -1, dtype=torch.long, device=x.device)
    # ``order`` is a prefix of a permutation, so every original position is written at most once;
    # packed padding slots map to invalid positions and write -1 there.
    out.scatter_(1, data.order, labels.masked_fill(~data.valid, -1))
    n_iter = n_iter.masked_fill(data.num_valid == 0, 0)
    return KMeansResult(out, centers.to(x.dtype), inertia, n_iter, num_clusters)


def batched_kmeans(
    x: torch.Tensor,
    valid: Optional[torch.Tensor],
    k: int,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    metric: str = "l2",
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    n_local_trials: Optional[int] = None,
    max_elements: int = 2**28,
    project_dim: int = 0,
) -> KMeansResult:
    """K-means of B independent point sets at once, best of ``n_init`` k-means++ restarts each.

    Args:
        x: [B, N, C] features (any float dtype; computed in float32, float64 stays float64).
        valid: [B, N] bool, which points belong to each instance (None: all). Invalid points
            never influence the result and get label -1.
        k: number of clusters. Instances with fewer distinct valid points get that many
            clusters (``num_clusters``); instances without valid points get labels -1, inertia 0.
        n_init: k-means++ restarts per instance; the lowest-inertia one is returned.
        max_iter: Lloyd iteration cap per restart.
        tol: scikit-learn's tolerance: a restart converges when the squared center shift summed
            over clusters is at most ``tol`` times the mean per-feature variance of its data.
        metric: what is minimised.
            "l2": inertia = sum of squared Euclidean distances (scikit-learn's KMeans).
            "dot": the reference's ``DISTANCE_METRIC="dot"`` (reference code): its K-means is always
            Euclidean, the metric only changes how points are labelled afterwards. So the
            centers and inertia are those of "l2"; the returned labels are
            argmax_k x.c_k (which can differ from the Euclidean partition, as in the reference).
            "cosine": spherical K-means on L2-normalised features: minimises sum 1 - cos(x, c)
            with unit-norm centers (normalised means); inertia is that sum. (The reference's
            stage 3 instead runs "l2" on normalised features: normalise x and use "l2".)
        generator: source of the seeding randomness (its state advances); default: a CPU
            generator seeded with ``seed``. Results are deterministic for a given device.
        seed: seed of the default generator.
        n_local_trials: k-means++ candidates per center; None = scikit-learn's 2 + floor(ln k)
            (greedy k-means++), 1 = classic k-means++.
        max_elements: budget for B_chunk * n_init * N * C (the size the problem would have if
            the data were replicated per restart); instances are processed in chunks below it.
            Working memory is about 2 * B_chunk * N * C compute-dtype values (the packed, centred
            copy and a buffer of gathered rows) plus a few B_chunk * n_init * N * k tensors; the
            default keeps 64 x 1600 x 1536 x 10 inits to about 200 MB in float32.
        project_dim: 0 (default) = exact K-means as above. d > 0 with d < C = approximate K-means
            for high-dimensional features: seeding and Lloyd of every restart run on a random
            Gaussian projection of the data to d dimensions (one [C, d] matrix drawn from the
            generator after the seeding numbers, shared by all instances), then the 3 restarts of
            lowest projected inertia are finished by exact full-dimensional Lloyd from their
            clusters' means and the lowest full-dimensional inertia wins. The result is a
            full-dimensional Lloyd fixed point and ``inertia`` its exact objective, but restarts
            are seeded and compared in the projection, so it can be a worse local optimum than the
            exact path's (stage-1 benchmark, 1536-d, d = 64: mean inertia +0.4 % vs scikit-learn,
            see benchmarks/kmeans.py). ``n_iter`` counts projected plus full iterations. Ignored
            when d >= C.

    Returns:
        :class:`KMeansResult`.
    """
    _check_metric(metric)
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point [B, N, C] tensor, got {x.dtype} {tuple(x.shape)}.")
    if k < 1 or n_init < 1 or max_iter < 0:
        raise ValueError(f"Need k >= 1, n_init >= 1, max_iter >= 0; got {k}, {n_init}, {max_iter}.")
    b, n, c = x.shape
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    elif valid.shape != (b, n):
        raise ValueError(f"valid must be [B, N] = {(b, n)}, got {tuple(valid.shape)}.")
    valid = valid.to(device=x.device, dtype=torch.bool)
    if project_dim < 0:
        raise ValueError(f"project_dim must be >= 0, got {project_dim}.")
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    uniforms = _draw_uniforms(n_init + (k - 1) * n_init * trials, generator, x.device)
    projection = None
    if 0 < project_dim < c:
        projection = _draw_projection(c, project_dim, generator, _compute_dtype(x.dtype), x.device)

    # Chunks of instances with similar sizes waste the least padding; the largest chunk comes
    # first so that the workspace buffers never need to grow.
    sizes = valid.sum(dim=1)
    order = torch.argsort(sizes, descending=True, stable=True)
    per_chunk = max(1, max_elements // max(1, n_init * int(sizes.max() if b else 1) * c))
    workspace = _Workspace()
    results = []
    for start in range(0, b, per_chunk):
        instances = order[start : start + per_chunk]
        results.append(
            _kmeans_chunk(
                x, valid, instances, k, n_init, max_iter, tol, metric, uniforms, trials, workspace, projection
            )
        )
    return _merge(results, order, x, k)


def _draw_uniforms(count: int, generator: torch.Generator, device) -> torch.Tensor:
    """All random numbers of the seeding, drawn up front (on the generator's device)."""
    uniforms = torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64)
    return uniforms.to(device)


def _draw_projection(channels: int, dim: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """[C, d] Gaussian matrix of variance 1/d (on the generator's device, then moved)."""
    projection = torch.randn(channels, dim, generator=generator, device=generator.device, dtype=torch.float64)
    return projection.div_(math.sqrt(dim)).to(device=device, dtype=dtype)


def _merge(results, order: torch.Tensor, x: torch.Tensor, k: int) -> KMeansResult:
    """Concatenate chunk results and undo the size sort."""
    b, n, c = x.shape
    if not results:
        dtype = _compute_dtype(x.dtype)
        zeros = torch.zeros(0, dtype=torch.long, device=x.device)
        return KMeansResult(
            torch.zeros(0, n, dtype=torch.long, device=x.device),
            x.new_zeros(0, k, c),
            torch.zeros(0, dtype=dtype, device=x.device),
            zeros,
            zeros,
        )
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(b, device=order.device)
    return KMeansResult(*(torch.cat(parts)[inverse] for parts in zip(*results)))
