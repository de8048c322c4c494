"""Training-free part-discovery baselines: K-means and Deep Feature Factorization (DFF) on backbone features.

Both are evaluation-only heads (no parameters; run with ``tools/train_net.py --eval-only``) and take the
background from the input's ``fg_mask`` when it has one (``external_background``), as Choudhury et al.
evaluate them (appendix §2).

**Per image, not per dataset.** The reference fits one K-means or one NMF (appendix §2) on the features of
the whole test set (per class on PASCAL-Part), so a cluster id means the same part in every image. A
detectron2 evaluation streams images through the model, so here every image is clustered / factorised on
its own (batched: one tensor problem per batch). Cluster ids of different images are then unrelated; to
make dataset-pooled NMI/ARI meaningful the parts of each image are relabelled in a canonical order
(``MODEL.PART_DISCOVERY.BASELINE_LABEL_ORDER``: "vertical" = by the mean row of their pixels, top first;
"area" = largest first; "none" = the algorithm's order). Numbers therefore differ from the papers' rows.

* :class:`KMeansBaselineHead`: features of ``FEATURE_LEVELS`` bilinearly resized to the padded
  image size / ``KMEANS.GRID_STRIDE`` (the reference's 64×64 for 256-px images is stride 4) and
  concatenated, each pixel vector L2-normalised (``KMEANS.NORMALIZE``), and the foreground cells clustered
  with the project's :func:`~part_distillation.clustering.kmeans.batched_kmeans` (K =
  ``NUM_PARTS``, best of ``N_INIT`` = 5 k-means++ restarts, ``MAX_ITER`` = 100 Lloyd iterations). Every
  grid cell gets its nearest centre; the one-hot map is upsampled bilinearly to the image.
* :class:`DFFHead` (Collins et al. 2018): the ReLU'd (non-negative) features V ∈ R^{N×C} of the
  image's cells (N = h·w; all cells, as the reference: the fg mask only decides where parts are read) are
  factorised V ≈ W H with K factors by :func:`nmf` (Lee–Seung multiplicative updates, |N(0,1)|·sqrt(mean/K)
  init from a fixed seed, ``DFF.MAX_ITER`` = 200, ``DFF.TOL`` = 1e-4 checked every 10 iterations). The
  loadings W (N×K) are the part heatmaps, upsampled bilinearly; part = argmax. Without an fg mask,
  ``DFF.BG_THRESHOLD`` > 0 marks cells whose total loading is below that fraction of the image's largest as
  background (0 = off: every pixel is a part).
"""

import logging
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from ...utils.errors import ConfigError
from ...clustering.kmeans import batched_kmeans, pairwise_distance
from ...structures.masks import masks_to_grid
from .base import DiscoveryBatch, PartHead
from .registry import PART_HEAD_REGISTRY

__all__ = ["KMeansBaselineHead", "DFFHead", "nmf", "canonical_part_order", "LABEL_ORDERS"]

logger = logging.getLogger(__name__)

LABEL_ORDERS = ("vertical", "area", "none")


def canonical_part_order(labels: torch.Tensor, valid: torch.Tensor, grid_hw, k: int, mode: str) -> torch.Tensor:
    """Permutation [B, k]: ``perm[b, j]`` is the cluster that becomes part j + 1 of image b.

    Args:
        labels: [B, h·w] cluster index of every grid cell (anything where ``valid`` is False).
        valid: [B, h·w] bool, the cells that count (the foreground).
        mode: "vertical": ascending mean row (ties: mean column); "area": descending cell count;
            "none": identity. Clusters without valid cells always go last.
    """
    b = labels.shape[0]
    identity = torch.arange(k, device=labels.device).expand(b, k)
    if mode == "none":
        return identity.clone()
    onehot = F.one_hot(labels.clamp(0, k - 1), k).float() * valid[..., None].float()  # [B, N, k]
    count = onehot.sum(1)
    if mode == "area":
        key = -count
    elif mode == "vertical":
        h, w = grid_hw
        rows = torch.arange(h, device=labels.device, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=labels.device, dtype=torch.float32).repeat(h)
        mean_row = (onehot * rows[None, :, None]).sum(1) / count.clamp_min(1)
        mean_col = (onehot * cols[None, :, None]).sum(1) / count.clamp_min(1)
        key = mean_row * (w + 1) + mean_col  # lexicographic (row, column): mean_col < w + 1
    else:
        raise ConfigError(f"MODEL.PART_DISCOVERY.BASELINE_LABEL_ORDER={mode!r}: use one of {LABEL_ORDERS}.")
    key = key.masked_fill(count == 0, float("inf"))
    return torch.sort(key, dim=1, stable=True).indices


class _BaselineHead(PartHead):
    """What the training-free heads share: the feature grid (``<group>.GRID_STRIDE``) and the canonical part order
    (``BASELINE_LABEL_ORDER``) of their per-image results (module docstring)."""

    external_background = True

    def __init__(self, *, num_parts, feature_levels, input_shape, grid_stride: int, label_order: str, group: str):
        super().__init__(num_parts=num_parts, feature_levels=feature_levels, input_shape=input_shape)
        if label_order not in LABEL_ORDERS:
            raise ConfigError(f"MODEL.PART_DISCOVERY.BASELINE_LABEL_ORDER={label_order!r}: use one of {LABEL_ORDERS}.")
        if int(grid_stride) < 0:
            raise ConfigError(f"MODEL.PART_DISCOVERY.{group}.GRID_STRIDE={grid_stride!r} must be ≥ 0.")
        self.grid_stride, self.label_order = int(grid_stride), label_order

    @classmethod
    def baseline_args(cls, cfg, input_shape, group: str) -> dict:
        """The ``from_config`` arguments of every baseline: :meth:`PartHead.common_args`, the grid stride of
        ``MODEL.PART_DISCOVERY.<group>`` and the label order."""
        pd = cfg.MODEL.PART_DISCOVERY
        return {
            **cls.common_args(cfg, input_shape),
            "grid_stride": pd[group].GRID_STRIDE,
            "label_order": pd.BASELINE_LABEL_ORDER,
        }

    def grid_features(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        """:meth:`concat_levels` on the grid of the padded batch / ``grid_stride`` (0: the first level's grid)."""
        if self.grid_stride > 0:
            hp, wp = batch.padded_hw
            return self.concat_levels(features, (math.ceil(hp / self.grid_stride), math.ceil(wp / self.grid_stride)))
        return self.concat_levels(features)

    def ordered_parts(self, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, grid_hw) -> torch.Tensor:
        """Per-cell part scores [B, h·w, k] → part maps [B, k, h, w], channels in :func:`canonical_part_order` of
        the cells' ``labels`` [B, h·w] over the ``valid`` [B, h·w] ones."""
        b, _, k = scores.shape
        perm = canonical_part_order(labels, valid, grid_hw, k, self.label_order)
        maps = scores.transpose(1, 2).reshape(b, k, *grid_hw)
        return maps.gather(1, perm[:, :, None, None].expand_as(maps))


# ------------------------------------------------------------------------------------------------
# K-means
# ------------------------------------------------------------------------------------------------
@PART_HEAD_REGISTRY.register()
class KMeansBaselineHead(_BaselineHead):
    """K-means of each image's foreground features into K parts (per image; module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        num_parts: int,
        feature_levels,
        input_shape: Optional[Dict] = None,
        grid_stride: int = 4,
        normalize: bool = True,
        n_init: int = 5,
        max_iter: int = 100,
        tol: float = 1e-4,
        seed: int = 0,
        label_order: str = "vertical",
    ):
        super().__init__(
            num_parts=num_parts,
            feature_levels=feature_levels,
            input_shape=input_shape,
            grid_stride=grid_stride,
            label_order=label_order,
            group="KMEANS",
        )
        self.normalize = bool(normalize)
        self.kmeans_kwargs = {"n_init": int(n_init), "max_iter": int(max_iter), "tol": float(tol), "seed": int(seed)}

    @classmethod
    def from_config(cls, cfg, input_shape):
        km = cfg.MODEL.PART_DISCOVERY.KMEANS
        return {
            **cls.baseline_args(cfg, input_shape, "KMEANS"),
            "normalize": km.NORMALIZE,
            "n_init": km.N_INIT,
            "max_iter": km.MAX_ITER,
            "tol": km.TOL,
            "seed": km.SEED,
        }

    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        k = self.num_parts
        feats = self.grid_features(features, batch)
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        b, _, h, w = feats.shape
        fg = masks_to_grid(batch.fg_masks, (h, w)).flatten(1)  # [B, N]
        points = feats.flatten(2).transpose(1, 2)  # [B, N, C]
        result = batched_kmeans(points, fg, k, metric="l2", **self.kmeans_kwargs)
        # every cell (also outside the fg, for smooth mask borders) takes its nearest real centre
        dist = pairwise_distance(points, result.centers, "l2")
        placeholder = torch.arange(k, device=dist.device)[None] >= result.num_clusters[:, None]  # [B, k]
        nearest = dist.masked_fill(placeholder[:, None, :], float("inf")).argmin(-1)  # [B, N]
        has_points = (result.num_clusters > 0)[:, None]
        scores = F.one_hot(nearest, k).float() * has_points[..., None].float()  # [B, N, k]
        parts = self.ordered_parts(scores, nearest, fg, (h, w))
        return torch.cat([parts.new_zeros(b, 1, h, w), parts], dim=1)


# ------------------------------------------------------------------------------------------------
# DFF
# ------------------------------------------------------------------------------------------------
def nmf(
    v: torch.Tensor,
    k: int,
    valid: Optional[torch.Tensor] = None,
    max_iter: int = 200,
    tol: float = 1e-4,
    check_every: int = 10,
    seed: int = 0,
    eps: float = 1e-12,
    return_errors: bool = False,
):
    """Batched non-negative matrix factorisation ``V ≈ W H`` (Frobenius norm), Lee–Seung multiplicative updates.

    Args:
        v: [B, N, C] non-negative data (B independent problems).
        k: number of factors.
        valid: [B, N] bool, the rows of each problem (None: all). Other rows are ignored: their V and W rows
            are zero throughout.
        max_iter: iteration cap (DFF code, edocollins/DFF: 200). One iteration updates W, then H (scikit-learn's order).
        tol: a problem stops when its Frobenius error, checked every ``check_every`` iterations, decreased
            by less than ``tol`` × its initial error since the previous check (scikit-learn's rule; DFF code:
            tol 1e-4 every 10 iterations). ``tol = 0`` runs ``max_iter`` iterations.
        seed: initialisation seed. Each problem draws its own ``|N(0, 1)| · sqrt(mean(V) / k)`` W and H from a
            CPU generator seeded with ``seed`` (scikit-learn's "random" init), so a problem gets the same
            result alone or in any batch, on any device.
        eps: the updates are ``W ← W (VHᵀ + eps) / (WHHᵀ + eps)`` (and alike for H): the majorise-minimise
            step of a quadratic bound with curvature raised by ``eps``, hence still monotone, and defined
            where a denominator is 0.
        return_errors: also return the Frobenius errors [iterations + 1, B] after every iteration.

    Returns:
        ``(W [B, N, k], H [B, k, C])`` (and the errors), in v's dtype (float32 for half types).
    """
    if v.dim() != 3:
        raise ValueError(f"nmf expects V [B, N, C], got {tuple(v.shape)}.")
    if (v < 0).any():
        raise ValueError("nmf needs non-negative V (apply a ReLU to the features first).")
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    b, n, c = v.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=v.device) if valid is None else valid.to(v.device, torch.bool)
    v = v.to(dtype) * valid[..., None]
    w = v.new_zeros(b, n, k)
    h = v.new_zeros(b, k, c)
    counts = valid.sum(1).tolist()
    for i in range(b):
        gen = torch.Generator().manual_seed(int(seed))
        mean = float(v[i].sum()) / max(counts[i] * c, 1)
        scale = math.sqrt(mean / k)
        h[i] = (torch.randn(k, c, generator=gen, dtype=dtype).abs() * scale).to(v.device)
        w[i, valid[i]] = (torch.randn(counts[i], k, generator=gen, dtype=dtype).abs() * scale).to(v.device)

    def error():
        return torch.linalg.vector_norm(v - torch.bmm(w, h), dim=(1, 2))

    err0 = error()
    errors = [err0] if return_errors else None
    previous = err0
    active = torch.ones(b, dtype=torch.bool, device=v.device)
    for it in range(1, max_iter + 1):
        hht = torch.bmm(h, h.transpose(1, 2))
        w_new = w * (torch.bmm(v, h.transpose(1, 2)) + eps) / (torch.bmm(w, hht) + eps)
        w = torch.where(active[:, None, None], w_new, w)
        wtw = torch.bmm(w.transpose(1, 2), w)
        h_new = h * (torch.bmm(w.transpose(1, 2), v) + eps) / (torch.bmm(wtw, h) + eps)
        h = torch.where(active[:, None, None], h_new, h)
        check = tol > 0 and it % check_every == 0
        if return_errors or check:
            err = error()
            if return_errors:
                errors.append(err)
            if check:
                active &= (previous - err) / err0.clamp_min(torch.finfo(dtype).tiny) >= tol
                previous = err
                if not active.any():
                    break
    if return_errors:
        return w, h, torch.stack(errors)
    return w, h


@PART_HEAD_REGISTRY.register()
class DFFHead(_BaselineHead):
    """Deep Feature Factorization: NMF of each image's ReLU'd features into K parts (per image)."""

    @configurable
    def __init__(
        self,
        *,
        num_parts: int,
        feature_levels,
        input_shape: Optional[Dict] = None,
        grid_stride: int = 0,
        max_iter: int = 200,
        tol: float = 1e-4,
        check_every: int = 10,
        seed: int = 0,
        bg_threshold: float = 0.0,
        label_order: str = "vertical",
    ):
        super().__init__(
            num_parts=num_parts,
            feature_levels=feature_levels,
            input_shape=input_shape,
            grid_stride=grid_stride,
            label_order=label_order,
            group="DFF",
        )
        if not 0.0 <= float(bg_threshold) < 1.0:
            raise ConfigError(f"MODEL.PART_DISCOVERY.DFF.BG_THRESHOLD={bg_threshold!r} must be in [0, 1).")
        if int(check_every) < 1:
            raise ConfigError(f"MODEL.PART_DISCOVERY.DFF.CHECK_EVERY={check_every!r} must be ≥ 1.")
        self.nmf_kwargs = {
            "max_iter": int(max_iter),
            "tol": float(tol),
            "check_every": int(check_every),
            "seed": int(seed),
        }
        self.bg_threshold = float(bg_threshold)

    @property
    def needs_fg_mask(self) -> bool:
        """With ``BG_THRESHOLD`` > 0 the loadings give the background, so inputs need no ``fg_mask``."""
        return self.bg_threshold <= 0

    @classmethod
    def from_config(cls, cfg, input_shape):
        dff = cfg.MODEL.PART_DISCOVERY.DFF
        return {
            **cls.baseline_args(cfg, input_shape, "DFF"),
            "max_iter": dff.MAX_ITER,
            "tol": dff.TOL,
            "check_every": dff.CHECK_EVERY,
            "seed": dff.SEED,
            "bg_threshold": dff.BG_THRESHOLD,
        }

    def inference(self, features: Dict[str, torch.Tensor], batch: DiscoveryBatch) -> torch.Tensor:
        k = self.num_parts
        feats = F.relu(self.grid_features(features, batch))
        b, _, h, w = feats.shape
        inside = masks_to_grid(batch.valid, (h, w)).flatten(1)  # factorise every cell of the image
        loadings, _ = nmf(feats.flatten(2).transpose(1, 2), k, inside, **self.nmf_kwargs)  # [B, N, k]
        loadings = loadings.float() * inside[..., None]
        assignment = loadings.argmax(-1)
        fg = masks_to_grid(batch.fg_masks, (h, w)).flatten(1)
        # one positive scale per image keeps the argmax of the upsampled heatmaps and bounds them by 1
        peak = loadings.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
        parts = self.ordered_parts(loadings / peak, assignment, fg & inside, (h, w))
        bg = parts.new_zeros(b, 1, h, w)
        if self.bg_threshold > 0:
            total = parts.sum(1, keepdim=True)
            low = total < self.bg_threshold * total.flatten(1).amax(1)[:, None, None, None]
            use = (~batch.fg_given)[:, None, None, None]  # a given fg mask decides the background instead
            bg = (low & use).float()
            parts = parts * (1 - bg)
        return torch.cat([bg, parts], dim=1)
