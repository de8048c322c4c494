"""The torch backend of :class:`~part_distillation.clustering.crf.DenseCRFRefiner`: batched mean-field.

pydensecrf's inference (Krähenbühl & Koltun, NeurIPS 2011): Q = softmax(-U), then ``num_iters`` times
Q = softmax(-U + Σ_k w_k K̃_k Q) with Potts compatibility, where each kernel K̃_k is a Gaussian filter applied
through the permutohedral lattice (:mod:`.permutohedral`, Adams, Baek & Davis 2010) with pydensecrf's
NORMALIZE_SYMMETRIC normalisation. :class:`TorchMeanField` holds the refiner's torch-backend methods (grids in
bounded chunks, the coarse-grid approximation, the object-restricted iterations); the public API and what each
speed path means are documented in :mod:`part_distillation.clustering.crf`.
"""

from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .permutohedral import (
    KeyOverflow,
    LatticeOperator,
    PermutohedralLattice,
    pixel_grid,
    spatial_crops_lattice,
    spatial_lattice,
)

__all__ = ["TorchMeanField", "FORBIDDEN_ENERGY", "pixel_major", "restrict_energy"]

# Unary energy of a label a pixel may not take (restrict_to_object). exp(-1e4) is 0 in float32 and
# no message (bounded by the kernel weights) can overcome it, yet it stays finite for pydensecrf.
FORBIDDEN_ENERGY = 1.0e4


class TorchMeanField:
    """Torch-backend methods of :class:`~part_distillation.clustering.crf.DenseCRFRefiner` (a mixin: it reads the
    refiner's parameters ``spatial_*``, ``bilateral_*``, ``num_iters``, ``restrict_to_object``, ``device``,
    ``max_chunk_pixels`` and ``downsample``)."""

    def _torch_marginals(self, image, energy, hard):
        """Our mean-field on the images of a batch; a ``[B, L, H, W]`` view of pixel-major marginals."""
        device = self.device or energy.device
        batch, num_labels, height, width = energy.shape
        images = [image[b].to(device) for b in range(batch)]
        q = self._torch_grids(images, pixel_major(-energy.to(device)), hard.to(device).reshape(-1))
        return q.view(batch, height, width, num_labels).permute(0, 3, 1, 2)

    def _torch_grids(
        self, images: List[torch.Tensor], neg_unary: torch.Tensor, hard: torch.Tensor, crops: bool = False
    ) -> torch.Tensor:
        """Pixel-major marginals ``[P, L]`` of independent grids, in chunks of bounded size.

        ``images``: uint8 ``[3, h_i, w_i]``; ``neg_unary`` ``[P, L]`` and ``hard`` ``[P]`` hold the
        pixels of the grids one grid after the other, each row-major. ``crops``: the grids are
        crops of any size (position lattices cut from a cached grid's) and only the labels are needed
        (rows may be unnormalised log-marginals, same argmax, which saves a softmax).
        """
        offsets = np.cumsum([0] + [im.shape[-2] * im.shape[-1] for im in images]).tolist()
        out = torch.empty_like(neg_unary)
        start, limit = 0, len(images)
        while start < len(images):
            stop = start + 1  # grids while the chunk stays under max_chunk_pixels, at least one
            end = min(len(images), start + limit)
            while stop < end and offsets[stop + 1] - offsets[start] <= self.max_chunk_pixels:
                stop += 1
            rows = slice(offsets[start], offsets[stop])
            try:
                out[rows] = self._torch_chunk(images[start:stop], neg_unary[rows], hard[rows], crops)
            except KeyOverflow:
                if stop - start == 1:
                    raise
                limit = max(1, (stop - start) // 2)  # fewer grids per lattice, fewer key bits
                continue
            start, limit = stop, len(images)
        return out

    def _torch_chunk(self, images, neg_unary, hard, crops=False):
        """Pixel-major marginals ``[P, L]`` of the grids ``images`` (see :meth:`_torch_grids`)."""
        num_labels = neg_unary.shape[1]
        # Restricted to the object, a pixel outside it can only be background and one inside it
        # never is: the mean-field of the part labels only involves the object's pixels (the
        # others send no part message and their marginals are exactly one-hot background), so it
        # runs on those pixels and labels only. Same result as the full computation.
        restricted = self.restrict_to_object and num_labels > 1 and bool((hard >= 0).all())
        colours = [im.float() for im in images]
        factor = self.downsample
        if factor == 1 or self.num_iters == 0 or self.spatial_weight == self.bilateral_weight == 0:
            return self._grid_mean_field(colours, neg_unary, hard, 1, restricted, False, not crops)
        low, start = [], 0
        for colour in colours:
            rows = slice(start, start + colour.shape[-2] * colour.shape[-1])
            low.append(self._downsample(colour, neg_unary[rows], hard[rows]))
            start = rows.stop
        low_colours, low_unary, low_hard = zip(*low)
        messages = self._grid_mean_field(
            list(low_colours), torch.cat(low_unary), torch.cat(low_hard), factor, restricted, True, not crops
        )
        # the last update at full resolution: full-resolution unary + upsampled coarse messages
        logits = neg_unary.clone()
        start = low_start = 0
        for colour, low_colour in zip(colours, low_colours):
            (height, width), (low_h, low_w) = colour.shape[-2:], low_colour.shape[-2:]
            grid = messages[low_start : low_start + low_h * low_w].view(1, low_h, low_w, num_labels)
            up = F.interpolate(grid.permute(0, 3, 1, 2), scale_factor=factor, mode="bilinear", align_corners=False)
            logits[start : start + height * width] += pixel_major(up[:, :, :height, :width])
            start, low_start = start + height * width, low_start + low_h * low_w
        return logits if crops else _softmax_(logits)

    def _downsample(self, colour, neg_unary, hard):
        """Colour ``[3, h, w]``, pixel-major negative unary and hard labels of one grid, ``downsample`` times coarser.

        A coarse cell averages the colours and the label probabilities of its pixels (edge cells
        repeat the last row/column); its hard label is the max of its pixels' (any part pixel makes
        it part of the object, else background, else ignore), which drives the object restriction.
        """
        factor = self.downsample
        height, width = colour.shape[-2:]
        num_labels = neg_unary.shape[1]
        low_h, low_w = -(-height // factor), -(-width // factor)
        pad = (0, low_w * factor - width, 0, low_h * factor - height)

        def pool(x, op=F.avg_pool2d):
            return op(F.pad(x, pad, mode="replicate") if any(pad) else x, factor)

        probs = _softmax_(neg_unary.clone()).view(1, height, width, num_labels).permute(0, 3, 1, 2)
        low_energy = pool(probs).clamp_min_(1e-30).log_().neg_()
        low_hard = pool(hard.view(1, 1, height, width).float(), F.max_pool2d)[:, 0].long()
        if self.restrict_to_object and num_labels > 1:
            low_energy = restrict_energy(low_energy, low_hard)
        return pool(colour[None])[0], pixel_major(low_energy.neg_()), low_hard.reshape(-1)

    def _grid_mean_field(self, colours, neg_unary, hard, factor, restricted, messages, cache=True):
        """Mean-field on pixel grids: pixel-major marginals ``[P, L]``, or with ``messages`` the
        Potts messages of the last update at every pixel (see :func:`_mean_field`).

        ``colours``: float ``[3, h_i, w_i]`` per grid; ``factor``: the grids' pixel size in image
        pixels (the position sigmas are divided by it). ``cache``: grids of one size share a cached
        position lattice (images of a dataset); else (crops, whose sizes rarely repeat) each grid's
        position lattice is the exact sub-lattice of one cached grid's (:func:`spatial_crops_lattice`).
        """
        device = neg_unary.device
        sizes = [tuple(c.shape[-2:]) for c in colours]
        active = hard > 0 if restricted else None
        if restricted and not bool(active.any()):
            return torch.zeros_like(neg_unary) if messages else _softmax_(neg_unary.clone())
        kernels = []  # x -> w · D^-1/2 K D^-1/2 x per kernel, as in pydensecrf (NORMALIZE_SYMMETRIC, Potts)
        if self.spatial_weight > 0:
            sigma = self.spatial_sigma / factor
            if len(set(sizes)) == 1 and cache:  # one cached lattice, applied to every grid
                lattice, norm = spatial_lattice(*sizes[0], sigma, device)
                copies = len(sizes)
            else:  # crops: sub-lattices of a cached grid's lattice (the same lattice as a build, no sorts)
                lattice = spatial_crops_lattice(sizes, sigma, device)
                norm, copies = lattice.symmetric_norm(), 1
            kernels.append(LatticeOperator(lattice, norm, norm * self.spatial_weight, copies, active, messages))
        if self.bilateral_weight > 0:
            features, groups = _grid_features(sizes, self.bilateral_sigma_xy / factor, device)
            colour = torch.cat([c.permute(1, 2, 0).reshape(-1, 3) for c in colours]) / self.bilateral_sigma_rgb
            lattice = PermutohedralLattice(torch.cat([features, colour], 1), groups, num_groups=len(sizes))
            norm = lattice.symmetric_norm()
            kernels.append(LatticeOperator(lattice, norm, norm * self.bilateral_weight, 1, active, messages))
        if not restricted:
            return _mean_field(neg_unary, kernels, self.num_iters, messages)
        part = _mean_field(neg_unary[active][:, 1:].contiguous(), kernels, self.num_iters, messages)
        part = torch.cat([torch.zeros_like(part[:, :1]), part], 1)
        if messages:  # every pixel's part messages; background messages matter to no pixel
            return part
        q = torch.zeros_like(neg_unary)
        q[:, 0] = 1.0
        q[active] = part
        return q


def _grid_features(sizes, sigma: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) / sigma of the pixels of grids of ``sizes`` (one after the other) and their grid ids."""
    features = torch.cat([pixel_grid(h, w, device) for h, w in sizes]) / sigma
    counts = torch.tensor([h * w for h, w in sizes], device=device)
    return features, torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def pixel_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, W]`` -> contiguous float ``[B·H·W, L]``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float().contiguous()


def restrict_energy(energy: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forbid the part labels outside the object (``hard == 0``) and background inside it (``hard > 0``)."""
    num_labels = energy.shape[1]
    outside = (hard == 0)[:, None]
    inside = (hard > 0)[:, None]
    is_background = torch.zeros(num_labels, dtype=torch.bool, device=energy.device)
    is_background[0] = True
    is_background = is_background[None, :, None, None]
    forbidden = (outside & ~is_background) | (inside & is_background)
    return energy.masked_fill(forbidden, FORBIDDEN_ENERGY)


def _mean_field(
    neg_unary: torch.Tensor, kernels: List[LatticeOperator], num_iters: int, messages: bool = False
) -> torch.Tensor:
    """pydensecrf's inference: Q = softmax(-U); repeat Q = softmax(-U + Σ_k w_k K̃_k Q) (Potts).

    The slices accumulate into the logits with addmm (one pass less than slice-then-add). With
    ``messages``: the ``Σ_k w_k K̃_k Q`` of the last update (``num_iters >= 1``) instead, sliced to
    every point (the kernels' ``full_slice``), for the caller to finish that update elsewhere.
    """
    q = _softmax_(neg_unary.clone())
    updates = 0 if not kernels else num_iters - 1 if messages else num_iters
    for _ in range(updates):
        logits = torch.addmm(neg_unary, kernels[0].slice, kernels[0].blurred_vertices(q))
        for kernel in kernels[1:]:
            logits.addmm_(kernel.slice, kernel.blurred_vertices(q))
        q = _softmax_(logits)
    if not messages:
        return q
    out = kernels[0].full_slice @ kernels[0].blurred_vertices(q)
    for kernel in kernels[1:]:
        out.addmm_(kernel.full_slice, kernel.blurred_vertices(q))
    return out


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """In-place softmax over dim 1 of ``[N, L]``; ~5x faster than torch.softmax for small L on CPU.

    The per-row max is only subtracted when exp could overflow: our logits are ``-U + messages``
    with every pixel having an allowed label of small U (<= -log(eps) ~ 11.5), so rows never
    underflow to 0/0, and skipping the max saves two of five passes per iteration.
    """
    if float(logits.max()) > 60.0:
        logits -= logits.amax(1, keepdim=True)
    logits.exp_()
    # the row sums as a matrix-vector product: ~3x faster than sum(1) over a few labels
    return logits.div_(logits @ logits.new_ones(logits.shape[1], 1))
