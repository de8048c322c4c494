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

__all__ = ["KMeansResult", "batched_kmeans", "pairwise_distance", "assign", "soft_assign", "METRICS"]

METRICS = ("l2", "dot", "cosine")

# Squared distances below this fraction of ||x||^2 + ||c||^2 are rounding noise of the matmul
# expansion; seeding treats them as 0 so that duplicated points are not chosen twice.
_DUPLICATE_RTOL = 1e-5
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half and bfloat16 are computed in float32 (distances need its range)."""
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


class _Workspace:
    """Row buffers reused across iterations and chunks.

    The large temporaries are [rows, C] copies of the features (the packed chunk, the gathered
    uncertain or moved points). Allocating them afresh every time costs page faults that, on the
    2-core CPU machine, took longer than the matrix products using them (about 30 ms per 100 MB);
    one buffer per role, grown on demand, removes that.
    """

    def __init__(self):
        self._buffers = {}

    def rows(self, role: str, count: int, channels: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous [count, channels] buffer; its previous content is overwritten by the caller."""
        buffer = self._buffers.get(role)
        if buffer is None or buffer.shape[0] < count or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(count, channels, dtype=dtype, device=device)
            self._buffers[role] = buffer
        return buffer[:count]

    def gather(self, role: str, source: torch.Tensor, instances: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``source[instances[:, None], index]`` ([b', u, C]) for a contiguous [b, n, C] source."""
        b, n, c = source.shape
        flat = (instances[:, None] * n + index).reshape(-1)
        out = self.rows(role, flat.numel(), c, source.dtype, source.device)
        return torch.index_select(source.view(b * n, c), 0, flat, out=out).view(len(instances), -1, c)


class _Prepared(NamedTuple):
    """One chunk of instances, packed and centred (valid points first, zeros after)."""

    x: torch.Tensor  # [b, n, C] centred features of the valid points
    sqnorm: torch.Tensor  # [b, n] ||x||^2 (0 for padding)
    valid: torch.Tensor  # [b, n] bool
    num_valid: torch.Tensor  # [b] long
    mean: torch.Tensor  # [b, C] per-instance mean that was subtracted
    order: torch.Tensor  # [b, n] original index of every packed point


def _prepare_chunk(
    x: torch.Tensor, valid: torch.Tensor, instances: torch.Tensor, metric: str, workspace: _Workspace
) -> _Prepared:
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
    flat = (instances[:, None] * x.shape[1] + order).reshape(-1)
    dtype = _compute_dtype(x.dtype)
    packed = workspace.rows("packed", flat.numel(), x.shape[2], dtype, x.device)
    if not x.is_contiguous():
        packed.copy_(x[instances[:, None], order].reshape(-1, x.shape[2]))
    elif x.dtype == dtype:
        torch.index_select(x.view(-1, x.shape[2]), 0, flat, out=packed)
    else:
        packed.copy_(x.view(-1, x.shape[2]).index_select(0, flat))
    packed = packed.view(len(instances), n, -1)
    packed_valid = torch.arange(n, device=x.device)[None, :] < num_valid[:, None]
    counts = num_valid.tolist()
    _zero_padding(packed, counts)
    if metric == "cosine":
        F.normalize(packed, dim=-1, out=packed)
    mean = packed.sum(dim=1) / num_valid.clamp(min=1)[:, None].to(packed.dtype)
    packed.sub_(mean[:, None, :])
    _zero_padding(packed, counts)
    sqnorm = torch.linalg.vector_norm(packed, dim=-1).pow_(2)
    return _Prepared(packed, sqnorm, packed_valid, num_valid, mean, order)


def _zero_padding(packed: torch.Tensor, counts) -> None:
    """Zero the rows after each instance's valid points (contiguous slices: a memset each)."""
    for i, count in enumerate(counts):
        if count < packed.shape[1]:
            packed[i, count:] = 0.0


def _sq_distances(points: torch.Tensor, sqnorm: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [b, n, m] of points [b, n, C] (squared norms [b, n]) to centers [b, m, C]."""
    d2 = torch.bmm(points, centers.transpose(1, 2)).mul_(-2.0)
    d2.add_(sqnorm[..., None]).add_(centers.pow(2).sum(dim=-1)[:, None, :])
    return d2.clamp_(min=0.0)


def _seeding_distances(data: _Prepared, centers: torch.Tensor) -> torch.Tensor:
    """Squared distances [b, m, n] of all packed points to centers [b, m, C], for k-means++.

    Noise-level values and padding are set to 0: a point identical to a chosen center must get
    weight exactly 0, otherwise rounding noise of the matmul expansion would let k-means++ pick a
    duplicate while distinct points remain.
    """
    d2 = torch.bmm(centers, data.x.transpose(1, 2)).mul_(-2.0)  # [b, m, n]: contiguous along n
    scale = centers.pow(2).sum(dim=-1)[..., None] + data.sqnorm[:, None, :]
    d2.add_(scale)
    d2.masked_fill_(d2 <= scale.mul_(_DUPLICATE_RTOL), 0.0)
    return d2.mul_(data.valid[:, None, :])


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


class _LloydState:
    """Per-restart Lloyd state of a chunk, with Hamerly's distance bounds.

    Attributes (b instances, n packed points, r restarts, k clusters, C features):
        centers [b, r, k, C]; labels [b, n, r];
        upper [b, n, r]: upper bound of the (non-squared) distance to the assigned center;
        lower [b, n, r]: lower bound of the distance to every other center (+inf if none);
        sums [b, r, k, C], sqsums [b, r, k], counts [b, r, k]: per-cluster sums of x, ||x||^2
            and counts for the current labels (kept up to date incrementally).
    """

    def __init__(
        self,
        data: _Prepared,
        seeds: torch.Tensor,
        seed_d2: torch.Tensor,
        slot_active: torch.Tensor,
        known=None,
        workspace: Optional["_Workspace"] = None,
    ):
        """First assignment from the seeding distances (no extra distance computation).

        ``known``: optional (labels [b, n, r], their cluster sums, sqsums, counts) close to the first
        assignment; the sums are then updated with the points that moved instead of recomputed.
        """
        d2 = seed_d2.permute(0, 3, 1, 2).masked_fill(~slot_active[:, None], float("inf"))  # [b, n, r, k]
        self.centers = seeds
        self.labels = d2.argmin(dim=-1)
        self.upper, self.lower = _bounds(d2.sqrt_(), self.labels)
        if known is None:
            self.sums, self.sqsums, self.counts = _cluster_sums(data, self.labels, seeds.shape[2])
            return
        old, self.sums, self.sqsums, self.counts = known
        changed = (old != self.labels) & data.valid[..., None]
        instances = torch.arange(old.shape[0], device=old.device)
        _move_points(self, data, instances, None, changed.any(dim=-1), old, self.labels, workspace or _Workspace())

    def inertia(self) -> torch.Tensor:
        """[b, r] sum_i ||x_i - c_label(i)||^2 from the cluster sums: T - 2 c.S + n ||c||^2."""
        c = self.centers
        per_cluster = self.sqsums - 2.0 * (c * self.sums).sum(dim=-1) + self.counts * c.pow(2).sum(dim=-1)
        return per_cluster.clamp_(min=0.0).sum(dim=-1)


def _bounds(distance: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact distance to the labelled center and to the nearest other one, from [..., k] distances."""
    own = distance.gather(-1, labels[..., None])
    return own.squeeze(-1), distance.scatter(-1, labels[..., None], float("inf")).min(dim=-1).values


def _cluster_sums(data: _Prepared, labels: torch.Tensor, k: int):
    """Per-cluster sums of x [b, r, k, C], of ||x||^2 [b, r, k] and counts [b, r, k] (valid points)."""
    b, n, r = labels.shape
    one_hot = F.one_hot(labels, k).to(data.x.dtype).mul_(data.valid[:, :, None, None]).view(b, n, r * k)
    sums = torch.bmm(one_hot.transpose(1, 2), data.x).view(b, r, k, -1)
    sqsums = torch.bmm(one_hot.transpose(1, 2), data.sqnorm[..., None]).view(b, r, k)
    return sums, sqsums, one_hot.sum(dim=1).view(b, r, k)


def _update_centers(
    state: _LloydState, data: _Prepared, slot_active: torch.Tensor, done: torch.Tensor, spherical: bool
) -> torch.Tensor:
    """M-step: centers = cluster means (unit vectors if spherical); loosen the bounds accordingly.

    Returns the squared center shift summed over clusters [b, r] (scikit-learn's convergence
    quantity). Converged restarts keep their centers.
    """
    empty = (state.counts == 0) & slot_active & ~done[..., None]
    if bool(empty.any()):
        _relocate_empty(state, data, slot_active, empty)
    means = state.sums / state.counts.clamp(min=1)[..., None]
    if spherical:
        origin = data.mean[:, None, None, :]  # normalise in the caller's (uncentred) coordinates
        means = F.normalize(means + origin, dim=-1) - origin
    # A cluster can only stay empty when it lost its last point; it keeps its previous center.
    keep = done[..., None] | (state.counts == 0)
    means = torch.where(keep[..., None], state.centers, means)
    shift = (means - state.centers).norm(dim=-1)  # [b, r, k]
    state.centers = means
    # Triangle inequality: a center that moved by s is at most s nearer / farther to any point.
    state.lower = state.lower.sub_(shift.max(dim=-1).values[:, None]).clamp_(min=0.0)
    state.upper += shift[:, None].expand(*state.labels.shape, -1).gather(-1, state.labels[..., None]).squeeze(-1)
    return shift.pow(2).sum(dim=-1)


def _relocate_empty(state: _LloydState, data: _Prepared, slot_active: torch.Tensor, empty: torch.Tensor) -> None:
    """Re-seed empty clusters with the points farthest from their centers (rare path).

    As scikit-learn: per restart, the j-th empty cluster takes the j-th farthest point (exact
    distances to the current centers), which leaves its old cluster. Unlike scikit-learn the point
    is also relabelled, which keeps the incremental cluster sums equal to the sums of the labels.
    """
    b, r, k, c = state.centers.shape
    n = data.x.shape[1]
    d2 = _sq_distances(data.x, data.sqnorm, state.centers.view(b, r * k, c)).view(b, n, r, k)
    distance = d2.masked_fill_(~slot_active[:, None], float("inf")).sqrt_()
    state.upper, state.lower = _bounds(distance, state.labels)  # exact bounds
    own = state.upper.masked_fill(~data.valid[..., None], -1.0)  # [b, n, r]
    far = own.topk(min(k, n), dim=1).indices  # [b, k, r], farthest first
    rank = torch.cumsum(empty.long(), dim=-1) - 1
    for bi, ri, ki in empty.nonzero().tolist():
        point = int(far[bi, rank[bi, ri, ki], ri])
        old = int(state.labels[bi, point, ri])
        x, sq = data.x[bi, point], data.sqnorm[bi, point]
        state.sums[bi, ri, old] -= x
        state.sums[bi, ri, ki] += x
        state.sqsums[bi, ri, old] -= sq
        state.sqsums[bi, ri, ki] += sq
        state.counts[bi, ri, old] -= 1
        state.counts[bi, ri, ki] += 1
        state.labels[bi, point, ri] = ki
        state.upper[bi, point, ri] = float("inf")  # its new center is not known yet: recompute


def _assign_uncertain(
    state: _LloydState, data: _Prepared, slot_active: torch.Tensor, done: torch.Tensor, workspace: _Workspace
) -> torch.Tensor:
    """E-step with Hamerly's bounds: recompute exact distances only where a label may change.

    A point keeps its label in a restart when the upper bound to its center is at most the lower
    bound to every other center. The remaining points (union over the restarts of an instance)
    are gathered and compared with all centers of all restarts in one product. Instances are
    split into "mostly uncertain" and "few uncertain" groups so that one slow instance does not
    make the whole chunk pay for all its points.

    Returns a [b, r] flag: some label of the restart changed.
    """
    b, n, r = state.labels.shape
    uncertain = (state.upper > state.lower) & data.valid[..., None] & ~done[:, None, :]
    rows = uncertain.any(dim=-1)  # [b, n]
    per_instance = rows.sum(dim=1)
    moved = torch.zeros(b, r, dtype=torch.bool, device=rows.device)
    # Gathering a row costs about half of its product with all centers: when most rows are
    # uncertain, computing every row in place is cheaper.
    if bool(per_instance.sum() * 5 >= data.num_valid.sum() * 3):
        _reassign(state, data, slot_active, done, torch.arange(b, device=rows.device), None, moved, workspace)
        return moved
    for group in (4 * per_instance > n, (per_instance > 0) & (4 * per_instance <= n)):
        instances = group.nonzero().squeeze(1)
        if len(instances) == 0:
            continue
        num_rows = int(per_instance[instances].max())
        index = torch.sort((~rows[instances]).to(torch.uint8), dim=1, stable=True).indices[:, :num_rows]
        _reassign(state, data, slot_active, done, instances, index, moved, workspace)
    return moved


def _reassign(state, data, slot_active, done, instances, index, moved, workspace) -> None:
    """Exact assignment of the points ``index`` [b', u] (None: all) of ``instances`` [b'].

    The cluster sums are then updated with the points that changed cluster only: after the first
    iterations few points move, so this costs far less than recomputing the means from scratch.
    """
    r, k, c = state.centers.shape[1:]
    if index is None:
        x, sqnorm, valid, old = data.x, data.sqnorm, data.valid, state.labels
    else:
        rows = (instances[:, None], index)
        x = workspace.gather("rows", data.x, instances, index)
        sqnorm, valid, old = data.sqnorm[rows], data.valid[rows], state.labels[rows]
    centers = state.centers[instances].view(len(instances), r * k, c)
    d2 = _sq_distances(x, sqnorm, centers).view(len(instances), -1, r, k)
    distance = d2.masked_fill_(~slot_active[instances][:, None], float("inf")).sqrt_()
    labels = torch.where(~valid[..., None] | done[instances][:, None], old, distance.argmin(dim=-1))
    upper, lower = _bounds(distance, labels)
    changed = labels != old  # [b', u, r]
    moved[instances] = changed.any(dim=1)
    if index is None:
        state.labels, state.upper, state.lower = labels, upper, lower
    else:
        state.labels[rows], state.upper[rows], state.lower[rows] = labels, upper, lower
    _move_points(state, data, instances, index, changed.any(dim=-1), old, labels, workspace)


def _move_points(state, data, instances, index, changed, old, new, workspace) -> None:
    """Update the cluster sums of ``instances`` for points whose labels went from ``old`` to ``new``.

    ``index`` [b', u] (None: all points) gives the points of ``old``/``new`` [b', u, r]; only
    the rows flagged in ``changed`` [b', u] are gathered. When most points of the chunk moved,
    the sums are rebuilt from the labels instead (no gather; also resets rounding drift).
    """
    per_instance = changed.sum(dim=1)
    num_rows = int(per_instance.max()) if len(instances) else 0
    if num_rows == 0:
        return
    k = state.centers.shape[2]
    if index is None and bool(per_instance.sum() * 2 >= data.num_valid.sum()):
        state.sums, state.sqsums, state.counts = _cluster_sums(data, state.labels, k)
        return
    pick = torch.sort((~changed).to(torch.uint8), dim=1, stable=True).indices[:, :num_rows]
    local = torch.arange(len(instances), device=pick.device)[:, None]
    points = pick if index is None else index[local, pick]
    x = workspace.gather("rows", data.x, instances, points)
    sqnorm = data.sqnorm[instances[:, None], points]
    change = F.one_hot(new[local, pick], k) - F.one_hot(old[local, pick], k)  # [b', m, r, k], 0 if unmoved
    change = change.to(x.dtype).view(len(instances), num_rows, -1).transpose(1, 2)
    state.sums[instances] += torch.bmm(change, x).view(state.sums[instances].shape)
    state.sqsums[instances] += torch.bmm(change, sqnorm[..., None]).view(state.sqsums[instances].shape)
    state.counts[instances] += change.sum(dim=-1).view(state.counts[instances].shape)


def _lloyd(
    data: _Prepared,
    seeds: torch.Tensor,
    seed_d2: torch.Tensor,
    slot_active: torch.Tensor,
    tol: torch.Tensor,
    max_iter: int,
    spherical: bool,
    workspace: _Workspace,
    known=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd iterations for all restarts with per-restart convergence (scikit-learn's rule).

    Assignment t uses centers c_t; a restart stops there when no label changed since t-1
    (strict convergence, scikit-learn then counts one more iteration) or when
    ||c_t - c_{t-1}||^2 <= tol, or at t = max_iter. Its c_t, labels and inertia are then final and
    frozen. Frozen restarts and points whose labels are certain cost no distance computations
    (Hamerly's bounds), so the work per iteration shrinks as restarts converge. The result equals
    plain Lloyd up to float rounding on near-ties.

    Returns centers [b, r, k, C], labels [b, n, r], inertia [b, r], n_iter [b, r]. ``known``: see
    :class:`_LloydState`.
    """
    b, r = seeds.shape[:2]
    state = _LloydState(data, seeds, seed_d2, slot_active, known, workspace)
    final_centers, final_labels = state.centers.clone(), state.labels.clone()
    final_inertia = seeds.new_zeros(b, r)
    final_iter = torch.zeros(b, r, dtype=torch.long, device=seeds.device)
    done = torch.zeros(b, r, dtype=torch.bool, device=seeds.device)
    strict = shift = None
    for it in range(max_iter + 1):
        if it == max_iter:
            stop = ~done
        elif strict is None:
            stop = torch.zeros_like(done)
        else:
            stop = (strict | (shift <= tol[:, None])) & ~done
        if bool(stop.any()):
            final_centers = torch.where(stop[..., None, None], state.centers, final_centers)
            final_labels = torch.where(stop[:, None], state.labels, final_labels)
            final_inertia = torch.where(stop, state.inertia(), final_inertia)
            counted = it if strict is None or it == max_iter else it + strict.long()  # sklearn's n_iter_
            final_iter = torch.where(stop, counted, final_iter)
            done |= stop
        if it == max_iter or bool(done.all()):
            break
        shift = _update_centers(state, data, slot_active, done, spherical)
        strict = ~_assign_uncertain(state, data, slot_active, done, workspace)
    return final_centers, final_labels, final_inertia, final_iter


def _plain_lloyd(
    data: _Prepared, centers: torch.Tensor, seed_d2: torch.Tensor, slot_active: torch.Tensor, max_iter: int
):
    """Plain Lloyd iterations for all restarts of low-dimensional data (the projected stage).

    Every iteration recomputes all distances: in a few dozen dimensions that costs less than the
    bookkeeping of bounds. A restart stops when no label changes (or after ``max_iter``); empty
    clusters keep their center. Returns labels [b, n, r], inertia [b, r] and n_iter [b, r].
    """
    b, r, k, d = centers.shape
    n = data.x.shape[1]
    inactive = ~slot_active[:, None]  # [b, 1, r, k]
    labels = seed_d2.permute(0, 3, 1, 2).masked_fill(inactive, float("inf")).argmin(dim=-1)  # [b, n, r]
    done = torch.zeros(b, r, dtype=torch.bool, device=centers.device)
    n_iter = torch.zeros(b, r, dtype=torch.long, device=centers.device)
    weight = data.valid[:, :, None, None].to(data.x.dtype).expand(b, n, r, 1)

    def cluster_sums(labels):  # [b, r, k, d] sums of the valid points and [b, r, k] counts
        one_hot = data.x.new_zeros(b, n, r, k).scatter_(-1, labels[..., None], weight).view(b, n, r * k)
        return torch.bmm(one_hot.transpose(1, 2), data.x).view(b, r, k, d), one_hot.sum(dim=1).view(b, r, k)

    for _ in range(max_iter):
        sums, counts = cluster_sums(labels)
        keep = done[..., None] | (counts == 0)
        centers = torch.where(keep[..., None], centers, sums / counts.clamp(min=1)[..., None]).view(b, r * k, d)
        # ||z - c||^2 up to ||z||^2, which does not change the argmin
        d2 = torch.baddbmm(centers.pow(2).sum(dim=-1)[:, None], data.x, centers.transpose(1, 2), alpha=-2.0)
        new = d2.view(b, n, r, k).masked_fill_(inactive, float("inf")).argmin(dim=-1)
        centers = centers.view(b, r, k, d)
        changed = ((new != labels) & data.valid[..., None]).any(dim=1) & ~done
        n_iter += ~done
        labels = torch.where(changed[:, None], new, labels)
        done |= ~changed
        if bool(done.all()):
            break
    # inertia of the final labels: sum ||z - c||^2 = sum ||z||^2 - sum_clusters ||S||^2 / count
    sums, counts = cluster_sums(labels)
    inertia = data.sqnorm.sum(dim=1)[:, None] - (sums.pow(2).sum(dim=-1) / counts.clamp(min=1)).sum(dim=-1)
    return labels, inertia, n_iter


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
