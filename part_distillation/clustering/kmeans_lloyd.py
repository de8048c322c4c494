"""The solver inside :func:`~part_distillation.clustering.kmeans.batched_kmeans`: packed chunks and Lloyd.

:func:`prepare_chunk` packs the valid points of a chunk of instances to the front, centred per instance
(:class:`Prepared`; buffers reused through :class:`Workspace`). :func:`lloyd` runs exact Lloyd iterations for
every restart with scikit-learn's stopping rule and Hamerly's distance bounds (Hamerly, "Making k-means even
faster", SDM 2010), updating cluster sums with the points that moved only; :func:`plain_lloyd` is the bound-free
variant of the projected (low-dimensional) stage. The algorithm and its guarantees are described in
:mod:`part_distillation.clustering.kmeans`; this module holds no public API of its own.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Workspace",
    "Prepared",
    "prepare_chunk",
    "compute_dtype",
    "seeding_distances",
    "gather_points",
    "lloyd",
    "plain_lloyd",
    "per_cluster_sums",
]

# Squared distances below this fraction of ||x||^2 + ||c||^2 are rounding noise of the matmul
# expansion; seeding treats them as 0 so that duplicated points are not chosen twice.
_DUPLICATE_RTOL = 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half and bfloat16 are computed in float32 (distances need its range)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Workspace:
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


class Prepared(NamedTuple):
    """One chunk of instances, packed and centred (valid points first, zeros after)."""

    x: torch.Tensor  # [b, n, C] centred features of the valid points
    sqnorm: torch.Tensor  # [b, n] ||x||^2 (0 for padding)
    valid: torch.Tensor  # [b, n] bool
    num_valid: torch.Tensor  # [b] long
    mean: torch.Tensor  # [b, C] per-instance mean that was subtracted
    order: torch.Tensor  # [b, n] original index of every packed point


def prepare_chunk(
    x: torch.Tensor, valid: torch.Tensor, instances: torch.Tensor, metric: str, workspace: Workspace
) -> Prepared:
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
    dtype = compute_dtype(x.dtype)
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
    return Prepared(packed, sqnorm, packed_valid, num_valid, mean, order)


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


def seeding_distances(data: Prepared, centers: torch.Tensor) -> torch.Tensor:
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


def gather_points(data: Prepared, index: torch.Tensor) -> torch.Tensor:
    """Packed points at ``index`` [b, m] -> [b, m, C]."""
    batch_index = torch.arange(index.shape[0], device=index.device)[:, None]
    return data.x[batch_index, index]


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
        data: Prepared,
        seeds: torch.Tensor,
        seed_d2: torch.Tensor,
        slot_active: torch.Tensor,
        known=None,
        workspace: Optional["Workspace"] = None,
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
            self.sums, self.sqsums, self.counts = per_cluster_sums(data, self.labels, seeds.shape[2])
            return
        old, self.sums, self.sqsums, self.counts = known
        changed = (old != self.labels) & data.valid[..., None]
        instances = torch.arange(old.shape[0], device=old.device)
        _move_points(self, data, instances, None, changed.any(dim=-1), old, self.labels, workspace or Workspace())

    def inertia(self) -> torch.Tensor:
        """[b, r] sum_i ||x_i - c_label(i)||^2 from the cluster sums: T - 2 c.S + n ||c||^2."""
        c = self.centers
        per_cluster = self.sqsums - 2.0 * (c * self.sums).sum(dim=-1) + self.counts * c.pow(2).sum(dim=-1)
        return per_cluster.clamp_(min=0.0).sum(dim=-1)


def _bounds(distance: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact distance to the labelled center and to the nearest other one, from [..., k] distances."""
    own = distance.gather(-1, labels[..., None])
    return own.squeeze(-1), distance.scatter(-1, labels[..., None], float("inf")).min(dim=-1).values


def per_cluster_sums(data: Prepared, labels: torch.Tensor, k: int):
    """Per-cluster sums of x [b, r, k, C], of ||x||^2 [b, r, k] and counts [b, r, k] (valid points)."""
    b, n, r = labels.shape
    one_hot = F.one_hot(labels, k).to(data.x.dtype).mul_(data.valid[:, :, None, None]).view(b, n, r * k)
    sums = torch.bmm(one_hot.transpose(1, 2), data.x).view(b, r, k, -1)
    sqsums = torch.bmm(one_hot.transpose(1, 2), data.sqnorm[..., None]).view(b, r, k)
    return sums, sqsums, one_hot.sum(dim=1).view(b, r, k)


def _update_centers(
    state: _LloydState, data: Prepared, slot_active: torch.Tensor, done: torch.Tensor, spherical: bool
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


def _relocate_empty(state: _LloydState, data: Prepared, slot_active: torch.Tensor, empty: torch.Tensor) -> None:
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
    state: _LloydState, data: Prepared, slot_active: torch.Tensor, done: torch.Tensor, workspace: Workspace
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
        state.sums, state.sqsums, state.counts = per_cluster_sums(data, state.labels, k)
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


def lloyd(
    data: Prepared,
    seeds: torch.Tensor,
    seed_d2: torch.Tensor,
    slot_active: torch.Tensor,
    tol: torch.Tensor,
    max_iter: int,
    spherical: bool,
    workspace: Workspace,
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


def plain_lloyd(data: Prepared, centers: torch.Tensor, seed_d2: torch.Tensor, slot_active: torch.Tensor, max_iter: int):
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
