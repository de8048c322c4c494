"""Batched K-means in PyTorch: many small clustering problems solved as one padded tensor problem.

PartDistillation clusters features in several places (spec §2.3, §5; anchors §4.1):

* stage 1 pixel grouping: one K=4 K-means per object instance on its stride-8 res3+res4 features;
* stage 3 part ranking and the mIoU-clustered evaluator: one K=8 K-means per object class over
  query embeddings;
* the discovery baselines.

The reference fits ``sklearn.cluster.KMeans(n_clusters=K, n_init=10, random_state=0)`` once per
problem on the CPU. Here all B problems and all ``n_init`` restarts of each run at once on the
features' device, as batched matrix products. The data is never replicated per restart: restarts
only add centers, so one ``[B, N, C] @ [B, C, n_init * k]`` product serves every restart of every
instance, and the only restart-sized tensors are the ``[B, N, n_init * k]`` distances.

Algorithm (chosen to match scikit-learn's Lloyd ``KMeans`` so that the reference's pseudo-labels
are reproduced in quality, not bit for bit):

* **Seeding**: scikit-learn's *greedy* k-means++: the first center is a uniformly drawn point;
  every further center is the best (lowest resulting potential) of ``2 + floor(ln k)`` candidates
  drawn with probability proportional to the squared distance to the closest chosen center
  (``n_local_trials=1`` gives the classic non-greedy k-means++). Points at distance 0 from a
  chosen center have weight 0, so duplicates of a chosen point are never picked while distinct
  points remain; when none remain (fewer distinct points than k) the remaining center slots are
  disabled and ``num_clusters`` reports the effective k.
* **Randomness**: the uniform numbers are drawn once from ``generator`` (or a generator seeded
  with ``seed``) and shared by all instances, so an instance gets the same result whether it is
  clustered alone, in any position of a batch, or with any amount of padding.
* **Lloyd iterations** with scikit-learn's stopping rule per restart: stop when the labels did not
  change ("strict convergence") or when the total squared center shift is at most
  ``tol * mean per-feature variance`` of that instance's data; at most ``max_iter`` iterations.
  Converged restarts are frozen and instances whose restarts have all converged are dropped from
  the working set.
* **Empty clusters** are re-seeded with the points farthest from their assigned centers, as
  scikit-learn does (the point moves to the empty cluster and leaves its old one).
* The best restart per instance is the one with the lowest inertia (ties: lowest restart index).

Distances use ``||x||^2 - 2 x.c + ||c||^2`` in float32 (float64 for float64 input) on data
centred per instance, which, as in scikit-learn, keeps the expansion accurate when features share
a large offset (e.g. post-ReLU features).
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["KMeansResult", "batched_kmeans", "pairwise_distance", "assign", "soft_assign", "METRICS"]

METRICS = ("l2", "dot", "cosine")

# Squared distances below this fraction of ||x||^2 + ||c||^2 are rounding noise of the matmul
# expansion; seeding treats them as 0 so that duplicated points are not chosen twice.
_DUPLICATE_RTOL = 1e-5


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype (half, bfloat16, ints) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def soft_assign(
    x: torch.Tensor, centers: torch.Tensor, metric: str = "l2", temperature: float = 1.0
) -> torch.Tensor:
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


class _Prepared(NamedTuple):
    """One chunk of instances, packed and centred (valid points first, zeros after)."""

    x: torch.Tensor  # [b, n, C] centred features of the valid points
    sqnorm: torch.Tensor  # [b, n] ||x||^2 (0 for padding)
    valid: torch.Tensor  # [b, n] bool
    num_valid: torch.Tensor  # [b] long
    mean: torch.Tensor  # [b, C] per-instance mean that was subtracted
    order: torch.Tensor  # [b, n] original index of every packed point


def _prepare_chunk(x: torch.Tensor, valid: torch.Tensor, instances: torch.Tensor, metric: str) -> _Prepared:
    """Gather the valid points of ``instances`` to the front, in the compute dtype, centred.

    Packing makes the work depend on the number of valid points rather than on the padded N
    (callers may pass whole feature maps with an object mask), and makes padding unable to
    influence the result. Centring mirrors scikit-learn: it keeps ``||x||^2 - 2x.c + ||c||^2``
    accurate for features with a large common offset.
    """
    valid = valid[instances]
    num_valid = valid.sum(dim=1)
    n = max(int(num_valid.max()), 1)
    # Stable sort of "invalid" flags puts the valid points first, in their original order.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    packed = x[instances[:, None], order].to(_compute_dtype(x.dtype))  # always a fresh copy
    packed_valid = torch.arange(n, device=x.device)[None, :] < num_valid[:, None]
    padding = ~packed_valid
    packed[padding] = 0.0  # touches the padding rows only
    if metric == "cosine":
        F.normalize(packed, dim=-1, out=packed)
    mean = packed.sum(dim=1) / num_valid.clamp(min=1)[:, None].to(packed.dtype)
    packed.sub_(mean[:, None, :])
    packed[padding] = 0.0
    sqnorm = torch.linalg.vector_norm(packed, dim=-1).pow_(2)
    return _Prepared(packed, sqnorm, packed_valid, num_valid, mean, order)


def _sq_distances(data: _Prepared, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [b, n, m] of the packed points to centers [b, m, C]."""
    d2 = torch.bmm(data.x, centers.transpose(1, 2)).mul_(-2.0)
    d2.add_(data.sqnorm[..., None]).add_(centers.pow(2).sum(dim=-1)[:, None, :])
    return d2.clamp_(min=0.0)


def _seeding_distances(data: _Prepared, centers: torch.Tensor) -> torch.Tensor:
    """Squared distances for k-means++ sampling, [b, m, n]: noise-level values and padding -> 0.

    A point identical to a chosen center must get weight exactly 0, otherwise rounding noise of
    the matmul expansion would let k-means++ pick a duplicate while distinct points remain.
    """
    d2 = _sq_distances(data, centers)
    noise = (data.sqnorm[..., None] + centers.pow(2).sum(dim=-1)[:, None, :]).mul_(_DUPLICATE_RTOL)
    d2 = d2.masked_fill_(d2 <= noise, 0.0).mul_(data.valid[..., None])
    return d2.transpose(1, 2)


def _gather_points(data: _Prepared, index: torch.Tensor) -> torch.Tensor:
    """Packed points at ``index`` [b, m] -> [b, m, C]."""
    batch_index = torch.arange(index.shape[0], device=index.device)[:, None]
    return data.x[batch_index, index]


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ for every (instance, restart): centers [b, r, k, C], slot mask [b, r, k].

    ``uniforms``: [n_init + (k - 1) * n_init * n_local_trials] numbers in [0, 1), shared by all
    instances. A slot is disabled (mask False) when every valid point already coincides with a
    chosen center, i.e. the instance has fewer distinct points than k.
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
    for step in range(1, k):
        candidates, active = _sample(closest, trial_u[step - 1])  # [b, r, t]
        points = _gather_points(data, candidates.view(b, -1))  # [b, r * t, C]
        trial = _seeding_distances(data, points).view(b, n_init, n_local_trials, n)
        trial = torch.minimum(trial, closest[:, :, None, :])
        best = trial.sum(dim=-1).argmin(dim=-1)  # [b, r]: lowest potential after adding it
        closest = trial.gather(2, best[:, :, None, None].expand(b, n_init, 1, n)).squeeze(2)
        chosen = points.view(b, n_init, n_local_trials, c)
        chosen = chosen.gather(2, best[:, :, None, None].expand(b, n_init, 1, c)).squeeze(2)
        active &= slot_active[:, :, step - 1]
        centers[:, :, step] = chosen * active[..., None]
        slot_active[:, :, step] = active
    return centers, slot_active


def _assign_step(
    data: _Prepared, centers: torch.Tensor, slot_active: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """E-step: nearest active center per restart. Returns labels [b, n, r] and distances [b, n, r]."""
    b, r, k, c = centers.shape
    d2 = _sq_distances(data, centers.view(b, r * k, c)).view(b, -1, r, k)
    d2.masked_fill_(~slot_active[:, None], float("inf"))
    distances, labels = d2.min(dim=-1)
    return labels, distances.masked_fill_(~data.valid[..., None], 0.0)


def _update_step(
    data: _Prepared,
    labels: torch.Tensor,
    distances: torch.Tensor,
    centers: torch.Tensor,
    slot_active: torch.Tensor,
    spherical: bool,
) -> torch.Tensor:
    """M-step: cluster means [b, r, k, C], with empty clusters re-seeded at far points.

    Like scikit-learn, an empty (active) cluster takes the point farthest from its assigned
    center; the point leaves its old cluster. Moving it in the one-hot assignment matrix before
    the product does both at once, deterministically (no scatter-add).
    """
    b, r, k, c = centers.shape
    one_hot = torch.zeros(b, labels.shape[1], r, k, dtype=data.x.dtype, device=data.x.device)
    one_hot.scatter_(3, labels[..., None], 1.0).mul_(data.valid[:, :, None, None])
    counts = one_hot.sum(dim=1)  # [b, r, k]
    empty = (counts == 0) & slot_active
    if bool(empty.any()):
        _relocate_empty(one_hot, distances, empty)
        counts = one_hot.sum(dim=1)
    sums = torch.bmm(one_hot.view(b, -1, r * k).transpose(1, 2), data.x).view(b, r, k, c)
    means = sums / counts.clamp(min=1)[..., None]
    if spherical:
        # Spherical K-means: the unit vector closest to the mean, in centred coordinates.
        origin = data.mean[:, None, None, :]
        means = F.normalize(means + origin, dim=-1) - origin
    # A cluster can only stay empty when it lost its last point; keep its previous center.
    return torch.where((counts > 0)[..., None], means, centers)


def _relocate_empty(one_hot: torch.Tensor, distances: torch.Tensor, empty: torch.Tensor) -> None:
    """Move, per restart, the farthest points into the empty clusters (edits ``one_hot`` in place)."""
    k = empty.shape[-1]
    num_far = min(k, distances.shape[1])
    far = distances.topk(num_far, dim=1).indices  # [b, num_far, r], farthest first
    rank = torch.cumsum(empty.long(), dim=-1) - 1  # j-th empty cluster takes the j-th far point
    bi, ri, ki = empty.nonzero(as_tuple=True)
    points = far[bi, rank[bi, ri, ki], ri]
    one_hot[bi, points, ri] = 0.0
    one_hot[bi, points, ri, ki] = 1.0


def _lloyd(
    data: _Prepared,
    centers: torch.Tensor,
    slot_active: torch.Tensor,
    tol: torch.Tensor,
    max_iter: int,
    spherical: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd iterations for all restarts with per-restart convergence (scikit-learn's rule).

    Iteration t assigns points with centers c_t; a restart stops there when its labels equal
    those of t-1 (strict convergence, scikit-learn then counts one more iteration) or when
    ||c_t - c_{t-1}||^2 <= tol. Its c_t, labels and inertia are then final and frozen. Instances
    whose restarts all stopped leave the working set, so the products shrink as problems finish.

    Returns centers [b, r, k, C], labels [b, n, r], inertia [b, r], n_iter [b, r].
    """
    b, r = centers.shape[:2]
    device = centers.device
    final_labels = torch.zeros(b, data.x.shape[1], r, dtype=torch.long, device=device)
    final_inertia = centers.new_zeros(b, r)
    final_iter = torch.zeros(b, r, dtype=torch.long, device=device)
    final_centers = centers.clone()
    rows = torch.arange(b, device=device)  # instances still in the working set
    done = torch.zeros(b, r, dtype=torch.bool, device=device)
    previous_labels, shift = None, None
    for it in range(max_iter + 1):
        labels, distances = _assign_step(data, centers, slot_active)
        if previous_labels is None:
            stop = torch.zeros_like(done)
            strict = stop
        else:
            strict = ((labels == previous_labels) | ~data.valid[..., None]).all(dim=1)
            stop = strict | (shift <= tol[:, None])
        if it == max_iter:
            stop = torch.ones_like(done)
        stop &= ~done
        final_labels[rows] = torch.where(stop[:, None], labels, final_labels[rows])
        final_inertia[rows] = torch.where(stop, distances.sum(dim=1), final_inertia[rows])
        counted = it + (strict & (it < max_iter)).long()  # scikit-learn's n_iter_
        final_iter[rows] = torch.where(stop, counted, final_iter[rows])
        final_centers[rows] = torch.where(stop[..., None, None], centers, final_centers[rows])
        done |= stop
        if it == max_iter or bool(done.all()):
            break
        new_centers = _update_step(data, labels, distances, centers, slot_active, spherical)
        new_centers = torch.where(done[..., None, None], centers, new_centers)
        shift = (new_centers - centers).pow(2).sum(dim=(-1, -2))
        centers, previous_labels = new_centers, labels
        keep = ~done.all(dim=1)
        if not bool(keep.all()):
            data = _Prepared(*(t[keep] for t in data))
            rows, done, tol = rows[keep], done[keep], tol[keep]
            centers, previous_labels, shift = centers[keep], previous_labels[keep], shift[keep]
            slot_active = slot_active[keep]
    return final_centers, final_labels, final_inertia, final_iter


def _select_best(
    centers: torch.Tensor,
    labels: torch.Tensor,
    inertia: torch.Tensor,
    n_iter: torch.Tensor,
    slot_active: torch.Tensor,
):
    """Best restart per instance (lowest inertia; first one on ties, like scikit-learn's "<")."""
    best = inertia.argmin(dim=1)
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
) -> KMeansResult:
    """K-means of one chunk of instances (all restarts at once); see :func:`batched_kmeans`."""
    data = _prepare_chunk(x, valid, instances, metric)
    n_features = data.x.shape[-1]
    # scikit-learn's tol: relative to the mean per-feature variance of the instance's data.
    variance = data.sqnorm.sum(dim=1) / (data.num_valid.clamp(min=1) * n_features).to(data.x.dtype)
    centers, slot_active = _kmeans_plusplus(data, k, n_init, uniforms, n_local_trials)
    centers, labels, inertia, n_iter = _lloyd(
        data, centers, slot_active, variance * tol, max_iter, spherical=metric == "cosine"
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
            "dot": the reference's ``DISTANCE_METRIC="dot"`` (spec §2.3): its K-means is always
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
            Working memory is about B_chunk * N * C compute-dtype values (the packed, centred copy)
            plus B_chunk * n_init * N * k distances.

    Returns:
        :class:`KMeansResult`.
    """
    _check_metric(metric)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}.")
    if k < 1 or n_init < 1 or max_iter < 0:
        raise ValueError(f"Need k >= 1, n_init >= 1, max_iter >= 0; got {k}, {n_init}, {max_iter}.")
    b, n, c = x.shape
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    elif valid.shape != (b, n):
        raise ValueError(f"valid must be [B, N] = {(b, n)}, got {tuple(valid.shape)}.")
    valid = valid.to(device=x.device, dtype=torch.bool)
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    uniforms = _draw_uniforms(n_init + (k - 1) * n_init * trials, generator, seed, x.device)

    # Chunks of instances with similar sizes waste the least padding.
    sizes = valid.sum(dim=1)
    order = torch.argsort(sizes, stable=True)
    per_chunk = max(1, max_elements // max(1, n_init * int(sizes.max() if b else 1) * c))
    results = []
    for start in range(0, b, per_chunk):
        instances = order[start : start + per_chunk]
        results.append(_kmeans_chunk(x, valid, instances, k, n_init, max_iter, tol, metric, uniforms, trials))
    return _merge(results, order, x, k)


def _draw_uniforms(count: int, generator: Optional[torch.Generator], seed: int, device) -> torch.Tensor:
    """All random numbers of the seeding, drawn up front (on the generator's device)."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64)
    return uniforms.to(device)


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
