#!/usr/bin/env python
"""Do the part-discovery heads learn parts? Every method on toyparts, one engine, one evaluator, several seeds.

For each method (per-image K-means and DFF baselines; Choudhury et al. 2021, PartFormer and MPAE trained from
their ``configs/discovery/<method>/toyparts.yaml`` with a CPU schedule, ``--iters``) and each seed, the run
trains through the project's Trainer, keeps the loss curve, and scores the model on ``toyparts_landmarks_val``
with the same evaluators: NMI, ARI, FG-NMI, FG-ARI (×100, pooled over the split, background = label 0) and
landmark NME (% of the image size; one landmark per part class at the centroid of its GT pixels, linear
regressor from the predicted part centroids fitted on ``toyparts_landmarks_train``). With
``--stage4-weights`` a PartDistillation stage-4 checkpoint is scored by the same evaluators.

The reference approach in the same run is the per-image K-means baseline: the JSON has every run (metrics,
seconds, loss curve), the summary (mean, std, min, max over seeds) and each learned head's FG-NMI/FG-ARI
difference to K-means and DFF. Written atomically to ``benchmarks/results/discovery.json`` after every run,
so an interrupted benchmark keeps what it finished. The backbone everywhere is the bundled ImageNet
EfficientNet-Lite0, standing in for VGG19 / DINO / DINOv2.

    OMP_NUM_THREADS=1 python benchmarks/discovery.py [--seeds 0 1 2] [--methods kmeans dff choudhury21 ...]
        [--iters choudhury21=120 partformer=100 mpae=60] [--stage4-weights output/demo/stage4/model_final.pth]
        [--output benchmarks/results/discovery.json] [--workdir output/bench_discovery] [--resume JSON ...]
        [--eval-every N] [KEY VALUE ...]
    python benchmarks/discovery.py --grad-norms 2 ...              # per-term loss gradient norms (init, trained)
    python benchmarks/discovery.py --methods partformer --eval-weights a.pth b.pth   # score checkpoints
"""

import argparse
import datetime
import json
import logging
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.utils.logger import setup_logger  # noqa: E402

from part_distillation.data.pseudo_labels import atomic_write_bytes  # noqa: E402
from part_distillation.engine.discovery_benchmark import (  # noqa: E402
    CPU_SCHEDULES,
    METHODS,
    format_summary,
    run_discovery_method,
    summarize_runs,
)
from part_distillation.utils.compat import quiet_upstream_warnings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "discovery.json")
logger = logging.getLogger("part_distillation.benchmarks.discovery")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--iters", nargs="*", default=[], help="METHOD=N overrides of the CPU schedule")
    p.add_argument("--stage4-weights", default="", help="a PartDistillation stage-4 checkpoint to score as well")
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--workdir", default="output/bench_discovery", help="checkpoints and logs of the runs")
    p.add_argument("--tag", default="", help="a label stored in the JSON (e.g. an ablation's name)")
    p.add_argument(
        "--resume",
        nargs="*",
        default=[],
        help="earlier JSONs of this benchmark: keep their runs, skip their (method, seed)",
    )
    p.add_argument(
        "--eval-weights",
        nargs="*",
        default=[],
        metavar="PATH",
        help="instead of the benchmark: score these checkpoints of the one method in --methods (seed = the "
        "first of --seeds)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="also score the learned heads' checkpoints every N iterations (a metric curve per run)",
    )
    p.add_argument(
        "--grad-norms",
        type=int,
        default=0,
        metavar="N",
        help="instead of the benchmark: each learned head's loss values and per-term gradient norms on N training "
        "batches, at initialisation and with the run's model_final.pth from --workdir (seed = the first of --seeds)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every method (KEY VALUE ...)")
    return p.parse_args(argv)


def _schedule(items):
    sched = dict(CPU_SCHEDULES)
    for item in items:
        name, _, n = item.partition("=")
        if name not in METHODS or not n.isdigit():
            raise SystemExit(f"--iters {item!r}: use METHOD=N with METHOD one of {list(METHODS)}")
        sched[name] = int(n)
    return sched


def _stage4_run(weights, workdir, opts):
    """PartDistillation's part maps scored by the same evaluators (its own config's test mapper; the objects and
    their classes come from the landmark view's ``object_annotations``). Its training ran elsewhere (e.g. ``make
    demo``): iterations come from the checkpoint, seconds and loss curve from the ``metrics.json`` next to it."""
    import time

    from detectron2.checkpoint import DetectionCheckpointer

    from part_distillation.engine import Trainer
    from part_distillation.engine.discovery_benchmark import (
        evaluate_discovery_model,
        method_cfg,
        read_loss_curve,
        read_train_seconds,
    )

    cfg = method_cfg(
        os.path.join(REPO, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml"),
        os.path.join(workdir, "partdistillation"),
        0,
        0,
        ["MODEL.WEIGHTS", weights, *opts],
    )
    model = Trainer.build_model(cfg)
    extra = DetectionCheckpointer(model).load(weights)
    start = time.perf_counter()
    metrics = evaluate_discovery_model(cfg, model)
    eval_seconds = time.perf_counter() - start
    train_dir = os.path.dirname(os.path.abspath(weights))
    iterations = int(extra["iteration"]) + 1 if "iteration" in extra else cfg.SOLVER.MAX_ITER
    return {
        "method": "partdistillation",
        "seed": 0,
        "metrics": metrics,
        "iterations": iterations,
        "seconds": read_train_seconds(train_dir),
        "eval_seconds": eval_seconds,
        "loss_curve": read_loss_curve(train_dir),
        "weights": os.path.abspath(weights),
        "seconds_source": f"estimated from {os.path.join(train_dir, 'metrics.json')} (median iteration time × "
        "iterations; 0 when absent), not timed by this benchmark",
    }


def _grad_norms(args, sched):
    """{method: {"init": {...}, "trained": {...}}} of :func:`loss_gradient_norms`."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.env import seed_all_rng

    from part_distillation.engine import Trainer
    from part_distillation.engine.discovery_benchmark import loss_gradient_norms, method_cfg

    out = {}
    seed = args.seeds[0]
    for name in args.methods:
        config, trained = METHODS[name]
        if not trained:
            continue
        run_dir = os.path.join(args.workdir, f"{name}_s{seed}")
        cfg = method_cfg(
            os.path.join(REPO, "configs", config),
            os.path.join(args.workdir, f"{name}_gradnorms"),
            seed,
            sched.get(name, 0),
            args.opts,
        )
        out[name] = {}
        for stage, weights in (("init", ""), ("trained", os.path.join(run_dir, "model_final.pth"))):
            if weights and not os.path.isfile(weights):
                logger.warning("%s: no %s, skipping the trained model", name, weights)
                continue
            seed_all_rng(seed)
            model = Trainer.build_model(cfg)
            if weights:
                DetectionCheckpointer(model).load(weights)
            out[name][stage] = loss_gradient_norms(cfg, model, args.grad_norms)
            logger.info("%s (%s): %s", name, stage, out[name][stage])
    return out


def _eval_weights(args, sched):
    """[{"weights", "metrics"}] of ``--eval-weights`` (the same evaluators as the benchmark)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from part_distillation.engine import Trainer
    from part_distillation.engine.discovery_benchmark import evaluate_discovery_model, method_cfg

    name = args.methods[0]
    cfg = method_cfg(
        os.path.join(REPO, "configs", METHODS[name][0]),
        os.path.join(args.workdir, f"{name}_scored"),
        args.seeds[0],
        sched.get(name, 0),
        args.opts,
    )
    model = Trainer.build_model(cfg)
    out = []
    for path in args.eval_weights:
        DetectionCheckpointer(model).load(path)
        out.append({"weights": path, "metrics": evaluate_discovery_model(cfg, model)})
        logger.info("%s: %s", path, out[-1]["metrics"])
    return out


def _payload(args, sched, runs):
    summary = summarize_runs(runs)
    margins = {}
    for name, e in summary.items():
        if METHODS.get(name, (None, False))[1]:
            margins[name] = {
                f"{m} vs {base}": e[m]["mean"] - summary[base][m]["mean"]
                for base in ("kmeans", "dff")
                if base in summary
                for m in ("FG-NMI", "FG-ARI")
            }
    return {
        "benchmark": "discovery",
        "tag": args.tag,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "backbone": "EfficientNet-Lite0 (ImageNet, bundled), standing in for VGG19 / DINO / DINOv2",
        "dataset": "toyparts_landmarks_val (fit: toyparts_landmarks_train)",
        "schedules": sched,
        "seeds": args.seeds,
        "opts": args.opts,
        "summary": summary,
        "learned_minus_baseline": margins,
        "runs": runs,
    }


def main(argv=None):
    args = parse_args(argv)
    quiet_upstream_warnings()
    setup_logger()
    setup_logger(name="part_distillation")
    sched = _schedule(args.iters)
    if args.grad_norms:
        payload = {
            "benchmark": "discovery_grad_norms",
            "tag": args.tag,
            "batches": args.grad_norms,
            "seed": args.seeds[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "norms": _grad_norms(args, sched),
        }
        atomic_write_bytes(args.output, json.dumps(payload, indent=1).encode())
        print(json.dumps(payload["norms"], indent=1))
        return payload
    if args.eval_weights:
        payload = {
            "benchmark": "discovery_checkpoints",
            "tag": args.tag,
            "method": args.methods[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "scores": _eval_weights(args, sched),
        }
        atomic_write_bytes(args.output, json.dumps(payload, indent=1).encode())
        print(json.dumps(payload["scores"], indent=1))
        return payload
    runs = []
    for path in args.resume:
        with open(path) as f:
            kept = [r for r in json.load(f)["runs"] if r["method"] in args.methods and r["seed"] in args.seeds]
        seen = {(r["method"], r["seed"]) for r in runs}
        runs += [r for r in kept if (r["method"], r["seed"]) not in seen]
        logger.info("Resuming with %d runs from %s", len(kept), path)
    done = {(r["method"], r["seed"]) for r in runs}
    # seed-major: an interrupted benchmark has every method for its first seeds
    jobs = [(m, s) for s in args.seeds for m in args.methods if (m, s) not in done]
    for i, (name, seed) in enumerate(jobs):
        logger.info("[%d/%d] %s, seed %d, %d iterations", i + 1, len(jobs), name, seed, sched.get(name, 0))
        config, trained = METHODS[name]
        runs.append(
            run_discovery_method(
                name,
                os.path.join(REPO, "configs", config),
                trained,
                os.path.join(args.workdir, f"{name}_s{seed}"),
                seed,
                sched.get(name, 0),
                args.opts,
                args.eval_every,
            )
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_bytes(args.output, json.dumps(_payload(args, sched, runs), indent=1).encode())
    if args.stage4_weights:
        runs.append(_stage4_run(args.stage4_weights, args.workdir, args.opts))
    payload = _payload(args, sched, runs)
    atomic_write_bytes(args.output, json.dumps(payload, indent=1).encode())
    print("\n" + format_summary(payload["summary"]))
    print(json.dumps(payload["learned_minus_baseline"], indent=1))
    return payload


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)
