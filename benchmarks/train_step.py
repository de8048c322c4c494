#!/usr/bin/env python
"""Seconds per training iteration: stage-2 ProposalModel vs plain Mask2Former instance segmentation.

All variants share the backbone, decoder size, image size, batch and the synthetic batch itself (random
images, 3-6 random elliptical instances per image); one iteration = forward, losses, backward, the
project's optimizer step (AdamW with full-model gradient clipping). Variants are timed round-robin in
the same run (so machine load affects all alike); warm-up rounds (TorchScript's first calls, allocator)
are excluded and the median over the measured rounds is reported. The order of the variants alternates
between rounds.

* ``mask2former``: our ``Mask2Former`` meta-arch, NUM_CLASSES 5, importance point sampling (M2F recipe);
* ``proposal``: ``ProposalModel`` as stage 2 trains it (1 class, 12544→TRAIN_NUM_POINTS uniform points);
* ``proposal_importance``: ``ProposalModel`` with Mask2Former's importance sampling — the same loss
  computation as the baseline, isolating the meta-architecture's own overhead;
* ``proposal_frozen``: ``proposal`` with the reference's FREEZE_KEYS ["backbone", "encoder"] (informational).

The overhead target (≤ 5 %) is checked for ``proposal`` and ``proposal_importance`` against
``mask2former``. Results go to benchmarks/results/train_step.json (written atomically).

    python benchmarks/train_step.py [--iters 10] [--warmup 3] [--batch 4] [--size 256] [--threads 1]
    python benchmarks/train_step.py --device cuda   # AMP (fp16 autocast + GradScaler) on a GPU
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from tabulate import tabulate  # noqa: E402

from part_distillation.data.pseudo_labels import atomic_write_bytes  # noqa: E402
from part_distillation.engine import load_cfg  # noqa: E402
from part_distillation.engine.optimizer import build_optimizer  # noqa: E402

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results", "train_step.json")
BASE_CONFIG = os.path.join(REPO_ROOT, "configs", "quick_schedules", "Base-Quick-EfficientNetLite0.yaml")
TARGET_OVERHEAD = 0.05
NUM_CLASSES_BASELINE = 5

VARIANTS = {
    "mask2former": [
        "MODEL.META_ARCHITECTURE",
        "Mask2Former",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        str(NUM_CLASSES_BASELINE),
        "MODEL.MASK_FORMER.POINT_SAMPLING",
        "importance",
    ],
    "proposal": [
        "MODEL.META_ARCHITECTURE",
        "ProposalModel",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "1",
        "MODEL.MASK_FORMER.POINT_SAMPLING",
        "uniform",
    ],
    "proposal_importance": [
        "MODEL.META_ARCHITECTURE",
        "ProposalModel",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "1",
        "MODEL.MASK_FORMER.POINT_SAMPLING",
        "importance",
    ],
    "proposal_frozen": [
        "MODEL.META_ARCHITECTURE",
        "ProposalModel",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "1",
        "MODEL.MASK_FORMER.POINT_SAMPLING",
        "uniform",
        "MODEL.MASK_FORMER.FREEZE_KEYS",
        '["backbone", "encoder"]',
    ],
}
COMPARED = ("proposal", "proposal_importance")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--iters", type=int, default=10, help="measured rounds (one iteration of each variant)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds excluded from the statistics")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration")
    parser.add_argument("--size", type=int, default=256, help="square image side (the quick schedule's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (0 = torch's default; 1 is steadier on a shared machine)",
    )
    parser.add_argument("--config", default=BASE_CONFIG, help="base config shared by all variants")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides shared by all variants")
    return parser.parse_args(argv)


def variant_cfg(args, name):
    opts = [
        "DATASETS.TRAIN",
        "()",
        "DATASETS.TEST",
        "()",
        "MODEL.DEVICE",
        args.device,
        "MODEL.MASK_FORMER.FREEZE_KEYS",
        "[]",
        *args.opts,
        *VARIANTS[name],
    ]
    cfg = load_cfg(args.config, opts)
    cfg.SOLVER.AMP.ENABLED = args.device == "cuda"
    return cfg


def synthetic_batch(batch, size, seed):
    """Random images with 3-6 random ellipses each; class ids in [0, NUM_CLASSES_BASELINE)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inputs = []
    for _ in range(batch):
        n = int(rng.integers(3, 7))
        masks = np.zeros((n, size, size), dtype=bool)
        for i in range(n):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(0.05, 0.3, 2) * size
            masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        inst = Instances((size, size))
        inst.gt_masks = torch.from_numpy(masks)
        inst.gt_classes = torch.from_numpy(rng.integers(0, NUM_CLASSES_BASELINE, n))
        image = torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
        inputs.append({"image": image, "instances": inst, "height": size, "width": size})
    return inputs


class Runner:
    """One variant: model, optimizer, and a timed training step."""

    def __init__(self, cfg, device):
        torch.manual_seed(0)
        self.model = build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.device = device
        self.amp = cfg.SOLVER.AMP.ENABLED
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self, inputs) -> float:
        self._sync()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            losses = self.model(inputs)
            loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self._sync()
        return time.perf_counter() - start


def run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    inputs = synthetic_batch(args.batch, args.size, args.seed)
    runners = {name: Runner(variant_cfg(args, name), args.device) for name in args.variants}
    times = {name: [] for name in runners}
    for round_index in range(args.warmup + args.iters):
        order = list(runners.items())
        for name, runner in order if round_index % 2 == 0 else reversed(order):  # no position bias
            seconds = runner.step(inputs)
            if round_index >= args.warmup:
                times[name].append(seconds)
        warm_up = " (warm-up)" if round_index < args.warmup else ""
        print(f"round {round_index + 1}/{args.warmup + args.iters}{warm_up}", file=sys.stderr, flush=True)
    base = statistics.median(times["mask2former"]) if "mask2former" in times else None
    rows, variants = [], {}
    for name, runner in runners.items():
        median = statistics.median(times[name])
        overhead = median / base - 1 if base else None
        variants[name] = {
            "median_s": median,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "times_s": times[name],
            "overhead_vs_mask2former": overhead,
            "trainable_params": runner.trainable,
            "overrides": VARIANTS[name],
        }
        rows.append(
            [
                name,
                f"{median:.4f}",
                f"{min(times[name]):.4f}",
                f"{max(times[name]):.4f}",
                "-" if overhead is None or name == "mask2former" else f"{100 * overhead:+.1f}%",
                f"{runner.trainable / 1e6:.2f}M",
            ]
        )
    print(
        tabulate(rows, headers=["variant", "median s/it", "min", "max", "vs mask2former", "trainable"], tablefmt="pipe")
    )
    checked = {n: variants[n]["overhead_vs_mask2former"] for n in COMPARED if n in variants and base}
    within = all(v <= TARGET_OVERHEAD for v in checked.values())
    print(
        f"target: overhead <= {100 * TARGET_OVERHEAD:.0f}% for {', '.join(checked)}: {'met' if within else 'NOT met'}"
    )
    cfg = variant_cfg(args, args.variants[0])
    result = {
        "benchmark": "train_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "config": os.path.relpath(args.config, REPO_ROOT),
            "opts": args.opts,
            "batch": args.batch,
            "image_size": args.size,
            "amp": args.device == "cuda",
            "warmup_rounds": args.warmup,
            "measured_rounds": args.iters,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "dec_layers": cfg.MODEL.MASK_FORMER.DEC_LAYERS,
            "train_num_points": cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS,
        },
        "variants": variants,
        "target_overhead": TARGET_OVERHEAD,
        "target_met": within,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    print(f"wrote {os.path.relpath(args.out)}")
    return result


if __name__ == "__main__":
    run(parse_args())
