"""PartFormer's representation transfer and training losses as pure tensor functions (Xia et al., TPAMI 2024).

PartFormer paper §3, Eq. 2–8, and its reference code. Shapes: G part
representations [B, T, C] (T = K+1 tokens, background **last** as in the method), F pixel features
[B, C, h, w], V probability maps [B, T, h, w]. They are free functions so that each term can be checked by
hand in the tests; :class:`~part_distillation.modeling.part_heads.partformer.PartFormerHead` combines them.

* :func:`transfer`: eq. 2–3, ``V_kij = softmax_k(τ·<G_k, F_ij>)`` — the softmax runs over the **token axis**
  (each pixel distributes one unit of probability over the K+1 parts) — and ``S_ij = Σ_k V_kij G_k``.
* :func:`concentration_loss` (L_con, eq. 4–5): spatial variance of each foreground map around its soft centre
  on the [−1, 1) grid.
* :func:`area_loss` (L_area, eq. 6): ``Σ_k 1/(1 + z_k/α)`` with z_k the soft pixel count.
* :func:`arcface_loss` (L_sc, eq. 8): additive-angular-margin softmax of each part representation against the
  K shared learnable vectors.

L_rec (eq. 7) is :class:`~part_distillation.modeling.losses.perceptual.PerceptualLoss`.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["transfer", "grid_coordinates", "concentration_loss", "area_loss", "arcface_logits", "arcface_loss"]


def transfer(g: torch.Tensor, f: torch.Tensor, scale=0.8, similarity: str = "dot"):
    """Representation transfer (eq. 2–3): ``(V [B, T, h, w], S [B, C, h, w])``.

    Args:
        g: [B, T, C] part representations; f: [B, C, h, w] pixel features.
        scale: τ (0.8 for CUB/CelebA) multiplying the similarity; a tensor for a learnable scale.
        similarity: "dot" (raw inner products, the paper and the CUB/CelebA code) or "cosine" (both sides
            L2-normalised, the PartImageNet code, whose learnable scale starts at ln(1/0.07) and is used as-is).
    """
    if similarity == "cosine":
        sim = torch.einsum("btc,bchw->bthw", F.normalize(g, dim=-1), F.normalize(f, dim=1))
    elif similarity == "dot":
        sim = torch.einsum("btc,bchw->bthw", g, f)
    else:
        raise ValueError(f"similarity={similarity!r}: use 'dot' or 'cosine'.")
    v = torch.softmax(scale * sim, dim=1)  # over the K+1 tokens, per pixel
    s = torch.einsum("bthw,btc->bchw", v, g)
    return v, s


def grid_coordinates(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h, w, 2] ``(x, y)`` with x_j = 2j/w − 1 and y_i = 2i/h − 1 (the reference's [−1, 1) grid)."""
    ys = torch.arange(h, device=device, dtype=dtype) * (2.0 / h) - 1
    xs = torch.arange(w, device=device, dtype=dtype) * (2.0 / w) - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def concentration_loss(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_con (eq. 4–5) of the maps ``v`` [B, K, h, w] (pass the **foreground** channels only).

    ``z_k = Σ V_k + ε``, ``c_k = Σ p·V_k / z_k``, ``L = mean_b Σ_k Σ_p ‖p − c_k‖² V_k / z_k``: the spatial
    variance of each part around its soft centre. The centre is not detached (as the reference).
    """
    b, k, h, w = v.shape
    p = grid_coordinates(h, w, v.device, v.dtype).view(1, 1, h * w, 2)
    v = v.flatten(2)  # [B, K, N]
    z = v.sum(-1, keepdim=True) + eps
    weights = v / z
    centre = (weights[..., None] * p).sum(2, keepdim=True)  # [B, K, 1, 2]
    spread = ((p - centre) ** 2).sum(-1)  # [B, K, N]
    return (spread * weights).sum((1, 2)).mean()


def area_loss(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_area (eq. 6): ``mean_b Σ_k 1 / (1 + z_k/α)``, z_k = Σ_ij V_kij (soft cell count, 0 … h·w).

    Which channels count is the caller's choice: the CUB/CelebA code passes the K foreground maps, the paper
    and the PartImageNet code all K+1.
    """
    z = v.flatten(2).sum(-1)
    return (1.0 / (1.0 + z / alpha)).sum(1).mean()


def arcface_logits(g: torch.Tensor, w: torch.Tensor, s: float = 20.0, m: float = 0.5) -> torch.Tensor:
    """ArcFace logits [B, K, K]: row k = part k, column t = vector W_t; ``s·cos(θ_kk + m)`` on the diagonal
    (``s·(cos θ − sin(π − m)·m)`` where ``cos θ ≤ cos(π − m)``, ArcFace's fallback that keeps the target
    logit monotonic once θ + m would pass π), ``s·cos θ_tk`` elsewhere.

    Args:
        g: [B, K, C] foreground part representations; w: [K, C] shared vectors, or [B, K, C] when each sample
            has its own rows (PartImageNet's class-specific W).
    """
    gn = F.normalize(g, dim=-1)
    wn = F.normalize(w, dim=-1)
    cos = torch.einsum("bkc,tc->bkt", gn, wn) if w.dim() == 2 else torch.einsum("bkc,btc->bkt", gn, wn)
    cos = cos.clamp(-1.0, 1.0)
    diag = torch.diagonal(cos, dim1=1, dim2=2)
    sin = (1.0 - diag**2).clamp_min(0).sqrt()
    margin = diag * math.cos(m) - sin * math.sin(m)
    margin = torch.where(diag > math.cos(math.pi - m), margin, diag - math.sin(math.pi - m) * m)
    eye = torch.eye(cos.shape[1], dtype=torch.bool, device=cos.device)
    return s * torch.where(eye, torch.diag_embed(margin), cos)


def arcface_loss(g: torch.Tensor, w: torch.Tensor, s: float = 20.0, m: float = 0.5) -> torch.Tensor:
    """L_sc (eq. 8): cross-entropy of :func:`arcface_logits` with target t = k, mean over B×K."""
    logits = arcface_logits(g, w, s, m)
    b, k, _ = logits.shape
    target = torch.arange(k, device=logits.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * k, k), target)
