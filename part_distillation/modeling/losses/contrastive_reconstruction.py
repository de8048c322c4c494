"""Losses of Choudhury et al. (NeurIPS 2021, "contrastive reconstruction"), as pure tensor functions.

Notation: P = part probabilities [B, K, H, W] (softmax over the K parts, no background channel),
m = the foreground mask [B, H, W] (Ω = its pixels), φ = perceptual features [B, C, H, W] at the same
resolution. With M = P·m and Φ = φ·m:

* :func:`part_consistency_loss`, per image (L_f with φ, L_v with the Lab image):
  ``z_k = Σ_u M_ku Φ_u / (Σ_u M_ku + eps)``, ``loss = Σ_k Σ_u M_ku m_u ‖Φ_u − z_k‖² / (Σ_u m_u + eps)``
  (paper eq. 2/4 normalised by the fg area as the reference code does). The caller reduces over the batch:
  L_f **sums** over images, L_v takes the **mean** (reference code).
* :func:`part_descriptors` and :func:`contrastive_loss` (L_c, paper eq. 3): L2-normalised part descriptors,
  cosine logits / τ, the positive z_k of one other image, negatives z_j (j ≠ k) of every image (code) or
  of the other images only (paper), cross-entropy with the positive at index 0, mean over the B·K anchors.
* :func:`equivariance_loss` (L_e, paper eq. 5): per-pixel KL(T(f(I)) ‖ f(T(I))) in the fg of T(m), normalised
  by its area, mean over the batch; one-directional as the reference code, or symmetric as the paper.
* :func:`rgb_to_lab`: sRGB → CIE-Lab (D65), the colour space of L_v (the reference uses skimage's rgb2lab).
"""

import torch
import torch.nn.functional as F

__all__ = [
    "rgb_to_lab",
    "part_consistency_loss",
    "part_descriptors",
    "sample_positives",
    "contrastive_loss",
    "equivariance_loss",
]

# sRGB (D65) → CIE XYZ, the IEC 61966-2-1 matrix skimage uses.
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white of the 2° D65 observer (skimage's default illuminant).
_WHITE_D65 = (0.95047, 1.0, 1.08883)


@torch.no_grad()
def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels at dim −3 ([..., 3, H, W]) → CIE-Lab (L in [0, 100]), D65 white, no gradient.

    The CIE formulas skimage's ``rgb2lab`` implements: gamma-expand sRGB, linear map to XYZ, divide by the
    white point, then ``f(t) = t^(1/3)`` above (6/29)³ and the linear segment below it.
    """
    x = rgb.float().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device)[:, None, None]
    delta3 = (6.0 / 29.0) ** 3
    f = torch.where(xyz > delta3, xyz.clamp_min(delta3).pow(1.0 / 3.0), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def _masked(probs: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor):
    """(M = P·m [B, K, N], Φ = φ·m [B, C, N], m [B, N]) in float32."""
    if probs.shape[-2:] != feats.shape[-2:] or probs.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"probs {tuple(probs.shape)}, features {tuple(feats.shape)} and mask {tuple(mask.shape)} need one H×W."
        )
    m = mask.flatten(1).float()
    return probs.flatten(2).float() * m[:, None], feats.flatten(2).float() * m[:, None], m


def part_consistency_loss(probs: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5):
    """Per-image ``Σ_k Σ_u M_ku m_u ‖Φ_u − z_k‖² / (Σ_u m_u + eps)`` → [B] (module docstring).

    Computed as ``Σ_k [Σ_u w_ku‖Φ_u‖² − 2⟨z_k, Σ_u w_ku Φ_u⟩ + ‖z_k‖² Σ_u w_ku]`` with w = M·m, the
    same value without the K×C×H×W intermediate of the literal form (800 MB per image at VGG19's 768 × 256²).
    """
    big_m, phi, m = _masked(probs, feats, mask)
    sums = torch.bmm(big_m, phi.transpose(1, 2))  # [B, K, C]
    z = sums / (big_m.sum(-1, keepdim=True) + eps)
    w = big_m * m[:, None]  # = M for a binary mask
    w_sums = torch.bmm(w, phi.transpose(1, 2))
    sq_norms = torch.bmm(w, phi.pow(2).sum(1, keepdim=True).transpose(1, 2)).squeeze(-1)  # [B, K]
    per_part = sq_norms - 2 * (z * w_sums).sum(-1) + z.pow(2).sum(-1) * w.sum(-1)
    return per_part.sum(-1) / (m.sum(-1) + eps)


def part_descriptors(probs: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7):
    """L2-normalised part descriptors ``z_k = Σ_u M_ku Φ_u / (Σ_u M_ku + eps)`` → [B, K, C] (paper eq. 1)."""
    big_m, phi, _ = _masked(probs, feats, mask)
    z = torch.bmm(big_m, phi.transpose(1, 2)) / (big_m.sum(-1, keepdim=True) + eps)
    return F.normalize(z, dim=-1)


def sample_positives(batch_size: int, num_parts: int, generator: torch.Generator = None) -> torch.Tensor:
    """[B, K] long: for anchor (n, k), an image i ≠ n drawn uniformly (the reference code's quirk of
    never drawing the lowest-index other image is not reproduced). Needs B ≥ 2."""
    if batch_size < 2:
        raise ValueError("the contrastive loss needs at least 2 images per batch (a positive from another image).")
    offset = torch.randint(1, batch_size, (batch_size, num_parts), generator=generator)
    return (torch.arange(batch_size)[:, None] + offset) % batch_size


def contrastive_loss(
    z: torch.Tensor, positives: torch.Tensor, temperature: float = 0.19, own_image_negatives: bool = True
) -> torch.Tensor:
    """L_c (paper eq. 3) from normalised descriptors ``z`` [B, K, C] and ``positives`` [B, K] (image indices).

    Anchor (n, k): logit ``z_k^n · z_k^{positives[n, k]} / τ`` first, then the negatives ``z_j^i · z_k^n / τ`` for
    j ≠ k and every image i (``own_image_negatives=True``, the reference code: B·(K−1) negatives) or i ≠ n
    (paper: (B−1)·(K−1)). Cross-entropy with target 0, mean over the B·K anchors (the paper sums; the code's
    mean is what λ_c = 2.3e3 was tuned for). Gradients flow through anchor, positive and negatives.
    """
    b, k, _ = z.shape
    sim = torch.einsum("nkc,ijc->nkij", z, z) / temperature  # [B, K, B, K]: anchor (n, k) vs (i, j)
    n_idx = torch.arange(b, device=z.device)[:, None]
    k_idx = torch.arange(k, device=z.device)[None, :]
    pos = sim[n_idx, k_idx, positives.to(z.device), k_idx]  # [B, K]
    neg = ~torch.eye(k, dtype=torch.bool, device=z.device)[None, :, None, :]  # j ≠ k
    if not own_image_negatives:
        neg = neg & ~torch.eye(b, dtype=torch.bool, device=z.device)[:, None, :, None]  # i ≠ n
    neg = neg.expand_as(sim)
    negatives = sim[neg].view(b, k, -1)
    logits = torch.cat([pos[..., None], negatives], dim=-1).flatten(0, 1)
    return F.cross_entropy(logits, torch.zeros(b * k, dtype=torch.long, device=z.device))


def equivariance_loss(
    pred_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor,
    symmetric: bool = False,
    eps: float = 1e-7,
) -> torch.Tensor:
    """L_e: per-pixel KL between the parts of the warped prediction and those predicted on the warped image.

    Args:
        pred_logits: [B, K, H, W] logits of f(T(I)).
        target_logits: [B, K, H, W] T(f(I)): logits warped **before** the softmax (reference code); detach
            them for the code's form (the gradient then flows through ``pred_logits`` only).
        mask: [B, H, W] T(m), the warped fg mask (soft at its borders).
        symmetric: False: KL(target ‖ pred) (reference code); True: KL(target ‖ pred) + KL(pred ‖ target)
            (paper eq. 5).

    Returns: mean over the batch of ``Σ_u KL_u m_u / (Σ_u m_u + eps)``.
    """
    log_p = F.log_softmax(pred_logits.float(), dim=1)
    log_q = F.log_softmax(target_logits.float(), dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1)
    if symmetric:
        kl = kl + (log_p.exp() * (log_p - log_q)).sum(1)
    m = mask.float()
    return ((kl * m).flatten(1).sum(-1) / (m.flatten(1).sum(-1) + eps)).mean()
