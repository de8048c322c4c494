"""Image geometry shared by the view mappers and the discovery heads: affine maps in the pixel frame, warps with
``grid_sample``, and random thin-plate-spline warps.

Used by ``data/dataset_mappers/paired_view.py`` (the paired views' random similarity ``A``; PartFormer, Xia et al.
TPAMI 2024 §4.3), ``data/dataset_mappers/keypoints.py`` and ``modeling/part_heads/choudhury21.py`` (the
equivariance warp T of Choudhury et al. 2021: a TPS around a random similarity, reference code).

Coordinate conventions (the same as detectron2's ``Transform.apply_coords``):

* A point is ``(x, y)`` in *continuous pixel coordinates*: pixel ``(row i, col j)`` covers
  ``[j, j+1) × [i, i+1)`` and its centre is ``(j + 0.5, i + 0.5)``; the image spans ``[0, W] × [0, H]``.
  Flips map ``x → W − x`` and resizes scale ``x`` by ``W'/W`` (detectron2's ``HFlipTransform`` and
  ``ResizeTransform``).
* ``transform`` is the 2×3 matrix ``A`` with ``p2 = A @ [x1, y1, 1]``: the view-1 point ``p1`` shows the
  same scene point as the view-2 point ``p2``. Hence ``view2(p2) = view1(A⁻¹ p2)``.
* The warps sample with ``torch.nn.functional.grid_sample(..., align_corners=False)``, which is exactly
  this convention after normalising by the image size (``x_n = 2x/W − 1``): ``±1`` are the outer image
  edges, not the outer pixel centres. Because the normalised frame only depends on the field of view,
  the same ``A`` (in image pixels) warps lower-resolution maps of the same image (logits, features at
  stride 8, ...): pass ``image_size=(H, W)`` of the images to :func:`warp_to_view2`.
* ``cv2.warpAffine`` uses pixel-centre coordinates (index ``j`` ↔ ``x = j + 0.5``); its matrix for
  ``A`` is ``S(−0.5) · A · S(+0.5)`` (see :func:`affine_for_cv2`).
* Rotation sign: a positive angle turns the content counter-clockwise on screen (y axis down), as
  ``cv2.getRotationMatrix2D`` does.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "similarity_matrix",
    "random_similarity",
    "invert_affine",
    "apply_affine",
    "affine_for_cv2",
    "pixel_affine_to_theta",
    "warp_to_view2",
    "warp_to_view1",
    "sample_at",
    "sampling_grid",
    "to_3x3",
    "as_affine",
    "random_warp_grid",
]


def sample_at(x: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """``x`` (float N×C×H×W) read at ``grid`` (N×h×w×2, normalised (x, y)) with ``grid_sample(align_corners=False)``."""
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=False)


# --------------------------------------------------------------------------------------------------
# Affine maps in the pixel frame (the paired views' random similarity A) and warps with grid_sample.
# --------------------------------------------------------------------------------------------------
def similarity_matrix(
    image_hw, scale: float = 1.0, angle_deg: float = 0.0, tx: float = 0.0, ty: float = 0.0
) -> np.ndarray:
    """2×3 ``A``: scale by ``scale`` and rotate by ``angle_deg`` (counter-clockwise on screen) about the
    image centre ``(W/2, H/2)``, then translate by ``(tx, ty)`` pixels. ``p2 = A @ [p1, 1]``."""
    h, w = image_hw
    t = math.radians(angle_deg)
    a, b = scale * math.cos(t), scale * math.sin(t)
    lin = np.array([[a, b], [-b, a]])
    c = np.array([w / 2.0, h / 2.0])
    return np.concatenate([lin, (c + np.array([tx, ty]) - lin @ c)[:, None]], axis=1)


def random_similarity(image_hw, scale: float, rotation: float, translation: float) -> np.ndarray:
    """``similarity_matrix`` with factor ~ U[1−scale, 1+scale], angle ~ U[−rotation, rotation] degrees,
    shifts ~ U[−translation, translation] pixels each (drawn with ``np.random``)."""
    s = 1.0 + np.random.uniform(-scale, scale) if scale > 0 else 1.0
    angle = np.random.uniform(-rotation, rotation) if rotation > 0 else 0.0
    tx, ty = np.random.uniform(-translation, translation, size=2) if translation > 0 else (0.0, 0.0)
    return similarity_matrix(image_hw, s, angle, tx, ty)


def to_3x3(a):
    """(..., 2, 3) → (..., 3, 3) with the homogeneous row; numpy or torch."""
    if isinstance(a, torch.Tensor):
        row = torch.zeros(a.shape[:-2] + (1, 3), dtype=a.dtype, device=a.device)
        row[..., 0, 2] = 1
        return torch.cat([a, row], dim=-2)
    a = np.asarray(a, dtype=np.float64)
    row = np.zeros(a.shape[:-2] + (1, 3))
    row[..., 0, 2] = 1
    return np.concatenate([a, row], axis=-2)


def invert_affine(a):
    """Inverse of a (batch of) 2×3 affine matrix; numpy or torch in, same kind out."""
    if isinstance(a, torch.Tensor):
        return torch.linalg.inv(to_3x3(a.double()))[..., :2, :].to(a.dtype)
    return np.linalg.inv(to_3x3(a))[..., :2, :]


def apply_affine(a, points):
    """Map N×2 points ``(x, y)`` by the 2×3 matrix ``a``: ``a[:, :2] @ p + a[:, 2]``."""
    if isinstance(points, torch.Tensor):
        a = torch.as_tensor(a, dtype=points.dtype, device=points.device)
        return points @ a[:, :2].T + a[:, 2]
    a = np.asarray(a, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ a[:, :2].T + a[:, 2]


def affine_for_cv2(a) -> np.ndarray:
    """The ``cv2.warpAffine`` matrix (pixel-centre coordinates) equivalent to ``a`` (continuous ones)."""
    shift = lambda d: np.array([[1.0, 0.0, d], [0.0, 1.0, d], [0.0, 0.0, 1.0]])  # noqa: E731
    return (shift(-0.5) @ to_3x3(np.asarray(a, dtype=np.float64)) @ shift(0.5))[:2]


def pixel_affine_to_theta(m, image_size) -> torch.Tensor:
    """``affine_grid`` theta (align_corners=False) for the pixel map ``m`` (output pixel → input pixel).

    ``m``: (2, 3) or (N, 2, 3), numpy or torch, in the pixel frame of an image of ``image_size = (H, W)``
    (both views share it). Returns float64 (N, 2, 3): ``theta = Nrm · m · Nrm⁻¹`` with
    ``Nrm(x, y) = (2x/W − 1, 2y/H − 1)``.
    """
    h, w = float(image_size[0]), float(image_size[1])
    m = as_affine(m)
    if m.ndim == 2:
        m = m[None]
    nrm = torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    denrm = torch.tensor([[w / 2.0, 0.0, w / 2.0], [0.0, h / 2.0, h / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return (nrm @ to_3x3(m) @ denrm)[:, :2]


def sampling_grid(m, out_shape, image_size, dtype, device) -> torch.Tensor:
    """``affine_grid`` (align_corners=False) of shape ``out_shape`` (N, C, h, w) for the pixel map ``m`` (output
    pixel → input pixel, in the frame of an image of ``image_size``)."""
    theta = pixel_affine_to_theta(m, image_size)
    if theta.shape[0] == 1 and out_shape[0] > 1:
        theta = theta.expand(out_shape[0], 2, 3)
    return F.affine_grid(theta.to(device=device, dtype=dtype), list(out_shape), align_corners=False)


def _warp(x: torch.Tensor, m, image_size, mode: str, padding_mode: str) -> torch.Tensor:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a floating N×C×H×W tensor, got {tuple(x.shape)} {x.dtype}")
    image_size = tuple(x.shape[-2:]) if image_size is None else tuple(image_size)
    grid = sampling_grid(m, x.shape, image_size, x.dtype, x.device)
    return sample_at(x, grid, mode, padding_mode)


def warp_to_view2(
    x: torch.Tensor, a, image_size=None, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Resample a view-1 map ``x`` (float N×C×h×w) into view 2: ``out(p2) = x(A⁻¹ p2)``.

    ``a``: the mapper's ``transform`` (2×3, or N×2×3 for per-sample transforms), in the pixel frame of
    images of ``image_size = (H, W)`` (default: ``x``'s own size; pass the image size when ``x`` is a
    lower-resolution map of the same field of view). Uses ``grid_sample(align_corners=False)``;
    ``padding_mode`` as grid_sample (``"zeros"``: outside view 1 reads 0).
    """
    return _warp(x, invert_affine(as_affine(a)), image_size, mode, padding_mode)


def warp_to_view1(
    x: torch.Tensor, a, image_size=None, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Inverse of :func:`warp_to_view2`: resample a view-2 map into view 1, ``out(p1) = x(A p1)``."""
    return _warp(x, as_affine(a), image_size, mode, padding_mode)


def as_affine(a):
    """A 2×3 (or N×2×3) affine map as a float64 CPU tensor."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Random warps T of Choudhury et al. 2021 (TPS around a random similarity; reference code)
# ------------------------------------------------------------------------------------------------
def _tps_kernel(d2: torch.Tensor) -> torch.Tensor:
    """U(r) = r² log r² from squared distances (0 at r = 0)."""
    return d2 * torch.log(d2.clamp_min(1e-12))


def _pixel_centres(h: int, w: int, device, dtype) -> torch.Tensor:
    """[H·W, 2] (x, y) of the pixel centres in grid_sample's align_corners=False frame."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * (2.0 / h) - 1
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (2.0 / w) - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def random_warp_grid(
    batch_size: int,
    hw,
    generator: torch.Generator,
    rotation: float = 60.0,
    zoom=(0.7, 2.0),
    translation: float = 0.1,
    tps_sigma: float = 0.01,
    tps_grid: int = 5,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Sampling grids [B, H, W, 2] of random warps T for ``grid_sample(align_corners=False)``: T(x)(u) = x(grid(u)).

    A ``tps_grid``² control grid P on [−1, 1]² is jittered by U(±``tps_sigma``) and mapped by a random similarity
    S (rotation U(±``rotation``°), scale U(1/zoom[1], 1/zoom[0]), shift U(±``translation``)); the grid is the thin-plate
    spline through P → S(P + jitter), which is exactly S when ``tps_sigma`` = 0 (a TPS reproduces affine maps).
    """
    h, w = int(hw[0]), int(hw[1])
    angle = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(rotation)
    lo, hi = 1.0 / float(zoom[1]), 1.0 / float(zoom[0])
    scale = lo + torch.rand(batch_size, generator=generator, dtype=torch.float64) * (hi - lo)
    shift = (torch.rand(batch_size, 2, generator=generator, dtype=torch.float64) * 2 - 1) * translation
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B, 2, 2]
    if tps_sigma <= 0:
        theta = torch.cat([linear, shift[..., None]], dim=-1).to(device=device, dtype=dtype)
        return F.affine_grid(theta, (batch_size, 1, h, w), align_corners=False)
    g = torch.linspace(-1, 1, int(tps_grid), dtype=torch.float64)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    ctrl = torch.stack([gx, gy], -1).reshape(-1, 2)  # [n, 2] target-side control points
    jitter = (torch.rand(batch_size, ctrl.shape[0], 2, generator=generator, dtype=torch.float64) * 2 - 1) * tps_sigma
    source = torch.einsum("bij,bnj->bni", linear, ctrl + jitter) + shift[:, None]  # [B, n, 2]
    n = ctrl.shape[0]
    system = torch.zeros(n + 3, n + 3, dtype=torch.float64)
    system[:n, :n] = _tps_kernel(torch.cdist(ctrl, ctrl).pow(2))
    system[:n, n] = 1
    system[:n, n + 1 :] = ctrl
    system[n, :n] = 1
    system[n + 1 :, :n] = ctrl.T
    rhs = torch.cat([source, source.new_zeros(batch_size, 3, 2)], dim=1)  # [B, n + 3, 2]
    coef = torch.linalg.solve(system, rhs).to(device=device, dtype=dtype)
    pts = _pixel_centres(h, w, device, dtype)
    basis = torch.cat(
        [_tps_kernel(torch.cdist(pts, ctrl.to(device=device, dtype=dtype)).pow(2)), torch.ones_like(pts[:, :1]), pts], 1
    )  # [H·W, n + 3]
    return torch.einsum("pc,bcd->bpd", basis, coef).reshape(batch_size, h, w, 2)
