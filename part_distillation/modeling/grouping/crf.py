"""Dense-CRF refinement of part segments inside an object (stage 1b, spec §2.6).

The reference snaps the K-means part segments of each object to image edges with a fully connected
CRF (Krähenbühl & Koltun, NeurIPS 2011) run through pydensecrf on the CPU, one process per image:
unary ``-log p`` with ``p = gt_prob`` for the pixel's current label and ``(1 - gt_prob) / (L - 1)``
for every other label (label 0, the background, is an ordinary label, not "unsure"), a Gaussian
position kernel (θγ = 3 px, weight 3), a bilateral position+colour kernel (θα = 20 px, θβ = 13,
weight 10), Potts compatibility, 10 mean-field iterations, argmax.

:class:`DenseCRFRefiner` runs that CRF with one of two backends behind one interface:

* ``"pydensecrf"``: the reference implementation (CPU, one image at a time). Optional dependency.
* ``"torch"``: our batched mean-field on any torch device (the model's GPU in the pipeline).

Approximation used by the torch backend
---------------------------------------
Exact dense filtering is O(N²) per iteration. We use the approximation the reference itself uses:
the **permutohedral lattice** (Adams, Baek & Davis, Eurographics 2010), re-implemented in torch.
Every pixel's feature vector (position / σ, and colour / σ for the bilateral kernel) is lifted onto
the lattice, splatted onto the d + 1 vertices of its enclosing simplex with barycentric weights,
blurred with a [1/2, 1, 1/2] stencil along each of the d + 1 lattice directions and sliced back.
Features are scaled by sqrt(2/3)·(d + 1) as in that paper, so σ means what it means in pydensecrf.
Messages use pydensecrf's ``NORMALIZE_SYMMETRIC`` operator, which we measured on pydensecrf to be
``D^-1/2 K D^-1/2`` with ``D = diag(K 1)``, self-connection included (the lattice does not remove
it); the Potts term adds ``w · message`` to the label's logit and the new marginals are the softmax.
Because the approximation is the same, single messages match pydensecrf to ~1e-6 and refined
labels agree on > 99 % of pixels (tests/modeling/test_crf.py, benchmarks/crf.py).

Why not a ConvCRF-style local window: the bilateral kernel is θα = 20 px wide, so a window that
keeps its 2σ support is ~81×81 per pixel (6.5k taps × labels × pixels per iteration), and running it
on a downsampled grid blurs exactly the colour edges the bilateral term exists to follow. The
lattice costs O(N·(d+1)·L) per iteration whatever σ is, and it needs no window-size knob.

Implementation: splat and slice are fixed sparse matrices with the normalisation and the Potts
weight folded in, so each iteration is two CSR × dense products per kernel plus d + 1 gather rounds
on the (much smaller) vertex set. Building a lattice is one sort of the simplex-corner keys per
corner index (packed into int64), a searchsorted for the blur neighbours, and no Python loop over
pixels or images: a batch is one lattice whose keys carry the image index. The position-only
lattice depends only on the image size, so it is cached and applied to every image of a batch.
Everything is deterministic on the CPU (sorts are stable, MKL reduces each row in order).

CPU threads: the backend issues many medium-sized ops, so on an oversubscribed CPU (a shared
machine with load above its core count) multi-threaded torch can be >10x slower than
``torch.set_num_threads(1)``, as each op waits for a descheduled OpenMP thread. CPU workers should
run one thread each, as the reference runs one pydensecrf process per core; GPUs are unaffected.

Object boundary: by default (``restrict_to_object=False``) the CRF behaves like the reference: the
background is an ordinary label, so parts may grow into the background or lose pixels to it. With
``restrict_to_object=True`` pixels outside the object (label 0) stay 0 and pixels inside choose
among the part labels only (constrained mean-field: forbidden labels get a prohibitive unary in
both backends), so only the boundaries *between* parts move.
"""

import math
import warnings
from collections import OrderedDict
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "DenseCRFRefiner",
    "PermutohedralLattice",
    "unary_from_labels",
    "unary_from_probs",
]

BACKENDS = ("torch", "pydensecrf")
IGNORE_LABEL = -1
# Unary energy of a label a pixel may not take (restrict_to_object). exp(-1e4) is 0 in float32 and
# no message (bounded by the kernel weights) can overcome it, yet it stays finite for pydensecrf.
_FORBIDDEN_ENERGY = 1.0e4
_KEY_BITS = 62  # packed lattice keys must stay below 2**62 so neighbour arithmetic cannot overflow
_SPATIAL_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------------
# Unary potentials
# --------------------------------------------------------------------------------------------------
def unary_from_labels(
    labels: torch.Tensor, num_labels: int, gt_prob: float = 0.7, zero_unsure: bool = False
) -> torch.Tensor:
    """Unary energies ``-log p`` of a hard label map, with ``pydensecrf.utils.unary_from_labels`` semantics.

    Args:
        labels: integer tensor ``[..., H, W]``. ``-1`` (ignore) gets a uniform distribution.
        num_labels: number of CRF labels L. With ``zero_unsure`` label 0 is not counted (as in
            pydensecrf): label ``i >= 1`` then maps to channel ``i - 1``.
        gt_prob: probability given to the pixel's own label; the other ``L - 1`` labels share the
            rest uniformly.
        zero_unsure: treat label 0 as "could be anything" (uniform). The reference uses False: the
            background is an ordinary label.

    Returns:
        float32 energies ``[..., L, H, W]``.
    """
    if labels.dim() < 2:
        raise ValueError(f"labels must have at least 2 dims [..., H, W], got shape {tuple(labels.shape)}")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    labels = labels.long()
    if bool((labels < IGNORE_LABEL).any()):
        raise ValueError(f"labels must be >= {IGNORE_LABEL} (ignore)")
    channel = labels - 1 if zero_unsure else labels
    unsure = (labels == IGNORE_LABEL) | ((labels == 0) if zero_unsure else torch.zeros_like(labels, dtype=torch.bool))
    if bool(((channel >= num_labels) & ~unsure).any()):
        raise ValueError(f"labels must be < num_labels ({num_labels}{' + 1 with zero_unsure' if zero_unsure else ''})")

    other = -math.log((1.0 - gt_prob) / (num_labels - 1)) if num_labels > 1 else 0.0
    label_dim = labels.dim() - 2
    shape = list(labels.shape)
    shape.insert(label_dim, num_labels)
    energy = torch.full(shape, other, dtype=torch.float32, device=labels.device)
    own = channel.clamp(0, num_labels - 1).unsqueeze(label_dim)
    energy.scatter_(label_dim, own, -math.log(gt_prob))
    return torch.where(unsure.unsqueeze(label_dim), torch.full_like(energy, math.log(num_labels)), energy)


def unary_from_probs(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Unary energies ``-log p`` of soft label probabilities ``[..., L, H, W]``, clipped at ``eps``.

    The clip keeps a label the model rules out reachable by strong pairwise evidence, as a hard 0
    would forbid it outright.
    """
    return -torch.log(probs.float().clamp(eps, 1.0))


# --------------------------------------------------------------------------------------------------
# Permutohedral lattice
# --------------------------------------------------------------------------------------------------
class _KeyOverflow(ValueError):
    """The lattice keys of this input do not fit in int64; split the batch or use larger sigmas."""


def _elevation_matrix(d: int, device, dtype=torch.float32) -> torch.Tensor:
    """``[d+1, d]`` map from feature space onto the lattice hyperplane ``sum(x) = 0``.

    Its columns are an orthonormal basis of the hyperplane, scaled by sqrt(2/3)·(d+1): at that scale
    splat + [1/2, 1, 1/2] blurs + slice approximate a unit-σ Gaussian (Adams et al. 2010), which is
    what pydensecrf does, so our σ is its σ.
    """
    basis = torch.zeros(d + 1, d, dtype=torch.float64)
    for col in range(d):
        basis[: col + 1, col] = 1.0
        basis[col + 1, col] = -(col + 1.0)
        basis[:, col] /= math.sqrt((col + 1.0) * (col + 2.0))
    return (basis * (math.sqrt(2.0 / 3.0) * (d + 1))).to(device=device, dtype=dtype)


def _descending_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each coordinate in decreasing order (0 = largest); ties go to the lower index first.

    Pairwise comparisons of contiguous columns instead of a sort: d + 1 <= 6 columns here, and a
    per-row sort or an [N, d+1, d+1] broadcast is ~10x slower.
    """
    width = values.shape[1]
    columns = values.t().contiguous()
    rank = torch.zeros(width, values.shape[0], dtype=torch.uint8, device=values.device)
    for i in range(width):
        for j in range(i + 1, width):
            j_larger = columns[i] < columns[j]
            rank[i] += j_larger
            rank[j] += ~j_larger
    return rank.t().long()


def _enclosing_simplex(elevated: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remainder-0 vertex, coordinate ranks and barycentric weights of each point's simplex.

    Conway & Sloane's closest-point search on the A*_d lattice, as used by Adams et al.: round to
    the nearest multiple of d+1, rank the residuals, then shift so that the vertex sums to zero.
    Returns ``q0`` (long ``[N, d+1]``: the remainder-0 vertex divided by d+1), ``rank`` (long
    ``[N, d+1]``, a permutation of 0..d) and ``bary`` (``[N, d+1]``, weight of the remainder-k
    vertex in column k).
    """
    n, dp1 = elevated.shape
    d = dp1 - 1
    nearest = torch.ceil(elevated / dp1 - 0.5)
    rank = _descending_rank(elevated - nearest * dp1)
    rank = rank + nearest.sum(1).long()[:, None]
    wrap = (rank < 0).long() - (rank > d).long()
    rank = rank + dp1 * wrap
    q0 = nearest.long() + wrap

    residual = (elevated - (q0 * dp1).to(elevated.dtype)) / dp1
    ordered = torch.zeros_like(residual).scatter_(1, d - rank, residual)
    bary = torch.empty_like(residual)
    bary[:, 1:] = ordered[:, 1:] - ordered[:, :-1]
    bary[:, 0] = ordered[:, 0] + 1.0 - ordered[:, d]
    return q0, rank, bary


def _strides(radices: List[int]) -> List[int]:
    """Mixed-radix strides (last digit fastest), refusing codes that would not fit in int64."""
    total = 1
    for radix in radices:
        total *= max(int(radix), 1)
    if total >= 2**_KEY_BITS:
        raise _KeyOverflow(
            f"permutohedral lattice keys need {math.log2(total):.1f} bits (> {_KEY_BITS}): the features span "
            "too many kernel widths; use larger sigmas or a smaller image"
        )
    strides, acc = [], 1
    for radix in reversed(radices):
        strides.append(acc)
        acc *= max(int(radix), 1)
    return strides[::-1]


def _group_by_corner(codes: torch.Tensor):
    """Deduplicate ``[N, d+1]`` vertex codes whose leading digit is the corner k.

    Returns the sorted unique codes, the vertex id of every flat entry ``n·(d+1) + k``, the entries
    in vertex order (points ascending inside a vertex: the sorts are stable) and the entries per
    vertex. Codes of corner k all precede those of corner k+1, so d+1 sorts of N codes replace one
    sort of N·(d+1); pixel-ordered codes are nearly sorted per corner, which makes each sort cheap.
    """
    n, dp1 = codes.shape
    sorted_codes, entry_order = [], []
    for corner in range(dp1):
        values, order = torch.sort(codes[:, corner].contiguous(), stable=True)
        sorted_codes.append(values)
        entry_order.append(order * dp1 + corner)
    sorted_codes, entry_order = torch.cat(sorted_codes), torch.cat(entry_order)
    starts = torch.ones_like(sorted_codes, dtype=torch.bool)
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
    ids_sorted = torch.cumsum(starts, 0) - 1
    vertex_of_entry = torch.empty_like(ids_sorted).scatter_(0, entry_order, ids_sorted)
    bounds = torch.cat([torch.nonzero(starts)[:, 0], torch.tensor([n * dp1], device=codes.device)])
    return sorted_codes[starts], vertex_of_entry, entry_order, bounds[1:] - bounds[:-1]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A CSR matrix built without invariant checks or the 'beta' warning (our indices are valid by construction)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class PermutohedralLattice:
    """Gaussian filtering of N points with d-dim features, ``out_i ≈ Σ_j exp(-|f_i - f_j|² / 2) x_j``.

    Built once per feature set; :meth:`filter` then costs O(N·(d+1)·C) for C value channels. Points
    with different ``groups`` ids (e.g. images of a batch) never interact.

    Args:
        features: ``[N, d]`` float features, already divided by the kernel's σ.
        groups: optional ``[N]`` long ids in ``[0, num_groups)``.
        num_groups: number of groups (default: ``groups.max() + 1``).
        sorted_columns: sort the column ids inside each row of the slice matrix, as cuSPARSE assumes
            (the splat matrix is sorted by construction). MKL does not need it. Default: not CPU.
    """

    def __init__(
        self,
        features: torch.Tensor,
        groups: Optional[torch.Tensor] = None,
        num_groups: Optional[int] = None,
        sorted_columns: Optional[bool] = None,
    ):
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be a non-empty [N, d] tensor, got shape {tuple(features.shape)}")
        device = features.device
        self.num_points, self.dim = features.shape
        self.sorted_columns = device.type != "cpu" if sorted_columns is None else sorted_columns
        dp1 = self.dim + 1
        if groups is None:
            groups = torch.zeros(self.num_points, dtype=torch.long, device=device)
            num_groups = 1
        elif num_groups is None:
            num_groups = int(groups.max()) + 1

        elevated = features.float() @ _elevation_matrix(self.dim, device).T
        q0, rank, self.bary = _enclosing_simplex(elevated)
        codes, strides = self._vertex_codes(q0, rank, groups, num_groups)
        # sorting the (point, corner) vertex codes gives the vertex set, each point's vertex ids and
        # the splat matrix's rows (entries grouped by vertex, points ascending)
        vertex_codes, vertex_of_entry, entry_order, entries_per_vertex = _group_by_corner(codes)
        self.num_vertices = vertex_codes.numel()
        self.vertex_index = vertex_of_entry.view(self.num_points, dp1)  # [N, d+1] vertex of the k-th corner
        self._neighbours = self._blur_neighbours(vertex_codes, strides)

        # Sparse structure, built once. MKL and cuSPARSE are ~1.6x faster with 32-bit indices.
        self.index_dtype = torch.int32 if self.num_points * dp1 < 2**31 else torch.long
        self._splat_counts = entries_per_vertex  # splat rows = vertices, holding ...
        self._splat_col = (entry_order // dp1).to(self.index_dtype)  # ... these points ...
        self._splat_bary = self.bary.reshape(-1)[entry_order]  # ... with these barycentric weights
        slice_vertex = self.vertex_index  # slice rows = points, d+1 vertices each
        self._slice_order = None
        if self.sorted_columns:  # cuSPARSE wants each row's column ids ascending
            self._slice_order = torch.argsort(slice_vertex, 1)
            slice_vertex = torch.gather(slice_vertex, 1, self._slice_order)
        self._slice_col = slice_vertex.to(self.index_dtype)

    # ---- construction --------------------------------------------------------------------------
    def _vertex_codes(self, q0, rank, groups, num_groups):
        """``[N, d+1]`` int64 codes of each point's simplex corners, and the strides that packed them.

        A code packs (k, group, q_0..q_{d-1}), where the remainder-k corner is ``(d+1)·q + k`` (its
        last coordinate follows from the zero sum). That corner is ``q0 - [rank > d - k]``, so its
        code is the point's base code + k·stride_k minus the strides of the coordinates ranked
        above ``d - k``: a cumulative sum over coordinates taken in rank order. The q digits keep
        one step of margin on both sides so that blur neighbours are always representable.
        """
        d, dp1 = self.dim, self.dim + 1
        device = q0.device
        low = q0[:, :d].amin(0) - 2
        radices = [dp1, num_groups] + (q0[:, :d].amax(0) - low + 2).tolist()
        strides = _strides(radices)  # k is the leading digit: corners of different k never collide
        base = groups * strides[1]
        for i in range(d):
            base = base + (q0[:, i] - low[i]) * strides[i + 2]
        coordinate_strides = torch.tensor(strides[2:] + [0], dtype=torch.long, device=device)
        stride_of_rank = torch.zeros_like(rank).scatter_(1, rank, coordinate_strides.expand_as(rank).contiguous())
        above = torch.cumsum(torch.flip(stride_of_rank, [1]), 1)  # above[:, m] = Σ_{r >= d-m} stride_of_rank[r]
        offsets = torch.arange(dp1, device=device) * strides[0] - torch.cat(
            [torch.zeros_like(above[:, :1]), above[:, :d]], 1
        )
        return base[:, None] + offsets, strides

    def _blur_neighbours(self, vertex_codes, strides):
        """``[d+1, 2, M]`` ids of each vertex's -1 and +1 neighbours per lattice direction (M = missing).

        Moving by ±1 along direction j adds ±1 to every coordinate but j, which moves by ∓d, and
        turns remainder k into k±1 (mod d+1); in packed codes that is plain integer arithmetic
        (going from k = d to 0 also raises every q by one).
        """
        d, dp1 = self.dim, self.dim + 1
        num = vertex_codes.numel()
        remainder = torch.div(vertex_codes, strides[0], rounding_mode="floor")
        q_strides = strides[2:]
        neighbours = torch.empty(dp1, 2, num, dtype=torch.long, device=vertex_codes.device)
        missing = torch.full((num,), num, dtype=torch.long, device=vertex_codes.device)
        everyone = torch.arange(num, device=vertex_codes.device)
        # look up the +1 neighbours; the -1 relation is its inverse (v = plus(u) <=> u = minus(v))
        carry = (remainder == d).long()  # remainder d + 1 wraps to 0 and moves every q up by one
        base = vertex_codes + (1 - dp1 * carry) * strides[0] + carry * sum(q_strides)
        for direction in range(dp1):
            codes = base - q_strides[direction] if direction < d else base
            pos = torch.searchsorted(vertex_codes, codes).clamp_max_(num - 1)
            found = vertex_codes[pos] == codes
            neighbours[direction, 1] = torch.where(found, pos, missing)
            neighbours[direction, 0] = missing
            neighbours[direction, 0].index_put_((pos[found],), everyone[found])
        return neighbours

    # ---- filtering -----------------------------------------------------------------------------
    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Unnormalised Gaussian filtering of ``[N, C]`` values."""
        return _LatticeOperator(self)(values.float().contiguous())

    def symmetric_norm(self) -> torch.Tensor:
        """``[N]`` weights ``(K 1)^-1/2``: pydensecrf's NORMALIZE_SYMMETRIC kernel is ``diag(w) K diag(w)``."""
        ones = torch.ones(self.num_points, 1, device=self.bary.device)
        return torch.rsqrt(self.filter(ones)[:, 0] + 1e-20)


class _LatticeOperator:
    """``x -> diag(post) K diag(pre) x`` as splat (CSR) -> d+1 blur rounds (gathers) -> slice (CSR).

    The per-point weights are folded into the sparse values once, so an application costs two
    sparse products and the blur. ``copies`` > 1 applies a one-image lattice (the position kernel,
    shared by all images) to each of ``copies`` consecutive blocks of points as a block-diagonal
    operator: a batch as one tall product, since MKL slows down sharply on wide (B·L-column) ones.
    """

    def __init__(self, lattice: PermutohedralLattice, pre=None, post=None, copies: int = 1):
        n, num, dp1 = lattice.num_points, lattice.num_vertices, lattice.dim + 1
        device, index_dtype = lattice.bary.device, lattice.index_dtype
        splat_values = lattice._splat_bary if pre is None else lattice._splat_bary * pre[lattice._splat_col.long()]
        slice_values = lattice.bary if post is None else lattice.bary * post[:, None]
        if lattice._slice_order is not None:
            slice_values = torch.gather(slice_values, 1, lattice._slice_order)
        counts, splat_col, slice_col, neighbours = (
            lattice._splat_counts,
            lattice._splat_col,
            lattice._slice_col,
            lattice._neighbours,
        )
        if copies > 1:
            if n * copies * dp1 >= 2**31:
                index_dtype = torch.long
            copy = torch.arange(copies, device=device)
            counts = counts.repeat(copies)
            splat_col = (splat_col.to(index_dtype)[None] + (copy * n).to(index_dtype)[:, None]).reshape(-1)
            splat_values = splat_values.repeat(copies)
            slice_col = (slice_col.to(index_dtype)[None] + (copy * num).to(index_dtype)[:, None, None]).reshape(-1, dp1)
            slice_values = slice_values.repeat(copies, 1)
            shifted = neighbours[:, :, None, :] + (copy * num)[None, None, :, None]
            neighbours = shifted.masked_fill((neighbours == num)[:, :, None, :], copies * num).reshape(dp1, 2, -1)
        total, points = copies * num, copies * n
        # one extra, empty vertex row: missing blur neighbours point at it, so it must stay zero
        crow = torch.zeros(total + 2, dtype=index_dtype, device=device)
        crow[1 : total + 1] = torch.cumsum(counts, 0)
        crow[-1] = crow[total]
        self.splat = _csr(crow, splat_col, splat_values, (total + 1, points))
        slice_crow = torch.arange(0, points * dp1 + 1, dp1, device=device, dtype=index_dtype)
        self.slice = _csr(slice_crow, slice_col.reshape(-1), slice_values.reshape(-1), (points, total + 1))
        padded = torch.full((dp1, 2, total + 1), total, dtype=torch.long, device=device)
        padded[:, :, :total] = neighbours
        self.neighbours = padded.flatten(1)  # [d+1, 2·(total+1)]: the -1 then the +1 neighbours

    def blurred_vertices(self, x: torch.Tensor) -> torch.Tensor:
        """Splat and blur: the ``[V+1, C]`` lattice values that :attr:`slice` maps back to points."""
        vertices = self.splat @ x
        for step in self.neighbours:  # [1/2, 1, 1/2] along one lattice direction per round
            both = vertices.index_select(0, step).view(2, -1, vertices.shape[1])
            vertices.add_(both[0], alpha=0.5).add_(both[1], alpha=0.5)
        return vertices

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.slice @ self.blurred_vertices(x)


def _pixel_grid(height: int, width: int, device) -> torch.Tensor:
    """``[H·W, 2]`` (x, y) pixel coordinates in row-major order, pydensecrf's feature order."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


_spatial_cache: "OrderedDict[tuple, Tuple[PermutohedralLattice, torch.Tensor]]" = OrderedDict()


def _spatial_lattice(height: int, width: int, sigma: float, device) -> Tuple[PermutohedralLattice, torch.Tensor]:
    """Position-only lattice of one H×W image and its norm; cached: it does not depend on the image."""
    key = (height, width, float(sigma), str(device))
    if key in _spatial_cache:
        _spatial_cache.move_to_end(key)
        return _spatial_cache[key]
    lattice = PermutohedralLattice(_pixel_grid(height, width, device) / sigma)
    _spatial_cache[key] = (lattice, lattice.symmetric_norm())
    while len(_spatial_cache) > _SPATIAL_CACHE_SIZE:
        _spatial_cache.popitem(last=False)
    return _spatial_cache[key]


# --------------------------------------------------------------------------------------------------
# Refiner
# --------------------------------------------------------------------------------------------------
def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(
            "DenseCRFRefiner(backend='pydensecrf') needs the optional pydensecrf package: "
            "pip install pydensecrf2 (or use backend='torch')"
        ) from e
    return dcrf


class DenseCRFRefiner:
    """Refine part label maps of objects with a dense CRF (spec §2.6); seed-000 parameters by default.

    Args:
        backend: ``"torch"`` (batched, any device) or ``"pydensecrf"`` (reference, CPU, per image).
        spatial_sigma, spatial_weight: θγ and w2 of the position-only Gaussian kernel.
        bilateral_sigma_xy, bilateral_sigma_rgb, bilateral_weight: θα, θβ and w1 of the bilateral
            kernel. A weight of 0 drops that kernel.
        gt_prob: p_gt of the unary built from hard labels.
        num_iters: mean-field iterations.
        restrict_to_object: False = the reference (the object boundary may move); True = label-0
            pixels stay 0 and object pixels choose among the part labels only.
        device: torch backend only: where to run (default: the labels' device).
        max_chunk_pixels: torch backend only: images are processed in chunks of at most this many
            pixels (at least one image) to bound memory: ~0.7 kB per pixel at peak, so ~1.5 GB at
            the default (3 images of 640², 12 of 320²).
    """

    def __init__(
        self,
        backend: str = "torch",
        spatial_sigma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_sigma_xy: float = 20.0,
        bilateral_sigma_rgb: float = 13.0,
        bilateral_weight: float = 10.0,
        gt_prob: float = 0.7,
        num_iters: int = 10,
        restrict_to_object: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        max_chunk_pixels: int = 2**21,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (
            ("spatial_sigma", spatial_sigma),
            ("bilateral_sigma_xy", bilateral_sigma_xy),
            ("bilateral_sigma_rgb", bilateral_sigma_rgb),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("spatial_weight", spatial_weight), ("bilateral_weight", bilateral_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 < gt_prob < 1.0:
            raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
        if int(num_iters) != num_iters or num_iters < 0:
            raise ValueError(f"num_iters must be a non-negative integer, got {num_iters}")
        if max_chunk_pixels < 1:
            raise ValueError(f"max_chunk_pixels must be >= 1, got {max_chunk_pixels}")
        if backend == "pydensecrf":
            _import_pydensecrf()  # fail at construction, not in the middle of a dataset pass
        self.backend = backend
        self.spatial_sigma = float(spatial_sigma)
        self.spatial_weight = float(spatial_weight)
        self.bilateral_sigma_xy = float(bilateral_sigma_xy)
        self.bilateral_sigma_rgb = float(bilateral_sigma_rgb)
        self.bilateral_weight = float(bilateral_weight)
        self.gt_prob = float(gt_prob)
        self.num_iters = int(num_iters)
        self.restrict_to_object = bool(restrict_to_object)
        self.device = torch.device(device) if device is not None else None
        self.max_chunk_pixels = int(max_chunk_pixels)

    def __repr__(self):
        return (
            f"DenseCRFRefiner(backend={self.backend!r}, spatial=({self.spatial_sigma}, {self.spatial_weight}), "
            f"bilateral=({self.bilateral_sigma_xy}, {self.bilateral_sigma_rgb}, {self.bilateral_weight}), "
            f"gt_prob={self.gt_prob}, num_iters={self.num_iters}, restrict_to_object={self.restrict_to_object})"
        )

    # ---- public API ----------------------------------------------------------------------------
    @torch.no_grad()
    def refine(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        num_labels: Optional[int] = None,
        return_marginals: bool = False,
    ):
        """Refined label maps.

        Args:
            image: uint8 RGB ``[B, 3, H, W]`` or ``[3, H, W]``.
            labels: hard labels (integer ``[B, H, W]`` / ``[H, W]``: 0 = background / outside the
                object, 1..K parts, -1 ignore) or soft probabilities (float ``[B, L, H, W]`` /
                ``[L, H, W]``).
            num_labels: L (background included). Default: ``labels.max() + 1`` for hard labels, the
                channel count for probabilities.
            return_marginals: also return the mean-field marginals ``[B, L, H, W]`` (float32).

        Returns:
            long labels with the batch shape of ``image`` (ignore pixels stay -1), on the labels'
            device; plus the marginals when asked.
        """
        image, labels, hard, unbatched = self._check_inputs(image, labels)
        num_labels = self._check_num_labels(labels, hard, num_labels)
        energy = self._unary(labels, hard, num_labels)
        if num_labels == 1 or energy.numel() == 0:  # nothing to decide
            marginals = torch.softmax(-energy, 1)
        elif self.backend == "torch":
            marginals = self._torch_marginals(image, energy)
        else:
            marginals = self._pydensecrf_marginals(image, energy)
        marginals = marginals.to(labels.device)
        refined = marginals.argmax(1)
        refined = torch.where(hard == IGNORE_LABEL, hard, refined)
        if self.restrict_to_object:
            refined = torch.where(hard == 0, hard, refined)
        if unbatched:
            refined, marginals = refined[0], marginals[0]
        return (refined, marginals) if return_marginals else refined

    __call__ = refine

    # ---- inputs --------------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(image, labels):
        """Validate and batch the inputs; returns (image, labels, hard labels, was-unbatched)."""
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
            raise ValueError(f"image must be a uint8 RGB tensor, got {getattr(image, 'dtype', type(image))}")
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image must be [3, H, W] or [B, 3, H, W] RGB, got shape {tuple(image.shape)}")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a tensor, got {type(labels)}")
        unbatched = image.dim() == 3
        if unbatched:
            image = image[None]
        soft = labels.is_floating_point()
        expected = (4 if soft else 3) - (1 if unbatched else 0)
        if labels.dim() != expected:
            kind = "probabilities [B, L, H, W]" if soft else "integer labels [B, H, W]"
            raise ValueError(
                f"labels must be {kind} (without B for an unbatched image), got shape {tuple(labels.shape)}"
            )
        if unbatched:
            labels = labels[None]
        if labels.shape[0] != image.shape[0] or labels.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match image shape {tuple(image.shape)} (batch, H, W)"
            )
        if soft:
            if labels.shape[1] < 1:
                raise ValueError("labels (probabilities) must have at least one channel")
            return image, labels, labels.argmax(1), unbatched
        labels = labels.long()
        return image, labels, labels, unbatched

    @staticmethod
    def _check_num_labels(labels, hard, num_labels):
        soft = labels is not hard
        if soft:
            if num_labels is not None and num_labels != labels.shape[1]:
                raise ValueError(f"num_labels ({num_labels}) != number of probability channels ({labels.shape[1]})")
            return labels.shape[1]
        if hard.numel() and int(hard.min()) < IGNORE_LABEL:
            raise ValueError(f"labels must be >= {IGNORE_LABEL} (ignore), got {int(hard.min())}")
        top = int(hard.max()) if hard.numel() else 0
        if num_labels is None:
            return max(top + 1, 1)
        if int(num_labels) != num_labels or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels}")
        if top >= num_labels:
            raise ValueError(f"labels must be < num_labels ({num_labels}), got a label {top}")
        return int(num_labels)

    def _unary(self, labels, hard, num_labels):
        """[B, L, H, W] energies; forbidden labels get a prohibitive energy when restricted to the object."""
        if labels is hard:
            energy = unary_from_labels(hard, num_labels, self.gt_prob, zero_unsure=False)
        else:
            energy = unary_from_probs(labels)
        if self.restrict_to_object and num_labels > 1:
            outside = (hard == 0)[:, None]
            inside = (hard > 0)[:, None]
            is_background = torch.zeros(num_labels, dtype=torch.bool, device=energy.device)
            is_background[0] = True
            is_background = is_background[None, :, None, None]
            forbidden = (outside & ~is_background) | (inside & is_background)
            energy = energy.masked_fill(forbidden, _FORBIDDEN_ENERGY)
        return energy

    # ---- backends ------------------------------------------------------------------------------
    def _pydensecrf_marginals(self, image, energy):
        """The reference: pydensecrf on the CPU, one image at a time."""
        dcrf = _import_pydensecrf()
        batch, num_labels, height, width = energy.shape
        images = image.permute(0, 2, 3, 1).cpu().numpy()
        energies = energy.reshape(batch, num_labels, -1).cpu().numpy()
        out = np.empty((batch, num_labels, height * width), dtype=np.float32)
        for b in range(batch):
            crf = dcrf.DenseCRF2D(width, height, num_labels)
            crf.setUnaryEnergy(np.ascontiguousarray(energies[b], dtype=np.float32))
            if self.spatial_weight > 0:
                crf.addPairwiseGaussian(sxy=self.spatial_sigma, compat=self.spatial_weight)
            if self.bilateral_weight > 0:
                crf.addPairwiseBilateral(
                    sxy=self.bilateral_sigma_xy,
                    srgb=self.bilateral_sigma_rgb,
                    rgbim=np.ascontiguousarray(images[b]),
                    compat=self.bilateral_weight,
                )
            out[b] = np.asarray(crf.inference(self.num_iters), dtype=np.float32)
        return torch.from_numpy(out).view(batch, num_labels, height, width)

    def _torch_marginals(self, image, energy):
        """Our mean-field, chunked over images so that memory stays bounded."""
        device = self.device or energy.device
        batch, _, height, width = energy.shape
        per_chunk = max(1, self.max_chunk_pixels // (height * width))
        chunks, start = [], 0
        while start < batch:
            stop = min(batch, start + per_chunk)
            try:
                chunks.append(self._torch_chunk(image[start:stop].to(device), energy[start:stop].to(device)))
            except _KeyOverflow:
                if stop - start == 1:
                    raise
                per_chunk = max(1, (stop - start) // 2)  # fewer images per lattice, fewer key bits
                continue
            start = stop
        return torch.cat(chunks)

    def _torch_chunk(self, image, energy):
        batch, num_labels, height, width = energy.shape
        pixels = height * width
        # pixel-major and contiguous: the sparse products need row-major dense operands
        neg_unary = -energy.permute(0, 2, 3, 1).reshape(batch * pixels, num_labels).float().contiguous()
        kernels = []  # x -> w · D^-1/2 K D^-1/2 x per kernel, as in pydensecrf (NORMALIZE_SYMMETRIC, Potts)
        if self.spatial_weight > 0:
            lattice, norm = _spatial_lattice(height, width, self.spatial_sigma, image.device)
            kernels.append(_LatticeOperator(lattice, norm, norm * self.spatial_weight, copies=batch))
        if self.bilateral_weight > 0:
            lattice = self._bilateral_lattice(image)
            norm = lattice.symmetric_norm()
            kernels.append(_LatticeOperator(lattice, norm, norm * self.bilateral_weight))
        q = _mean_field(neg_unary, kernels, self.num_iters)
        return q.view(batch, height, width, num_labels).permute(0, 3, 1, 2).contiguous()

    def _bilateral_lattice(self, image):
        """One lattice for the whole chunk over (x/θα, y/θα, rgb/θβ); images are separate groups."""
        batch, _, height, width = image.shape
        grid = _pixel_grid(height, width, image.device) / self.bilateral_sigma_xy
        colour = image.permute(0, 2, 3, 1).reshape(batch, height * width, 3).float() / self.bilateral_sigma_rgb
        features = torch.cat([grid.expand(batch, -1, -1), colour], 2).reshape(-1, 5)
        groups = torch.arange(batch, device=image.device).repeat_interleave(height * width)
        return PermutohedralLattice(features, groups, num_groups=batch)


def _mean_field(neg_unary: torch.Tensor, kernels: List[_LatticeOperator], num_iters: int) -> torch.Tensor:
    """pydensecrf's inference: Q = softmax(-U); repeat Q = softmax(-U + Σ_k w_k K̃_k Q) (Potts).

    The slices accumulate into the logits with addmm (one pass less than slice-then-add).
    """
    q = _softmax_(neg_unary.clone())
    for _ in range(num_iters if kernels else 0):
        logits = torch.addmm(neg_unary, kernels[0].slice, kernels[0].blurred_vertices(q))
        for kernel in kernels[1:]:
            logits.addmm_(kernel.slice, kernel.blurred_vertices(q))
        q = _softmax_(logits)
    return q


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """In-place softmax over dim 1 of ``[N, L]``; ~5x faster than torch.softmax for small L on CPU.

    The per-row max is only subtracted when exp could overflow: our logits are ``-U + messages``
    with every pixel having an allowed label of small U (<= -log(eps) ~ 11.5), so rows never
    underflow to 0/0, and skipping the max saves two of five passes per iteration.
    """
    if float(logits.max()) > 60.0:
        logits -= logits.amax(1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(1, keepdim=True))
