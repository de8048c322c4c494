#!/usr/bin/env python
"""One table of unsupervised part discovery on toyparts: every head on the same engine, data and evaluator.

Trains each learned head's toyparts config in this process (Choudhury et al. 2021, PartFormer, MPAE; CPU
schedules), evaluates it and the training-free K-means and DFF baselines with ``part_nmi_ari`` (NMI, ARI,
FG-NMI, FG-ARI ×100) on ``toyparts_parts_val``, and, given a stage-4 checkpoint (``make demo`` writes
``output/demo/stage4/model_final.pth``), PartDistillation's parts scored by the same evaluator. Prints a table
with the training iterations and seconds and writes it to ``<output>/discovery_table.json`` (atomically).

    python tools/discovery_table.py [--output output/discovery_table] [--methods choudhury21 partformer ...]
        [--stage4-weights output/demo/stage4/model_final.pth] [--max-iter N] [KEY VALUE ...]
"""

import argparse
import json
import logging
import os
import time

import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from part_distillation.data.pseudo_labels import atomic_write_bytes
from part_distillation.engine import Trainer, check_runtime, load_cfg, run_cli
from part_distillation.engine.discovery_benchmark import METHODS as DISCOVERY_METHODS
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
DATASET = "toyparts_parts_val"
# name → (config, trained?), shared with benchmarks/discovery.py (several seeds, loss curves, landmark NME)
METHODS = dict(DISCOVERY_METHODS)
STAGE4_CONFIG = "quick_schedules/stage4_distillation_toyparts.yaml"
METRICS = ("NMI", "ARI", "FG-NMI", "FG-ARI")
logger = logging.getLogger("part_distillation.discovery_table")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/discovery_table", help="checkpoints, logs and the JSON table")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--stage4-weights", default="", help="a PartDistillation (stage-4) checkpoint to score as well")
    p.add_argument(
        "--max-iter", type=int, default=0, help="override every learned head's SOLVER.MAX_ITER (0 = config's)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every method (KEY VALUE ...)")
    return p.parse_args(argv)


def _cfg(config, out_dir, opts):
    base = ["OUTPUT_DIR", out_dir, "DATASETS.TEST", f"('{DATASET}',)", "TEST.EVALUATOR_TYPE", "part_nmi_ari"]
    cfg = check_runtime(load_cfg(os.path.join(CONFIGS, config), base + list(opts)))
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return cfg


def _metrics(results):
    """The one evaluator's dict (its task is named after the protocol, e.g. "part_nmi_ari_masks")."""
    (metrics,) = results.values()
    return metrics


def run_method(name, out_dir, opts, max_iter=0):
    """(metrics dict, training iterations, training seconds) of one method."""
    config, trained = METHODS[name]
    extra = list(opts) + (["SOLVER.MAX_ITER", str(max_iter)] if trained and max_iter else [])
    cfg = _cfg(config, out_dir, extra)
    seed_all_rng(cfg.SEED)
    if not trained:
        return _metrics(Trainer.test(cfg, Trainer.build_model(cfg))), 0, 0.0
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    results = trainer.train()  # ends with the evaluation on DATASETS.TEST
    return _metrics(results), cfg.SOLVER.MAX_ITER, time.perf_counter() - start


def run_partdistillation(weights, out_dir, opts):
    from detectron2.checkpoint import DetectionCheckpointer

    stage4 = load_cfg(os.path.join(CONFIGS, STAGE4_CONFIG))
    cfg = _cfg(STAGE4_CONFIG, out_dir, ["MODEL.WEIGHTS", weights, *opts])
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    # Trainer.test refuses a split whose objects have no class (stage 4 would predict no part and score 0)
    return _metrics(Trainer.test(cfg, model)), stage4.SOLVER.MAX_ITER


def format_table(rows):
    head = f"| method | {' | '.join(METRICS)} | train iterations | train seconds |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for r in rows:
        vals = " | ".join(f"{r['metrics'][m]:.1f}" for m in METRICS)
        lines.append(f"| {r['method']} | {vals} | {r['iterations']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="part_distillation")
    torch.manual_seed(0)
    rows = []
    for name in args.methods:
        metrics, iters, seconds = run_method(name, os.path.join(args.output, name), args.opts, args.max_iter)
        rows.append({"method": name, "metrics": metrics, "iterations": iters, "seconds": seconds})
        logger.info("%s: %s", name, {m: round(metrics[m], 2) for m in METRICS})
    if args.stage4_weights:
        metrics, iters = run_partdistillation(
            args.stage4_weights, os.path.join(args.output, "partdistillation"), args.opts
        )
        # its training time is the whole pipeline's (make demo), not one head's: reported as 0 here
        rows.append({"method": "partdistillation (stage 4)", "metrics": metrics, "iterations": iters, "seconds": 0.0})
    table = format_table(rows)
    print("\n" + table)
    os.makedirs(args.output, exist_ok=True)
    atomic_write_bytes(os.path.join(args.output, "discovery_table.json"), json.dumps(rows, indent=1).encode())
    return rows


if __name__ == "__main__":
    run_cli(main)
