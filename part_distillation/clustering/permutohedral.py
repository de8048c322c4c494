"""Permutohedral lattice in torch: the fast Gaussian filter of the dense CRF's torch backend.

Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics
2010 (the filter pydensecrf uses too). Every point's feature vector (position / sigma, and colour / sigma for
a bilateral kernel) is lifted onto the lattice, splatted onto the d + 1 vertices of its enclosing simplex with
barycentric weights, blurred with a [1/2, 1, 1/2] stencil along each of the d + 1 lattice directions and
sliced back. :class:`PermutohedralLattice` builds the lattice of a batch (keys carry the image index) and
:class:`LatticeOperator` applies one CRF kernel (normalisation and Potts weight folded into sparse splat and
slice matrices). How :class:`~part_distillation.clustering.crf.DenseCRFRefiner` uses it is described in
:mod:`part_distillation.clustering.crf`.
"""

import math
import warnings
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch

__all__ = [
    "PermutohedralLattice",
    "LatticeOperator",
    "KeyOverflow",
    "pixel_grid",
    "spatial_lattice",
    "spatial_crops_lattice",
]

_KEY_BITS = 62  # packed lattice keys must stay below 2**62 so neighbour arithmetic cannot overflow
_SPATIAL_CACHE_SIZE = 8
_CROP_GRID_STEP = 128  # crops take their position lattice from a cached square grid, a multiple of this side
_CROP_GRID_MAX_POINTS = 2**21  # larger crops build their own position lattice (the cached grid would be too big)
# A crop with under 1/_CROP_GRID_MAX_RATIO of the cached grid's points builds its own lattice: cutting scans every
# grid point, building costs more per point (640-px grid, 1 thread, 2026-12-07: 200x200 crop cut 26 ms vs build
# 27 ms; 100x100 cut 20 ms vs 8 ms; 300x300 cut 39 ms vs 59 ms)
_CROP_GRID_MAX_RATIO = 10


class KeyOverflow(ValueError):
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
        raise KeyOverflow(
            f"permutohedral lattice keys need {math.log2(total):.1f} bits (> {_KEY_BITS}): the features span "
            "too many kernel widths; use larger sigmas or a smaller image"
        )
    strides, acc = [], 1
    for radix in reversed(radices):
        strides.append(acc)
        acc *= max(int(radix), 1)
    return strides[::-1]


def _group_by_corner(codes: torch.Tensor, corner_stride: int):
    """Deduplicate ``[N, d+1]`` vertex codes whose leading digit is the corner k.

    Returns the sorted unique codes, the vertex id of every flat entry ``n·(d+1) + k``, the entries
    in vertex order (points ascending inside a vertex: the sorts are stable) and the entries per
    vertex. Codes of corner k all precede those of corner k+1, so d+1 sorts of N codes replace one
    sort of N·(d+1). Inside a corner the codes differ by less than ``corner_stride`` (the leading
    digit's stride); when that fits in int32 each sort runs on the 32-bit offsets (~2x faster on
    the CPU, the same stable order).
    """
    n, dp1 = codes.shape
    narrow = corner_stride < 2**31
    sorted_codes, orders = [], []
    for corner in range(dp1):
        column = codes[:, corner]
        if narrow:
            values, order = torch.sort((column - corner * corner_stride).int(), stable=True)
            values = values.long() + corner * corner_stride
        else:
            values, order = torch.sort(column.contiguous(), stable=True)
        sorted_codes.append(values)
        orders.append(order)
    sorted_codes, orders = torch.cat(sorted_codes), torch.stack(orders)
    starts = torch.ones_like(sorted_codes, dtype=torch.bool)
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
    ids_sorted = torch.cumsum(starts, 0) - 1
    # vertex of each (point, corner): scattered corner by corner into contiguous rows (cache-friendlier)
    vertex_of_entry = torch.empty_like(orders).scatter_(1, orders, ids_sorted.view(dp1, n)).t().reshape(-1)
    entry_order = (orders * dp1 + torch.arange(dp1, device=codes.device)[:, None]).reshape(-1)
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
        vertex_codes, vertex_of_entry, entry_order, entries_per_vertex = _group_by_corner(codes, strides[0])
        self.num_vertices = vertex_codes.numel()
        self.vertex_index = vertex_of_entry.view(self.num_points, dp1)  # [N, d+1] vertex of the k-th corner
        self._neighbours = self._blur_neighbours(vertex_codes, strides)

        # Sparse structure, built once. MKL and cuSPARSE are ~1.6x faster with 32-bit indices.
        self.index_dtype = torch.int32 if self.num_points * dp1 < 2**31 else torch.long
        self._splat_counts = entries_per_vertex  # splat rows = vertices, holding ...
        self._splat_col = (entry_order // dp1).to(self.index_dtype)  # ... these points ...
        self._splat_bary = self.bary.reshape(-1)[entry_order]  # ... with these barycentric weights
        self._set_slice()

    def _set_slice(self):
        """Slice rows = points, d+1 vertices each (column ids ascending per row where cuSPARSE wants it)."""
        slice_vertex = self.vertex_index
        self._slice_order = None
        if self.sorted_columns:
            self._slice_order = torch.argsort(slice_vertex, 1)
            slice_vertex = torch.gather(slice_vertex, 1, self._slice_order)
        self._slice_col = slice_vertex.to(self.index_dtype)

    # ---- sub-lattices --------------------------------------------------------------------------
    def subset(self, points: torch.Tensor) -> "PermutohedralLattice":
        """The lattice of the points ``points`` (ascending long ids) alone, without building it again.

        A point's simplex depends only on its own features, so the lattice built from a subset of
        the points has exactly the vertices those points touch, the blur links between them, and
        the same splat entries in the same order (points ascending inside a vertex). Selecting them
        here costs a few passes over this lattice's entries instead of the sorts of a build; the
        result is the same lattice (vertices may be numbered differently, which changes nothing:
        the blur updates every vertex from the previous round's values). Used for crops of a
        position-only grid: a crop's pixel positions are those of the top-left corner of a larger
        grid, whose lattice is cached (:func:`spatial_lattice`).
        """
        new_id = torch.full((self.num_points,), -1, dtype=torch.long, device=self.bary.device)
        new_id[points] = torch.arange(points.numel(), device=self.bary.device)
        entry_point = new_id[self._splat_col.long()]
        kept = torch.nonzero(entry_point >= 0)[:, 0]
        return self._subset_entries(points, kept, entry_point[kept])

    def _subset_entries(self, points, kept, entry_point) -> "PermutohedralLattice":
        """:meth:`subset` given the splat entries ``kept`` (ascending) of those points and their new point ids."""
        device, dp1 = self.bary.device, self.dim + 1
        num_vertices = self.num_vertices
        # entries per vertex among the kept ones: differences of a running count at the vertex boundaries
        running = torch.zeros(self._splat_col.numel() + 1, dtype=torch.long, device=device)
        running[kept + 1] = 1
        running = torch.cumsum(running, 0)
        bounds = torch.zeros(num_vertices + 1, dtype=torch.long, device=device)
        bounds[1:] = torch.cumsum(self._splat_counts, 0)
        counts = running[bounds[1:]] - running[bounds[:-1]]
        used = counts > 0
        vertex_id = torch.cumsum(used, 0) - 1
        num_used = int(vertex_id[-1]) + 1 if num_vertices else 0
        # blur links: a neighbour outside the subset is missing (id num_used), as in a fresh build
        neighbours = self._neighbours[:, :, used]
        present = neighbours < num_vertices
        present &= used[neighbours.clamp_max(num_vertices - 1)]
        neighbours = torch.where(present, vertex_id[neighbours.clamp_max(num_vertices - 1)], num_used)
        return PermutohedralLattice._assemble(
            dim=self.dim,
            bary=self.bary[points],
            vertex_index=vertex_id[self.vertex_index[points]],
            neighbours=neighbours,
            splat_counts=counts[used],
            splat_col=entry_point,
            splat_bary=self._splat_bary[kept],
            sorted_columns=self.sorted_columns,
            num_vertices=num_used,
            points_dp1=points.numel() * dp1,
        )

    @staticmethod
    def concat(lattices: List["PermutohedralLattice"]) -> "PermutohedralLattice":
        """One lattice of several independent ones (points and vertices one lattice after the other).

        The same filter as a lattice built with one group per input lattice (groups never interact).
        """
        point_offsets, vertex_offsets, total_points, total_vertices = [], [], 0, 0
        for lattice in lattices:
            point_offsets.append(total_points)
            vertex_offsets.append(total_vertices)
            total_points += lattice.num_points
            total_vertices += lattice.num_vertices
        neighbours = [
            torch.where(lat._neighbours == lat.num_vertices, total_vertices, lat._neighbours + offset)
            for lat, offset in zip(lattices, vertex_offsets)
        ]
        return PermutohedralLattice._assemble(
            dim=lattices[0].dim,
            bary=torch.cat([lat.bary for lat in lattices]),
            vertex_index=torch.cat([lat.vertex_index + off for lat, off in zip(lattices, vertex_offsets)]),
            neighbours=torch.cat(neighbours, 2),
            splat_counts=torch.cat([lat._splat_counts for lat in lattices]),
            splat_col=torch.cat([lat._splat_col.long() + off for lat, off in zip(lattices, point_offsets)]),
            splat_bary=torch.cat([lat._splat_bary for lat in lattices]),
            sorted_columns=lattices[0].sorted_columns,
            num_vertices=total_vertices,
            points_dp1=total_points * (lattices[0].dim + 1),
        )

    @staticmethod
    def _assemble(
        *,
        dim,
        bary,
        vertex_index,
        neighbours,
        splat_counts,
        splat_col,
        splat_bary,
        sorted_columns,
        num_vertices,
        points_dp1,
    ) -> "PermutohedralLattice":
        """A lattice from its parts (what ``__init__`` computes), for :meth:`subset` and :meth:`concat`."""
        lattice = PermutohedralLattice.__new__(PermutohedralLattice)
        lattice.num_points, lattice.dim = bary.shape[0], dim
        lattice.sorted_columns = sorted_columns
        lattice.bary, lattice.vertex_index = bary, vertex_index
        lattice.num_vertices = num_vertices
        lattice._neighbours = neighbours
        lattice.index_dtype = torch.int32 if points_dp1 < 2**31 else torch.long
        lattice._splat_counts = splat_counts
        lattice._splat_col = splat_col.to(lattice.index_dtype)
        lattice._splat_bary = splat_bary
        lattice._set_slice()
        return lattice

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
        return LatticeOperator(self)(values.float().contiguous())

    def symmetric_norm(self) -> torch.Tensor:
        """``[N]`` weights ``(K 1)^-1/2``: pydensecrf's NORMALIZE_SYMMETRIC kernel is ``diag(w) K diag(w)``."""
        ones = torch.ones(self.num_points, 1, device=self.bary.device)
        return torch.rsqrt(self.filter(ones)[:, 0] + 1e-20)


class LatticeOperator:
    """``x -> diag(post) K diag(pre) x`` as splat (CSR) -> d+1 blur rounds (gathers) -> slice (CSR).

    The per-point weights are folded into the sparse values once, so an application costs two
    sparse products and the blur. ``copies`` > 1 applies a one-image lattice (the position kernel,
    shared by all images) to each of ``copies`` consecutive blocks of points as a block-diagonal
    operator: a batch as one tall product, since MKL slows down sharply on wide (B·L-column) ones.

    ``active`` (bool over the ``copies · N`` points) restricts the operator to those points: the
    splat reads ``x`` of the active points only (``[A, C]``; the others count as 0) and
    :attr:`slice` writes the active points only; the lattice (hence the blur and ``pre``/``post``)
    still holds every point. With ``full_slice`` :attr:`full_slice` also slices to every point.
    """

    def __init__(
        self,
        lattice: PermutohedralLattice,
        pre=None,
        post=None,
        copies: int = 1,
        active: Optional[torch.Tensor] = None,
        full_slice: bool = False,
    ):
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
        slice_col, slice_values = slice_col.reshape(points, dp1), slice_values.reshape(points, dp1)
        self.full_slice = _slice_csr(slice_col, slice_values, total) if full_slice else None
        columns = points
        if active is not None:
            # keep the splat entries of active points (rows stay in order, points renumbered) ...
            # (entries per row: differences of a running count of kept entries at the row bounds)
            point = splat_col.long()
            keep = active[point]
            bounds = torch.zeros(total + 1, dtype=torch.long, device=device)
            bounds[1:] = torch.cumsum(counts, 0)
            running = torch.zeros(keep.numel() + 1, dtype=torch.long, device=device)
            torch.cumsum(keep, 0, out=running[1:])
            counts = running[bounds[1:]] - running[bounds[:-1]]
            kept = torch.nonzero(keep)[:, 0]
            position = torch.cumsum(active, 0) - 1
            splat_col, splat_values = position[point[kept]].to(index_dtype), splat_values[kept]
            # ... and the slice rows of active points
            slice_col, slice_values = slice_col[active], slice_values[active]
            columns = slice_col.shape[0]
        # one extra, empty vertex row: missing blur neighbours point at it, so it must stay zero
        crow = torch.zeros(total + 2, dtype=index_dtype, device=device)
        crow[1 : total + 1] = torch.cumsum(counts, 0)
        crow[-1] = crow[total]
        self.splat = _csr(crow, splat_col, splat_values, (total + 1, columns))
        self.slice = _slice_csr(slice_col, slice_values, total)
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


def _slice_csr(col: torch.Tensor, values: torch.Tensor, total: int) -> torch.Tensor:
    """Slice matrix ``[P, total + 1]`` from the d+1 vertex ids and weights ``[P, d+1]`` of each point."""
    points, dp1 = col.shape
    crow = torch.arange(0, points * dp1 + 1, dp1, device=col.device, dtype=col.dtype)
    return _csr(crow, col.reshape(-1), values.reshape(-1), (points, total + 1))


def pixel_grid(height: int, width: int, device) -> torch.Tensor:
    """``[H·W, 2]`` (x, y) pixel coordinates in row-major order, pydensecrf's feature order."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


_spatial_cache: "OrderedDict[tuple, Tuple[PermutohedralLattice, torch.Tensor]]" = OrderedDict()


def spatial_lattice(height: int, width: int, sigma: float, device) -> Tuple[PermutohedralLattice, torch.Tensor]:
    """Position-only lattice of one H×W image and its norm; cached: it does not depend on the image."""
    key = (height, width, float(sigma), str(device))
    if key in _spatial_cache:
        _spatial_cache.move_to_end(key)
        return _spatial_cache[key]
    lattice = PermutohedralLattice(pixel_grid(height, width, device) / sigma)
    _spatial_cache[key] = (lattice, lattice.symmetric_norm())
    while len(_spatial_cache) > _SPATIAL_CACHE_SIZE:
        _spatial_cache.popitem(last=False)
    return _spatial_cache[key]


_crop_grids: "OrderedDict[tuple, tuple]" = OrderedDict()  # (side, lattice, y and x of its splat entries)


def spatial_crops_lattice(sizes: List[Tuple[int, int]], sigma: float, device) -> PermutohedralLattice:
    """Position-only lattice of grids of ``sizes`` (one group each, points one grid after the other), unbuilt.

    The pixel positions of an h×w grid are those of the top-left h×w corner of any larger grid, so each
    grid's lattice is a :meth:`~PermutohedralLattice.subset` of the lattice of one cached square grid per
    (sigma, device), which only grows (to the largest size seen, rounded up to a multiple of 128): crops of
    every size share it. Same lattice as ``PermutohedralLattice(features, groups)`` on the grids' own
    positions, without the sorts of a build. Crops longer than ~1408 px (a grid of over 2**21 points), and
    crops with under 1/10 of the cached grid's points, are built directly.
    """
    key, needed = (float(sigma), str(device)), max(max(h, w) for h, w in sizes)
    needed_side = -(-needed // _CROP_GRID_STEP) * _CROP_GRID_STEP
    if needed_side * needed_side > _CROP_GRID_MAX_POINTS:  # e.g. a long thin crop of a large image: build as it is
        features = torch.cat([pixel_grid(h, w, device) for h, w in sizes]) / sigma
        counts = torch.tensor([h * w for h, w in sizes], device=device)
        groups = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
        return PermutohedralLattice(features, groups, num_groups=len(sizes))
    parent = _crop_grids.get(key)
    if parent is None or parent[0] < needed:
        side = needed_side
        lattice = PermutohedralLattice(pixel_grid(side, side, device) / sigma)
        entry_point = lattice._splat_col.long()
        y, x = torch.div(entry_point, side, rounding_mode="floor"), entry_point % side
        _crop_grids[key] = parent = (side, lattice, y.to(torch.int16), x.to(torch.int16))
        while len(_crop_grids) > _SPATIAL_CACHE_SIZE:
            _crop_grids.popitem(last=False)
    side, lattice, entry_y, entry_x = parent
    parts = []
    for height, width in sizes:
        if side * side > _CROP_GRID_MAX_RATIO * height * width:
            # cutting scans the whole cached grid: for a crop much smaller than it (the grid grew for a larger
            # image) building its own lattice is cheaper
            parts.append(PermutohedralLattice(pixel_grid(height, width, device) / sigma))
            continue
        rows = torch.arange(height, device=device)[:, None] * side
        points = (rows + torch.arange(width, device=device)[None]).reshape(-1)
        # the splat entries of the h×w corner, found from their pixel's (y, x) (cheaper than an id map)
        kept = torch.nonzero((entry_y < height) & (entry_x < width))[:, 0]
        entry_point = entry_y[kept].long() * width + entry_x[kept]
        parts.append(lattice._subset_entries(points, kept, entry_point))
    return parts[0] if len(parts) == 1 else PermutohedralLattice.concat(parts)
