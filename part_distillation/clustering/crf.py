"""Dense-CRF refinement of part segments inside an object (stage 1b; PartDistillation supp. §2).

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
corner index (packed into int64, sorted as 32-bit offsets when they fit), a searchsorted for the
blur neighbours, and no Python loop over pixels or images: a batch is one lattice whose keys carry
the image index. The position-only lattice depends only on the grid size, so whole images share a
cached one, and a crop's is the exact sub-lattice of the top-left corner of one cached grid
(:meth:`PermutohedralLattice.subset`: a crop's pixel positions are that corner's, and a point's
simplex depends on its own features only), so crops build only their bilateral lattice.
Everything is deterministic on the CPU (sorts are stable, MKL reduces each row in order).

CPU threads: the backend issues many medium-sized ops, so on an oversubscribed CPU (a shared
machine with load above its core count) multi-threaded torch can be >10x slower than
``torch.set_num_threads(1)``, as each op waits for a descheduled OpenMP thread. CPU workers should
run one thread each, as the reference runs one pydensecrf process per core; GPUs are unaffected.

Object boundary (``restrict_to_object``, a required argument: its one default is the config key
``MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT``, which documents it; :meth:`DenseCRFRefiner.from_config`): False
behaves like the reference code: the background is an ordinary label, so parts may grow into the background or lose
pixels to it. True: pixels outside the object (label 0) stay 0 and pixels inside choose among the part labels only
(constrained mean-field: forbidden labels get a prohibitive unary in both backends), so only the boundaries
*between* parts move.

Speed paths of the torch backend (stage 1 labels every object of every image):

* Restricted mean-field (exact): with ``restrict_to_object`` only the object's pixels and the part
  labels take part in the iterations (outside pixels send no part message and are one-hot
  background); the lattices still hold every pixel, so the normalisation is unchanged.
* :meth:`DenseCRFRefiner.refine_boxes`: all object crops of an image in one problem (the crops are
  groups of one lattice per kernel), instead of a lattice build and ~500 small ops per crop; the
  crops' position lattices are cut from one cached grid's (exact, see above), not built.
* ``downsample=f`` (approximate, opt-in: MODEL.PIXEL_GROUPING.CRF.DOWNSAMPLE): mean-field on an f
  times coarser grid, then the last update at full resolution from the full-resolution unary and
  the upsampled coarse messages. ~f² fewer lattice points; ~98 % label agreement with pydensecrf at
  f = 2 (benchmarks/crf.py, tests/modeling/test_crf.py), but boundaries lose precision: the
  toyparts pseudo-parts' AR@10 drops by ~1.4 points at 640 px and ~3.5 at 256 px.
"""

import math
from typing import Optional, Union

import numpy as np
import torch

from .crf_mean_field import TorchMeanField, pixel_major, restrict_energy  # the torch backend
from .permutohedral import PermutohedralLattice

__all__ = [
    "DenseCRFRefiner",
    "PermutohedralLattice",
    "unary_from_labels",
    "unary_from_probs",
]

BACKENDS = ("torch", "pydensecrf")
IGNORE_LABEL = -1


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


class DenseCRFRefiner(TorchMeanField):
    """Refine part label maps of objects with a dense CRF (PartDistillation supp. §2); its parameters by default.

    Args:
        backend: ``"torch"`` (batched, any device) or ``"pydensecrf"`` (reference, CPU, per image).
        spatial_sigma, spatial_weight: θγ and w2 of the position-only Gaussian kernel.
        bilateral_sigma_xy, bilateral_sigma_rgb, bilateral_weight: θα, θβ and w1 of the bilateral
            kernel. A weight of 0 drops that kernel.
        gt_prob: p_gt of the unary built from hard labels.
        num_iters: mean-field iterations.
        restrict_to_object: required, no default (config: ``MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT``).
            False = the reference (the object boundary may move); True = label-0 pixels stay 0 and object
            pixels choose among the part labels only.
        device: torch backend only: where to run (default: the labels' device).
        max_chunk_pixels: torch backend only: images are processed in chunks of at most this many
            pixels (at least one image) to bound memory: ~0.7 kB per pixel at peak, so ~1.5 GB at
            the default (3 images of 640², 12 of 320²).
        downsample: torch backend only. 1 (default) = the CRF above at full resolution. f > 1 =
            an approximation ~f² times cheaper: mean-field runs on a grid f times coarser (colours
            and label probabilities averaged over f×f cells, θα and θγ divided by f, a coarse cell
            is inside the object if any of its pixels is), and the last update is made at full
            resolution from the full-resolution unary plus the bilinearly upsampled coarse
            messages, so labels still follow the unary's full-resolution detail. Labels agree with
            pydensecrf on ~98 % of object pixels at f = 2 (stage-1 crops, tests/modeling/test_crf.py,
            benchmarks/crf.py); the toyparts pseudo-parts' AR@10 is ~1.4 points lower at 640 px.
    """

    def __init__(
        self,
        backend: str = "torch",
        *,
        restrict_to_object: bool,
        spatial_sigma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_sigma_xy: float = 20.0,
        bilateral_sigma_rgb: float = 13.0,
        bilateral_weight: float = 10.0,
        gt_prob: float = 0.7,
        num_iters: int = 10,
        device: Optional[Union[str, torch.device]] = None,
        max_chunk_pixels: int = 2**21,
        downsample: int = 1,
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
        if int(downsample) != downsample or downsample < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample}")
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
        self.downsample = int(downsample)

    @classmethod
    def from_config(cls, cfg) -> "DenseCRFRefiner":
        """The refiner of stage 1: every parameter from ``MODEL.PIXEL_GROUPING.CRF`` (``ENABLED`` is the caller's)."""
        crf = cfg.MODEL.PIXEL_GROUPING.CRF
        return cls(
            backend=crf.BACKEND,
            restrict_to_object=crf.RESTRICT_TO_OBJECT,
            spatial_sigma=crf.SPATIAL_SIGMA,
            spatial_weight=crf.SPATIAL_WEIGHT,
            bilateral_sigma_xy=crf.BILATERAL_SIGMA_XY,
            bilateral_sigma_rgb=crf.BILATERAL_SIGMA_RGB,
            bilateral_weight=crf.BILATERAL_WEIGHT,
            gt_prob=crf.GT_PROB,
            num_iters=crf.NUM_ITERS,
            downsample=crf.DOWNSAMPLE,
        )

    def __repr__(self):
        return (
            f"DenseCRFRefiner(backend={self.backend!r}, spatial=({self.spatial_sigma}, {self.spatial_weight}), "
            f"bilateral=({self.bilateral_sigma_xy}, {self.bilateral_sigma_rgb}, {self.bilateral_weight}), "
            f"gt_prob={self.gt_prob}, num_iters={self.num_iters}, restrict_to_object={self.restrict_to_object}, "
            f"downsample={self.downsample})"
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
            marginals = self._torch_marginals(image, energy, hard)
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
            energy = restrict_energy(energy, hard)
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

    @torch.no_grad()
    def refine_boxes(self, image: torch.Tensor, labels: torch.Tensor, boxes, num_labels: Optional[int] = None):
        """Refine the label map of each object inside its own box, all boxes at once.

        Stage 1 refines every object of an image on its bounding box (plus a margin). This is
        :meth:`refine` of each crop, but the torch backend solves all crops as one problem (one
        lattice per kernel with the crops as separate groups), i.e. with far fewer operations.

        Args:
            image: uint8 RGB ``[3, H, W]``.
            labels: integer ``[M, H, W]``, the label map of each object (values as for :meth:`refine`).
            boxes: M ``(y0, y1, x0, x1)`` end-exclusive boxes; an empty box leaves its map as is.
            num_labels: L, as for :meth:`refine`.

        Returns:
            long ``[M, H, W]``: the refined crops, and the input labels outside the boxes.
        """
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be a uint8 RGB [3, H, W] tensor, got {getattr(image, 'shape', type(image))}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
            raise ValueError("labels must be an integer [M, H, W] tensor")
        if labels.shape[-2:] != image.shape[-2:] or len(boxes) != labels.shape[0]:
            raise ValueError(
                f"labels {tuple(labels.shape)} and {len(boxes)} boxes do not match image {tuple(image.shape)}"
            )
        out = labels.long().clone()
        jobs = [(j, tuple(int(v) for v in box)) for j, box in enumerate(boxes) if box[1] > box[0] and box[3] > box[2]]
        if not jobs:
            return out
        crops = [out[j, y0:y1, x0:x1] for j, (y0, y1, x0, x1) in jobs]
        images = [image[:, y0:y1, x0:x1] for _, (y0, y1, x0, x1) in jobs]
        hard = torch.cat([c.reshape(-1) for c in crops])
        num_labels = self._check_num_labels(hard, hard, num_labels)
        if self.backend != "torch" or num_labels == 1:
            refined = [self.refine(im, crop, num_labels).reshape(-1) for im, crop in zip(images, crops)]
        else:
            device = self.device or labels.device
            flat = hard[None, None]  # [1, 1, P]: one row of all crop pixels
            energy = self._unary(flat, flat, num_labels)  # [1, L, 1, P]
            images = [im.to(device) for im in images]
            q = self._torch_grids(images, pixel_major(-energy.to(device)), hard.to(device), crops=True)
            refined = torch.where(hard == IGNORE_LABEL, hard, q.argmax(1).to(hard.device))
            if self.restrict_to_object:
                refined = torch.where(hard == 0, hard, refined)
            refined = refined.split([c.numel() for c in crops])
        for (j, (y0, y1, x0, x1)), r in zip(jobs, refined):
            out[j, y0:y1, x0:x1] = r.view(y1 - y0, x1 - x0)
        return out
