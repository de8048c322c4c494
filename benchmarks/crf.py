#!/usr/bin/env python
"""Dense CRF: our torch backend vs the reference's pydensecrf, same inputs, same run.

Setting (PartDistillation supp. §2): one 640×640 RGB image, 5 labels (background + 4 parts),
10 mean-field iterations, its parameters (θγ=3, w2=3; θα=20, θβ=13, w1=10; p_gt=0.7).

The image is synthetic but shaped like the real input: a smooth, noisy background and an elliptic
object split into 4 textured parts (own colour, stripes, pixel noise). The input labels mimic
stage-1a K-means segments: the ground truth sampled on a 16-px grid (blocky boundaries) with a few
blocks relabelled.

Rows: pydensecrf, our torch backend at full resolution ("torch", ``downsample=1``, the stage-1
default) and the approximate ``downsample=F`` ("torch xF", ``--downsample``, default 2: mean-field on
a 2x coarser grid, last update at full resolution; MODEL.PIXEL_GROUPING.CRF.DOWNSAMPLE in stage 1).

Reported per backend: wall time (torch: the first "cold" call, which also builds the image-size-
dependent position lattice, and the median of warm calls), pixel agreement with pydensecrf (all
pixels, and the pixels pydensecrf changed), and accuracy against the ground truth. ``--device
cuda`` runs the torch backend on the GPU (pydensecrf is CPU-only); ``--batch B`` also times one
batched torch call on B different images. Results go to benchmarks/results/crf.json.

CPU threads: pydensecrf is single-threaded, so by default torch gets one thread too (``--threads
1``), which is also how CPU workers run in a pipeline (one process per core, like the reference's
90 pydensecrf processes). ``--threads 0`` keeps torch's default. On an oversubscribed CPU (shared
machine, load above the core count) multi-threaded torch can be >10x slower than single-threaded,
because every small op waits for a descheduled OpenMP thread; the load average is recorded.

    python benchmarks/crf.py [--size 640] [--repeats 5] [--device cpu|cuda] [--batch 1] [--threads 1] [--downsample 2]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.data.pseudo_labels import atomic_write_bytes  # noqa: E402
from part_distillation.clustering.crf import DenseCRFRefiner  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "crf.json")
SEED_PARAMS = dict(
    spatial_sigma=3.0,
    spatial_weight=3.0,
    bilateral_sigma_xy=20.0,
    bilateral_sigma_rgb=13.0,
    bilateral_weight=10.0,
    gt_prob=0.7,
    num_iters=10,
    restrict_to_object=False,  # the reference's CRF: the object boundary may move
)


def synthetic_object(size, num_parts=4, seed=0, block=16, flip_fraction=0.08):
    """(uint8 image [3, S, S], ground-truth labels [S, S], blocky noisy labels [S, S])."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    centre = size / 2 + (torch.rand(2, generator=g) - 0.5) * size * 0.1
    radii = size * (0.28 + 0.1 * torch.rand(2, generator=g))
    inside = ((ys - centre[0]) / radii[0]) ** 2 + ((xs - centre[1]) / radii[1]) ** 2 <= 1.0
    angle = torch.atan2(ys - centre[0], xs - centre[1])
    cuts = torch.sort(torch.rand(num_parts, generator=g) * 2 * np.pi - np.pi).values
    part = (angle[..., None] >= cuts).sum(-1) % num_parts  # angular sectors, wrapping around
    gt = torch.where(inside, part + 1, torch.zeros_like(part))

    # background: low-frequency colour field; parts: own colour + stripes of own frequency/angle
    low = F.interpolate(
        torch.rand(1, 3, 5, 5, generator=g) * 160 + 40, size=(size, size), mode="bicubic", align_corners=False
    )[0]
    image = low.clone()
    for k in range(1, num_parts + 1):
        colour = torch.rand(3, 1, 1, generator=g) * 200 + 28
        theta, freq = torch.rand(2, generator=g) * torch.tensor([np.pi, 0.25]) + torch.tensor([0.0, 0.05])
        stripes = 18 * torch.sin(freq * (xs * torch.cos(theta) + ys * torch.sin(theta)))
        image = torch.where(gt == k, colour + stripes, image)
    image = (image + 6 * torch.randn(image.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)

    cells = (size + block - 1) // block
    coarse = gt[block // 2 :: block, block // 2 :: block][:cells, :cells].clone()
    flip = torch.rand(coarse.shape, generator=g) < flip_fraction
    coarse[flip] = torch.randint(0, num_parts + 1, (int(flip.sum()),), generator=g)
    noisy = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:size, :size]
    return image, gt, noisy


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # the CPU may be shared: read timings with it
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--parts", type=int, default=4, help="part labels; +1 background")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per backend (median reported)")
    parser.add_argument("--device", default="cpu", help="torch backend device (cpu or cuda)")
    parser.add_argument("--batch", type=int, default=1, help="also time one batched torch call on this many images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--downsample", type=int, default=2, help="DenseCRFRefiner(downsample=) of the 'torch xF' row")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("warning: CUDA not available, running the torch backend on the CPU")
        device = torch.device("cpu")
    image, gt, noisy = synthetic_object(args.size, args.parts, seed=args.seed)
    num_labels = args.parts + 1
    torch_crf = DenseCRFRefiner("torch", device=device, **SEED_PARAMS)
    coarse_crf = DenseCRFRefiner("torch", device=device, downsample=args.downsample, **SEED_PARAMS)
    ref_crf = DenseCRFRefiner("pydensecrf", **SEED_PARAMS)

    dev_image, dev_noisy = image.to(device), noisy.to(device)
    ours, cold = timed(lambda: torch_crf.refine(dev_image, dev_noisy, num_labels), device)
    coarse, coarse_cold = timed(lambda: coarse_crf.refine(dev_image, dev_noisy, num_labels), device)
    warm, coarse_warm, ref_times = [], [], []
    for _ in range(max(1, args.repeats)):  # interleaved, so that load changes hit both backends alike
        warm.append(timed(lambda: torch_crf.refine(dev_image, dev_noisy, num_labels), device)[1])
        coarse_warm.append(timed(lambda: coarse_crf.refine(dev_image, dev_noisy, num_labels), device)[1])
        ref, seconds = timed(lambda: ref_crf.refine(image, noisy, num_labels), torch.device("cpu"))
        ref_times.append(seconds)
    ours, coarse = ours.cpu(), coarse.cpu()
    coarse_name = f"torch x{args.downsample}"

    changed = ref != noisy
    rows = {
        "pydensecrf": {"ms": 1000 * statistics.median(ref_times), "ms_min": 1000 * min(ref_times)},
        "torch": {
            "ms": 1000 * statistics.median(warm),
            "ms_min": 1000 * min(warm),
            "ms_cold": 1000 * cold,
        },
    }
    rows[coarse_name] = {
        "ms": 1000 * statistics.median(coarse_warm),
        "ms_min": 1000 * min(coarse_warm),
        "ms_cold": 1000 * coarse_cold,
        "downsample": args.downsample,
    }
    rows["pydensecrf"].update(agreement_with_pydensecrf=1.0, gt_accuracy=float((ref == gt).float().mean()))
    for name, labels in (("torch", ours), (coarse_name, coarse)):
        rows[name].update(
            agreement_with_pydensecrf=float((labels == ref).float().mean()),
            agreement_on_changed_pixels=(
                float((labels[changed] == ref[changed]).float().mean()) if changed.any() else 1.0
            ),
            gt_accuracy=float((labels == gt).float().mean()),
        )
    speedup = rows["pydensecrf"]["ms"] / rows["torch"]["ms"]
    coarse_speedup = rows["pydensecrf"]["ms"] / rows[coarse_name]["ms"]

    batched = None
    if args.batch > 1:
        samples = [synthetic_object(args.size, args.parts, seed=args.seed + i) for i in range(args.batch)]
        images = torch.stack([s[0] for s in samples]).to(device)
        labels = torch.stack([s[2] for s in samples]).to(device)
        torch_crf.refine(images[:1], labels[:1], num_labels)  # warm the position lattice
        _, seconds = timed(lambda: torch_crf.refine(images, labels, num_labels), device)
        batched = {"images": args.batch, "ms_total": 1000 * seconds, "ms_per_image": 1000 * seconds / args.batch}

    print(
        f"dense CRF, {args.size}x{args.size}, {num_labels} labels, {SEED_PARAMS['num_iters']} iterations, "
        f"torch on {device} ({torch.get_num_threads()} CPU threads)"
    )
    print(
        f"input labels: {float((noisy == gt).float().mean()):.4f} GT accuracy; "
        f"pydensecrf changed {float(changed.float().mean()):.4f} of pixels"
    )
    header = f"{'backend':<12}{'ms (median)':>12}{'ms (cold)':>11}{'agree w/ ref':>14}{'on changed':>12}{'GT acc':>9}"
    print(header)
    print("-" * len(header))
    for name in ("pydensecrf", "torch", coarse_name):
        r = rows[name]
        cold_ms = f"{r['ms_cold']:.0f}" if "ms_cold" in r else "-"
        on_changed = f"{r['agreement_on_changed_pixels']:.4f}" if "agreement_on_changed_pixels" in r else "-"
        print(
            f"{name:<12}{r['ms']:>12.0f}{cold_ms:>11}{r['agreement_with_pydensecrf']:>14.4f}"
            f"{on_changed:>12}{r['gt_accuracy']:>9.4f}"
        )
    print(f"speed-up torch vs pydensecrf (warm medians): {speedup:.2f}x; {coarse_name}: {coarse_speedup:.2f}x")
    if batched:
        print(
            f"torch batched: {batched['images']} images in {batched['ms_total']:.0f} ms "
            f"({batched['ms_per_image']:.0f} ms/image)"
        )

    target_met = speedup >= 1.0 and rows["torch"]["agreement_with_pydensecrf"] >= 0.95
    result = {
        "benchmark": "crf",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "setting": {
            "size": args.size,
            "num_labels": num_labels,
            "seed": args.seed,
            "repeats": args.repeats,
            **SEED_PARAMS,
        },
        "input_gt_accuracy": float((noisy == gt).float().mean()),
        "pydensecrf_changed_fraction": float(changed.float().mean()),
        "backends": rows,
        "speedup_torch_vs_pydensecrf": speedup,
        "speedup_downsampled_vs_pydensecrf": coarse_speedup,
        "batched_torch": batched,
        "target": "torch >= 1x pydensecrf speed with >= 95% label agreement",
        "target_met": target_met,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
