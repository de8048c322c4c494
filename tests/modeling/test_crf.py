"""Dense CRF refinement (part_distillation.clustering.crf, .permutohedral): torch backend vs pydensecrf.

Fixtures are generated: an elliptic object split into textured parts on a smooth background, and
"stage-1a-like" input labels (the ground truth sampled on a coarse grid, so boundaries are blocky,
with a few blocks relabelled). Sizes stay <= 96 px so the whole file runs in a few seconds.
"""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from part_distillation.clustering import crf as crf_module, crf_mean_field, permutohedral
from part_distillation.clustering.crf import (
    DenseCRFRefiner,
    PermutohedralLattice,
    unary_from_labels,
    unary_from_probs,
)

try:  # the optional reference backend
    from pydensecrf import densecrf as _densecrf, utils as pydensecrf_utils

    HAVE_PYDENSECRF = _densecrf is not None
except ImportError:
    HAVE_PYDENSECRF = False

needs_pydensecrf = pytest.mark.skipif(not HAVE_PYDENSECRF, reason="pydensecrf (pip install pydensecrf2) not installed")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: these tensors are small, and on a shared CPU every multi-threaded small
    op can wait for a descheduled OpenMP thread (seconds per test). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_fixture(height, width=None, num_parts=3, seed=0, block=8, flip=0.1, noise=6.0):
    """(uint8 image [3, H, W], ground truth [H, W], blocky noisy labels [H, W]); 0 = background."""
    width = width or height
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    cy, cx = height / 2 + (torch.rand(2, generator=g) - 0.5) * 6
    ry, rx = height * (0.3 + 0.08 * torch.rand(1, generator=g)), width * (0.3 + 0.08 * torch.rand(1, generator=g))
    inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
    cuts = torch.sort(torch.rand(num_parts, generator=g) * 2 * math.pi - math.pi).values
    sector = (torch.atan2(ys - cy, xs - cx)[..., None] >= cuts).sum(-1) % num_parts
    gt = torch.where(inside, sector + 1, torch.zeros_like(sector))

    low = torch.rand(1, 3, 4, 4, generator=g) * 120 + 60
    image = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    for k in range(1, num_parts + 1):
        colour = torch.rand(3, 1, 1, generator=g) * 200 + 28
        theta = float(torch.rand(1, generator=g)) * math.pi
        stripes = 15 * torch.sin(0.4 * (xs * math.cos(theta) + ys * math.sin(theta)))
        image = torch.where(gt == k, colour + stripes, image)
    image = (image + noise * torch.randn(image.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)

    cell_y, cell_x = torch.arange(height) // block, torch.arange(width) // block
    centre_y = (torch.arange(int(cell_y[-1]) + 1) * block + block // 2).clamp(max=height - 1)
    centre_x = (torch.arange(int(cell_x[-1]) + 1) * block + block // 2).clamp(max=width - 1)
    coarse = gt[centre_y][:, centre_x]
    flipped = torch.rand(coarse.shape, generator=g) < flip
    coarse[flipped] = torch.randint(0, num_parts + 1, (int(flipped.sum()),), generator=g)
    return image, gt, coarse[cell_y][:, cell_x]


FIXTURES = [  # (height, width, parts, seed)
    (64, 64, 3, 0),
    (80, 80, 4, 1),
    (96, 96, 4, 2),
    (72, 96, 2, 3),
]


# ---- unary ------------------------------------------------------------------------------------------
@needs_pydensecrf
@pytest.mark.parametrize("zero_unsure", [False, True])
@pytest.mark.parametrize("gt_prob", [0.7, 0.5, 0.95])
def test_unary_matches_pydensecrf(zero_unsure, gt_prob):
    labels = torch.randint(0, 6, (13, 17), generator=torch.Generator().manual_seed(0))
    num_labels = 5 if zero_unsure else 6  # pydensecrf does not count label 0 when it is "unsure"
    ours = unary_from_labels(labels, num_labels, gt_prob, zero_unsure=zero_unsure)
    ref = pydensecrf_utils.unary_from_labels(labels.numpy(), num_labels, gt_prob, zero_unsure=zero_unsure)
    assert ours.shape == (num_labels, 13, 17)
    np.testing.assert_allclose(ours.reshape(num_labels, -1).numpy(), ref, rtol=0, atol=1e-6)


def test_unary_formula_and_ignore():
    labels = torch.tensor([[[0, 2, -1]]])
    energy = unary_from_labels(labels, 3, gt_prob=0.7)
    assert energy.shape == (1, 3, 1, 3)
    torch.testing.assert_close(energy[0, :, 0, 0], torch.tensor([-math.log(0.7), -math.log(0.15), -math.log(0.15)]))
    torch.testing.assert_close(energy[0, :, 0, 1], torch.tensor([-math.log(0.15), -math.log(0.15), -math.log(0.7)]))
    torch.testing.assert_close(energy[0, :, 0, 2], torch.full((3,), math.log(3.0)))  # ignore: uniform
    torch.testing.assert_close(
        unary_from_probs(torch.tensor([[[0.2]], [[0.8]]])), -torch.log(torch.tensor([[[0.2]], [[0.8]]]))
    )


# ---- the lattice ------------------------------------------------------------------------------------
def test_lattice_filters_like_a_gaussian_and_keeps_groups_apart():
    grid = permutohedral.pixel_grid(24, 24, "cpu")
    lattice = PermutohedralLattice(grid / 3.0)
    delta = torch.zeros(24 * 24, 1)
    delta[12 * 24 + 12] = 1.0
    response = lattice.filter(delta)[:, 0].view(24, 24)
    peak_y, peak_x = divmod(int(response.argmax()), 24)
    assert abs(peak_y - 12) <= 1 and abs(peak_x - 12) <= 1  # peaked at the source (the lattice is not exact)

    def ring(r):
        return response[12 - r : 13 + r, 12 - r : 13 + r].sum() - response[13 - r : 12 + r, 13 - r : 12 + r].sum()

    per_pixel = [float(ring(r)) / (8 * r) for r in range(1, 10)]
    assert all(a > b for a, b in zip(per_pixel, per_pixel[1:]))  # decaying with distance ...
    assert per_pixel[5] / per_pixel[0] == pytest.approx(math.exp(-(36 - 1) / (2 * 9)), rel=0.5)  # ... roughly as σ = 3
    assert response.min() >= 0

    # two identical copies in different groups: same response, no leak across groups
    both = PermutohedralLattice(torch.cat([grid, grid]) / 3.0, torch.arange(2).repeat_interleave(24 * 24))
    out = both.filter(torch.cat([delta, torch.zeros_like(delta)]))
    torch.testing.assert_close(out[: 24 * 24, 0].view(24, 24), response, rtol=0, atol=1e-6)
    assert out[24 * 24 :].abs().max() == 0


# ---- parity with pydensecrf -------------------------------------------------------------------------
@needs_pydensecrf
@pytest.mark.parametrize("height,width,parts,seed", FIXTURES)
def test_torch_agrees_with_pydensecrf(height, width, parts, seed):
    image, _, noisy = make_fixture(height, width, parts, seed)
    ours, q_ours = DenseCRFRefiner("torch", restrict_to_object=False).refine(
        image, noisy, parts + 1, return_marginals=True
    )
    ref, q_ref = DenseCRFRefiner("pydensecrf", restrict_to_object=False).refine(
        image, noisy, parts + 1, return_marginals=True
    )
    changed = ref != noisy
    assert changed.float().mean() > 0.02  # the CRF did something to compare
    assert (ours == ref).float().mean() >= 0.95
    assert (ours[changed] == ref[changed]).float().mean() >= 0.95
    # same approximation (permutohedral lattice, same scaling and normalisation): near-identical marginals
    assert (q_ours - q_ref).abs().max() < 1e-4


@needs_pydensecrf
def test_soft_probabilities_agree_with_pydensecrf():
    image, _, noisy = make_fixture(64, num_parts=3, seed=5)
    probs = 0.1 + F.one_hot(noisy, 4).permute(2, 0, 1).float()
    probs = probs / probs.sum(0, keepdim=True)
    ours = DenseCRFRefiner("torch", restrict_to_object=False).refine(image, probs)
    ref = DenseCRFRefiner("pydensecrf", restrict_to_object=False).refine(image, probs)
    assert ours.shape == (64, 64)
    assert (ours == ref).float().mean() >= 0.95


@pytest.mark.parametrize("backend", [pytest.param("pydensecrf", marks=needs_pydensecrf), "torch"])
def test_crf_moves_noisy_labels_towards_ground_truth(backend):
    refiner = DenseCRFRefiner(backend, restrict_to_object=False)
    for height, width, parts, seed in FIXTURES[:3]:
        image, gt, noisy = make_fixture(height, width, parts, seed)
        refined = refiner.refine(image, noisy, parts + 1)
        before, after = (noisy == gt).float().mean(), (refined == gt).float().mean()
        assert after > before + 0.01, (height, seed, float(before), float(after))


# ---- batching, determinism, devices -----------------------------------------------------------------
def test_batched_equals_per_image_and_chunks():
    samples = [make_fixture(64, num_parts=3, seed=s) for s in range(3)]
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[2] for s in samples])
    refiner = DenseCRFRefiner("torch", restrict_to_object=False)
    batched, q_batched = refiner.refine(images, labels, 4, return_marginals=True)
    assert batched.shape == (3, 64, 64) and q_batched.shape == (3, 4, 64, 64)
    for i in range(3):
        single, q_single = refiner.refine(images[i], labels[i], 4, return_marginals=True)
        assert torch.equal(batched[i], single)
        torch.testing.assert_close(q_batched[i], q_single, rtol=0, atol=1e-5)
    chunked = DenseCRFRefiner("torch", restrict_to_object=False, max_chunk_pixels=64 * 64).refine(images, labels, 4)
    assert torch.equal(chunked, batched)


def test_key_overflow_splits_the_batch(monkeypatch):
    samples = [make_fixture(48, num_parts=2, seed=s) for s in range(2)]
    images, labels = torch.stack([s[0] for s in samples]), torch.stack([s[2] for s in samples])
    expected = DenseCRFRefiner("torch", restrict_to_object=False).refine(images, labels, 3)
    real_strides = permutohedral._strides

    def strides_without_room_for_groups(radices):  # pretend two images' keys do not fit in int64
        if radices[1] > 1:
            raise permutohedral.KeyOverflow("test")
        return real_strides(radices)

    monkeypatch.setattr(permutohedral, "_strides", strides_without_room_for_groups)
    assert torch.equal(DenseCRFRefiner("torch", restrict_to_object=False).refine(images, labels, 3), expected)


def test_deterministic():
    image, _, noisy = make_fixture(80, num_parts=4, seed=1)
    refiner = DenseCRFRefiner("torch", restrict_to_object=False)
    a, qa = refiner.refine(image, noisy, 5, return_marginals=True)
    b, qb = refiner.refine(image, noisy, 5, return_marginals=True)
    permutohedral._spatial_cache.clear()  # a rebuilt position lattice gives the same result too
    c, qc = refiner.refine(image, noisy, 5, return_marginals=True)
    assert torch.equal(a, b) and torch.equal(qa, qb) and torch.equal(a, c) and torch.equal(qa, qc)


def test_sorted_columns_path_is_equivalent():
    """The cuSPARSE-friendly structure (sorted slice rows) gives the same filter on the CPU."""
    features = torch.rand(700, 5, generator=torch.Generator().manual_seed(0)) * 4
    values = torch.rand(700, 3, generator=torch.Generator().manual_seed(1))
    plain = PermutohedralLattice(features, sorted_columns=False).filter(values)
    torch.testing.assert_close(PermutohedralLattice(features, sorted_columns=True).filter(values), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    image, _, noisy = make_fixture(96, num_parts=4, seed=2)
    cpu = DenseCRFRefiner("torch", restrict_to_object=False).refine(image, noisy, 5)
    gpu = DenseCRFRefiner("torch", restrict_to_object=False, device="cuda").refine(image.cuda(), noisy.cuda(), 5)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() == cpu).float().mean() >= 0.999


# ---- edge cases -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("pydensecrf", marks=needs_pydensecrf), "torch"])
def test_trivial_inputs_pass_through(backend):
    image, gt, _ = make_fixture(48, num_parts=1, seed=4)
    refiner = DenseCRFRefiner(backend, restrict_to_object=False)
    background = torch.zeros(48, 48, dtype=torch.long)
    assert torch.equal(refiner.refine(image, background), background)  # num_labels defaults to 1
    assert torch.equal(refiner.refine(image, background, num_labels=3), background)
    everywhere = torch.ones(48, 48, dtype=torch.long)  # one part covering the canvas
    assert torch.equal(refiner.refine(image, everywhere, 2), everywhere)
    # K = 1 inside the object: nothing to refine once the object boundary is fixed
    restricted = DenseCRFRefiner(backend, restrict_to_object=True)
    assert torch.equal(restricted.refine(image, gt, 2), gt)
    # num_iters = 0 is the unary's argmax, i.e. the input
    assert torch.equal(DenseCRFRefiner(backend, restrict_to_object=False, num_iters=0).refine(image, gt, 2), gt)


@needs_pydensecrf
def test_single_part_object_boundary_moves_like_the_reference():
    """Default (reference) mode: background is a normal label, so even K = 1 snaps the object boundary."""
    image, gt, noisy = make_fixture(64, num_parts=1, seed=6)
    ours = DenseCRFRefiner("torch", restrict_to_object=False).refine(image, noisy, 2)
    ref = DenseCRFRefiner("pydensecrf", restrict_to_object=False).refine(image, noisy, 2)
    assert set(ours.unique().tolist()) <= {0, 1}
    assert (ours == ref).float().mean() >= 0.95
    assert (ours == gt).float().mean() > (noisy == gt).float().mean()


@pytest.mark.parametrize("backend", [pytest.param("pydensecrf", marks=needs_pydensecrf), "torch"])
def test_restrict_to_object_keeps_the_object_mask(backend):
    image, gt, noisy = make_fixture(80, num_parts=4, seed=1)
    refined = DenseCRFRefiner(backend, restrict_to_object=True).refine(image, noisy, 5)
    assert torch.equal(refined == 0, noisy == 0)
    # a tiny object survives (the reference mode may erase it)
    tiny = torch.zeros(80, 80, dtype=torch.long)
    tiny[40:42, 40:42] = 1
    tiny[41, 42] = 2
    kept = DenseCRFRefiner(backend, restrict_to_object=True).refine(image, tiny, 3)
    assert torch.equal(kept > 0, tiny > 0)


@needs_pydensecrf
def test_restricted_backends_agree():
    image, _, noisy = make_fixture(80, num_parts=4, seed=1)
    ours = DenseCRFRefiner("torch", restrict_to_object=True).refine(image, noisy, 5)
    ref = DenseCRFRefiner("pydensecrf", restrict_to_object=True).refine(image, noisy, 5)
    assert (ours == ref).float().mean() >= 0.95


def test_ignore_pixels_stay_ignored():
    image, _, noisy = make_fixture(64, num_parts=3, seed=0)
    labels = noisy.clone()
    labels[:, :8] = -1  # e.g. padding
    refined = DenseCRFRefiner("torch", restrict_to_object=False).refine(image, labels, 4)
    assert torch.equal(refined == -1, labels == -1)
    assert refined.min() >= -1 and refined.max() <= 3


# ---- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,name",
    [
        (lambda im, lb: (im.float(), lb, 4), "image"),
        (lambda im, lb: (im[:2], lb, 4), "image"),
        (lambda im, lb: (im[None, None], lb, 4), "image"),
        (lambda im, lb: (im, lb[:-1], 4), "labels"),
        (lambda im, lb: (im, lb[None, None], 4), "labels"),
        (lambda im, lb: (im, lb.clamp(0, 3), 3), "num_labels"),
        (lambda im, lb: (im, lb - 2, 4), "labels"),
        (lambda im, lb: (im, lb, 0), "num_labels"),
        (lambda im, lb: (im, F.one_hot(lb, 4).permute(2, 0, 1).float(), 3), "num_labels"),
        (lambda im, lb: (im, lb.numpy(), 4), "labels"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(make, name):
    image, _, noisy = make_fixture(32, num_parts=3, seed=0)
    with pytest.raises(ValueError, match=name):
        DenseCRFRefiner("torch", restrict_to_object=False).refine(*make(image, noisy))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"backend": "opencv"}, "backend"),
        ({"gt_prob": 1.0}, "gt_prob"),
        ({"spatial_sigma": 0}, "spatial_sigma"),
        ({"bilateral_sigma_rgb": -1}, "bilateral_sigma_rgb"),
        ({"bilateral_weight": -1}, "bilateral_weight"),
        ({"num_iters": 2.5}, "num_iters"),
        ({"max_chunk_pixels": 0}, "max_chunk_pixels"),
        ({"downsample": 0}, "downsample"),
        ({"downsample": 1.5}, "downsample"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DenseCRFRefiner(**kwargs, restrict_to_object=False)


def test_missing_pydensecrf_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        DenseCRFRefiner("pydensecrf", restrict_to_object=False)
    DenseCRFRefiner("torch", restrict_to_object=False)  # the torch backend does not need it


# ---- speed paths: restricted mean-field, boxes, downsampling ----------------------------------------
def test_restricted_fast_path_equals_the_full_mean_field():
    """Restricted to the object, mean-field runs on the object's pixels and part labels only: same marginals."""
    image, _, noisy = make_fixture(80, num_parts=4, seed=1)
    refiner = DenseCRFRefiner("torch", restrict_to_object=True)
    labels = noisy[None]
    energy = refiner._unary(labels, labels, 5)
    neg_unary, hard = crf_module.pixel_major(-energy), labels.reshape(-1)
    fast = refiner._grid_mean_field([image.float()], neg_unary, hard, 1, restricted=True, messages=False)
    full = refiner._grid_mean_field([image.float()], neg_unary, hard, 1, restricted=False, messages=False)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("restrict", [False, True])
def test_refine_boxes_equals_refining_each_crop(downsample, restrict):
    image, _, noisy = make_fixture(96, num_parts=3, seed=2)
    _, _, other = make_fixture(96, num_parts=3, seed=3)
    labels = torch.stack([noisy, other, noisy])
    boxes = [(4, 71, 10, 90), (20, 96, 0, 51), (0, 0, 0, 0)]  # different sizes, one empty
    refiner = DenseCRFRefiner("torch", restrict_to_object=restrict, downsample=downsample)
    out = refiner.refine_boxes(image, labels, boxes, 4)
    assert out.shape == labels.shape and out.dtype == torch.long
    assert torch.equal(out[2], labels[2])
    for j, (y0, y1, x0, x1) in enumerate(boxes[:2]):
        crop = refiner.refine(image[:, y0:y1, x0:x1], labels[j, y0:y1, x0:x1], 4)
        assert torch.equal(out[j, y0:y1, x0:x1], crop)  # crops are independent groups of one lattice
        outside = torch.ones_like(labels[j], dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(out[j][outside], labels[j][outside])


@needs_pydensecrf
@pytest.mark.parametrize("restrict", [False, True])
def test_downsampled_crf_agrees_with_pydensecrf(restrict):
    """downsample=2: mean-field on a 2x coarser grid, last update at full resolution (>= 95 % agreement)."""
    for height, width, parts, seed in FIXTURES:
        image, _, noisy = make_fixture(height, width, parts, seed)
        ours = DenseCRFRefiner("torch", restrict_to_object=restrict, downsample=2).refine(image, noisy, parts + 1)
        ref = DenseCRFRefiner("pydensecrf", restrict_to_object=restrict).refine(image, noisy, parts + 1)
        region = noisy > 0 if restrict else torch.ones_like(noisy, dtype=torch.bool)
        assert (ours == ref)[region].float().mean() >= 0.95, (height, width, seed)


@pytest.mark.parametrize("downsample", [2, 3])
def test_downsampled_crf_keeps_object_mask_and_ignore_pixels(downsample):
    image, gt, noisy = make_fixture(75, 70, num_parts=4, seed=1)  # sizes not multiples of the factor
    refined = DenseCRFRefiner("torch", restrict_to_object=True, downsample=downsample).refine(image, noisy, 5)
    assert torch.equal(refined == 0, noisy == 0)
    assert (refined == gt).float().mean() > (noisy == gt).float().mean()
    labels = noisy.clone()
    labels[:, :9] = -1
    for restrict in (False, True):
        out = DenseCRFRefiner("torch", restrict_to_object=restrict, downsample=downsample).refine(image, labels, 5)
        assert torch.equal(out == -1, labels == -1) and out.max() <= 4


def test_config_owns_restrict_to_object():
    """MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT is the one default; the class has none of its own."""
    from part_distillation.config import load_cfg

    with pytest.raises(TypeError, match="restrict_to_object"):
        DenseCRFRefiner("torch")
    cfg = load_cfg("")
    assert DenseCRFRefiner.from_config(cfg).restrict_to_object is True
    cfg.MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT = False
    cfg.MODEL.PIXEL_GROUPING.CRF.NUM_ITERS = 3
    refiner = DenseCRFRefiner.from_config(cfg)
    assert refiner.restrict_to_object is False and refiner.num_iters == 3


# ---- crops: position lattices taken from one cached grid (no per-crop build) ------------------------
def test_subset_is_the_lattice_of_the_subset():
    """A sub-lattice filters exactly like a lattice built from the selected points' features alone."""
    g = torch.Generator().manual_seed(0)
    features = torch.cat([permutohedral.pixel_grid(20, 24, "cpu") / 4.0, torch.rand(480, 3, generator=g) * 3], 1)
    points = torch.nonzero(torch.rand(480, generator=g) < 0.6)[:, 0]
    values = torch.rand(points.numel(), 2, generator=g)
    sub = PermutohedralLattice(features).subset(points)
    built = PermutohedralLattice(features[points])
    assert sub.num_vertices == built.num_vertices
    torch.testing.assert_close(sub.filter(values), built.filter(values), rtol=1e-6, atol=1e-6)
    sorted_sub = PermutohedralLattice(features, sorted_columns=True).subset(points)  # the cuSPARSE layout
    torch.testing.assert_close(sorted_sub.filter(values), built.filter(values), rtol=1e-6, atol=1e-6)
    # two subsets concatenated = one lattice with a group per subset
    both = PermutohedralLattice.concat([sub, sub])
    groups = torch.arange(2).repeat_interleave(points.numel())
    grouped = PermutohedralLattice(torch.cat([features[points]] * 2), groups)
    torch.testing.assert_close(
        both.filter(values.repeat(2, 1)), grouped.filter(values.repeat(2, 1)), rtol=1e-6, atol=1e-6
    )


def test_crop_position_lattices_equal_building_them(monkeypatch):
    """Crops' position lattices come from one cached grid that grows with the largest crop: the same
    filter as building each crop's lattice (the previous per-crop path), whatever the cache holds."""
    monkeypatch.setattr(permutohedral, "_CROP_GRID_STEP", 16)
    permutohedral._crop_grids.clear()
    for sizes in ([(20, 30), (9, 14)], [(40, 33)], [(5, 7), (40, 33), (17, 1)]):  # the second one grows the grid
        values = torch.rand(sum(h * w for h, w in sizes), 3)
        built = PermutohedralLattice(*crf_mean_field._grid_features(sizes, 3.0, "cpu"), num_groups=len(sizes))
        cropped = permutohedral.spatial_crops_lattice(sizes, 3.0, "cpu")
        assert cropped.num_vertices == built.num_vertices
        torch.testing.assert_close(cropped.filter(values), built.filter(values), rtol=1e-6, atol=1e-6)
    assert next(iter(permutohedral._crop_grids.values()))[0] == 48
    # beyond the cached grid's size limit the crops' lattice is built as before
    monkeypatch.setattr(permutohedral, "_CROP_GRID_MAX_POINTS", 30 * 30)
    sizes = [(40, 5), (12, 12)]
    values = torch.rand(sum(h * w for h, w in sizes), 2)
    built = PermutohedralLattice(*crf_mean_field._grid_features(sizes, 3.0, "cpu"), num_groups=len(sizes))
    torch.testing.assert_close(
        permutohedral.spatial_crops_lattice(sizes, 3.0, "cpu").filter(values), built.filter(values)
    )


@pytest.mark.parametrize("restrict", [False, True])
def test_refine_boxes_labels_match_the_per_crop_lattice_path(monkeypatch, restrict):
    """Stage-1 labels with the cached-grid position lattices vs a lattice built per crop (the previous path)."""
    permutohedral._crop_grids.clear()
    cases = []
    for size, parts, seed in ((96, 3, 4), (88, 4, 5), (96, 4, 6)):
        image, _, noisy = make_fixture(size, num_parts=parts, seed=seed)
        _, _, other = make_fixture(size, num_parts=parts, seed=seed + 10)
        boxes = [(2, size - 5, 6, size - 1), (10, 70, 0, 61), (30, size, 25, size - 8)]  # overlapping crops
        cases.append((image, torch.stack([noisy, other, noisy]), boxes, parts + 1))
    refiner = DenseCRFRefiner("torch", restrict_to_object=restrict)
    new = [refiner.refine_boxes(*case) for case in cases]

    def built_per_crop(sizes, sigma, device):
        return PermutohedralLattice(*crf_mean_field._grid_features(sizes, sigma, device), num_groups=len(sizes))

    monkeypatch.setattr(crf_mean_field, "spatial_crops_lattice", built_per_crop)
    old = [refiner.refine_boxes(*case) for case in cases]
    agreement = torch.cat([(a == b).reshape(-1) for a, b in zip(new, old)]).float().mean()
    assert agreement >= 0.999
    assert any(not torch.equal(o, case[1]) for o, case in zip(old, cases))  # the CRF did move labels
