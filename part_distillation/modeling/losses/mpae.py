"""MPAE's losses (Xia et al., ICCV 2025; reference code Jiahao-UTS/MPAE) as pure tensor functions.

Why separate from the head: each term is checked on hand-computable inputs (tests/modeling/test_mpae.py).

Notation: ``A`` [B, K+1, h, w] is the similarity map (a softmax over the K+1 descriptors at every cell),
**channel 0 = background** (the project's canonical layout; the reference code keeps it last), channels
1..K the parts. ``F`` [B, C, h, w] the projected dense features, ``G`` [B, K+1, C] the part descriptors.

* :func:`restoration_loss` L_r = ``pixel_weight · mean|Î − I| + Σ_l w_l mean|φ_l(Î) − φ_l(I)|`` over the
  whole restored image (the code's form; the perceptual sum is the "structural difference penalty").
* :func:`total_variation_loss` L_tv = ``Σ_{k,i,j} |A_{k,i+1,j} − A_{kij}| + |A_{k,i,j+1} − A_{kij}|`` / (B·h·w).
* :func:`entropy_loss` L_ent = mean over cells of the entropy of A. λ_d weighs L_tv + L_ent [ASSUMPTION].
* :func:`presence_loss` L_p = background "enforced presence" + foreground mini-group presence.
* :func:`semantic_consistency_loss` L_s = ArcFace (s, m) between each part's local representation and the
  image's own descriptors (the descriptors are the class centres).
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "arc_margin_logits",
    "semantic_consistency_loss",
    "total_variation_loss",
    "entropy_loss",
    "radial_weight",
    "presence_loss",
    "restoration_loss",
]


def arc_margin_logits(
    cos: torch.Tensor, target: torch.Tensor, scale: float = 20.0, margin: float = 0.5
) -> torch.Tensor:
    """ArcFace logits: ``s·cos θ`` for every class, ``s·cos(θ + m)`` for the target class.

    Args:
        cos: [..., T] cosine similarities in [−1, 1].
        target: [...] long, the target class index.
    Where ``θ + m`` would pass π (``cos θ ≤ cos(π − m)``) the target logit is ``s·(cos θ − sin(π − m)·m)``
    instead, which keeps it monotone in θ (the usual ArcFace fallback, as in the reference code).
    """
    cos = cos.clamp(-1.0, 1.0)
    sin = (1.0 - cos * cos).clamp_min(0.0).sqrt()
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    phi = torch.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    onehot = F.one_hot(target, cos.shape[-1]).to(torch.bool)
    return scale * torch.where(onehot, phi, cos)


def semantic_consistency_loss(
    sim: torch.Tensor,
    feats: torch.Tensor,
    desc: torch.Tensor,
    scale: float = 20.0,
    margin: float = 0.5,
    min_mass: float = 1e-3,
) -> torch.Tensor:
    """L_s (MPAE code): ArcFace of each part's local representation against the image's own descriptors.

    ``r_{b,k} = mean_ij(A_{b,k,ij} · F_{b,:,ij})`` (mean over all h·w cells, not divided by the part's mass),
    ``cos θ_{k,t} = ⟨r̂_{b,k}, Ĝ_{b,t}⟩`` over the K foreground parts; cross-entropy of the ArcFace logits with
    target t = k, multiplied by ``1[Σ_ij A_{b,k,ij} > min_mass]`` (no gradient through the indicator) and
    averaged over B·K (absent parts count as zeros).

    Args:
        sim: A [B, K+1, h, w] (channel 0 background, ignored here).
        feats: F [B, C, h, w].
        desc: G [B, K+1, C].
    """
    parts = sim[:, 1:]
    b, k = parts.shape[:2]
    local = torch.einsum("bkhw,bchw->bkc", parts, feats) / float(parts.shape[-1] * parts.shape[-2])
    cos = F.normalize(local, dim=-1) @ F.normalize(desc[:, 1:], dim=-1).transpose(1, 2)  # [B, K, K]
    target = torch.arange(k, device=sim.device).expand(b, k)
    logits = arc_margin_logits(cos, target, scale, margin)
    ce = F.cross_entropy(logits.reshape(b * k, k), target.reshape(-1), reduction="none").reshape(b, k)
    present = (parts.detach().sum(dim=(2, 3)) > min_mass).to(ce.dtype)
    return (ce * present).mean()


def total_variation_loss(sim: torch.Tensor) -> torch.Tensor:
    """L_tv = Σ over channels and cells of the absolute vertical + horizontal differences, / (B·h·w).

    The normaliser is the current batch's (the reference code caches the first batch's).
    """
    b, _, h, w = sim.shape
    dv = (sim[:, :, 1:, :] - sim[:, :, :-1, :]).abs().sum()
    dh = (sim[:, :, :, 1:] - sim[:, :, :, :-1]).abs().sum()
    return (dv + dh) / float(b * h * w)


def entropy_loss(sim: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_ent = mean over cells of ``−Σ_k A_k log A_k`` (A a distribution over channels)."""
    return -(sim * (sim + eps).log()).sum(dim=1).mean()


def radial_weight(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h, w] weights ``(x² + y²) / max`` for x, y evenly spaced in [−1, 1]: 0 at the centre, 1 at the corners."""
    y = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    x = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    r = y[:, None] ** 2 + x[None, :] ** 2
    return r / r.max().clamp_min(torch.finfo(dtype).tiny)


def presence_loss(sim: torch.Tensor, group_size: int = 8, pool: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_p = (background term, foreground term) (MPAE code); the loss is their sum.

    ``Ā`` = ``pool``×``pool`` average pooling of A (stride 1, no padding; the window shrinks to the map on
    maps smaller than ``pool``).

    * Background ("enforced presence", PDiscoFormer-style): ``BCE(max_ij Ā_bg · r, 1)`` averaged over the
      batch, r = :func:`radial_weight` on the pooled grid, so the background must be strongly present
      somewhere near the border.
    * Foreground, with mini-groups: ``q_{b,k} = max_ij Ā_{b,k}``; the batch is cut into consecutive groups
      of ``group_size`` images (the last one may be smaller) and each group contributes
      ``(1 − mean_k max_{b∈grp} q_{b,k})`` (every part appears in some image of the group) and
      ``(1 − mean_b max_k q_{b,k})`` (every image has a strongly present part), each averaged over groups.
    """
    if int(group_size) < 1:
        raise ValueError(f"group_size={group_size!r} must be ≥ 1")
    h, w = sim.shape[-2:]
    kh, kw = min(int(pool), h), min(int(pool), w)
    pooled = F.avg_pool2d(sim, kernel_size=(kh, kw), stride=1)
    r = radial_weight(pooled.shape[-2], pooled.shape[-1], sim.device, sim.dtype)
    bg_peak = (pooled[:, 0] * r).flatten(1).amax(dim=1).clamp(0.0, 1.0)
    bg = F.binary_cross_entropy(bg_peak, torch.ones_like(bg_peak))
    q = pooled[:, 1:].flatten(2).amax(dim=2)  # [B, K]
    every_part = torch.stack([1.0 - g.amax(dim=0).mean() for g in q.split(int(group_size))]).mean()
    every_image = torch.stack([1.0 - g.amax(dim=1).mean() for g in q.split(int(group_size))]).mean()
    return bg, every_part + every_image


def restoration_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pixel_weight: float = 0.1,
    perceptual: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """L_r = ``pixel_weight · mean|pred − target|`` (+ ``perceptual(pred, target)``, the VGG structural term).

    Both images ImageNet-normalised RGB [B, 3, H, W]; ``perceptual`` is a
    :class:`~part_distillation.modeling.losses.perceptual.PerceptualLoss` (its layer weights carry the ×5 of
    MPAE code) or None (the supp. B.1 ablation "without structural penalty").
    """
    loss = pixel_weight * (pred - target).abs().mean()
    if perceptual is not None:
        loss = loss + perceptual(pred, target)
    return loss
