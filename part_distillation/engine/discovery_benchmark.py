"""Train and score every part-discovery method on toyparts with one engine and one evaluator.

Used by ``benchmarks/discovery.py`` (and ``tools/discovery_table.py``). Per method and seed:

1. build the method's toyparts config (``configs/discovery/<method>/toyparts.yaml``) with ``SEED`` (and the
   Choudhury head's own generator seed) set to the seed, ``SOLVER.MAX_ITER`` to the schedule;
2. train the learned heads through the project's :class:`~part_distillation.engine.Trainer` (the K-means and
   DFF baselines have nothing to train), keeping the loss curve from its ``metrics.json``;
3. run the model once over ``toyparts_landmarks_train`` (the landmark regressor's fit split) and once over
   ``toyparts_landmarks_val``, scoring the val predictions with :class:`PartNMIARIEvaluator` (NMI, ARI,
   FG-NMI, FG-ARI, pooled over the split, background label 0) and :class:`KeypointNMEEvaluator` (part-centre
   landmarks, regressor fitted on the train split, NME in % of the image size).

A model whose part predictions are conditioned on the object class (PartDistillation's per-object-class part
classifiers) is checked first (:func:`check_object_classes`): objects without a class get no parts, so a split
where no object has one is an error, not a score of 0; a few are a logged, counted skip.

Summaries are mean ± population standard deviation (and min/max) over seeds.
"""

import json
import logging
import os
import time
from collections import OrderedDict, defaultdict

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.utils.env import seed_all_rng

from ..evaluation.keypoint_nme import FIT_DATA, KeypointNMEEvaluator
from ..evaluation.nmi_ari import PartNMIARIEvaluator
from .checks import check_object_classes, object_class_count

__all__ = [
    "METHODS",
    "CPU_SCHEDULES",
    "METRICS",
    "method_cfg",
    "read_loss_curve",
    "read_train_seconds",
    "object_class_count",
    "check_object_classes",
    "evaluate_discovery_model",
    "run_discovery_method",
    "summarize_runs",
    "format_summary",
    "loss_gradient_norms",
]

logger = logging.getLogger(__name__)

# name → (config under configs/, trained?)
METHODS = OrderedDict(
    kmeans=("discovery/baselines/kmeans_toyparts.yaml", False),
    dff=("discovery/baselines/dff_toyparts.yaml", False),
    choudhury21=("discovery/choudhury21/toyparts.yaml", True),
    partformer=("discovery/partformer/toyparts.yaml", True),
    mpae=("discovery/mpae/toyparts.yaml", True),
)
# Iterations that fit the shared 2-core CPU: ~0.8 / 0.8 / 1.25 s per iteration on a quiet machine, 3–8 s with
# five other jobs running (MODEL_ZOO.md's table used these).
CPU_SCHEDULES = {"choudhury21": 120, "partformer": 100, "mpae": 60}
METRICS = ("NMI", "ARI", "FG-NMI", "FG-ARI", "NME")
FIT_DATASET = "toyparts_landmarks_train"
EVAL_DATASET = "toyparts_landmarks_val"


def method_cfg(config_path: str, output_dir: str, seed: int, max_iter: int = 0, opts=()):
    """The frozen config of one method run (``max_iter`` 0 keeps the config's schedule)."""
    from . import check_runtime, load_cfg

    extra = ["OUTPUT_DIR", output_dir, "SEED", str(seed), "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0"]
    if max_iter:
        extra += ["SOLVER.MAX_ITER", str(max_iter)]
    cfg = load_cfg(config_path, extra + list(opts))
    if max_iter and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and cfg.SOLVER.STEPS:
        # keep the reference's ×GAMMA drops at the same fractions of the (shortened) schedule
        fractions = [s / float(load_cfg(config_path).SOLVER.MAX_ITER) for s in cfg.SOLVER.STEPS]
        cfg.SOLVER.STEPS = tuple(max(1, int(round(f * max_iter))) for f in fractions)
    if "CHOUDHURY21" in cfg.MODEL.PART_DISCOVERY:
        cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.SEED = int(seed)
    cfg = check_runtime(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return cfg


def _latest_run_rows(output_dir: str, keep):
    """The rows of the Trainer's ``metrics.json`` in ``output_dir`` that ``keep`` accepts, of its latest run only
    (detectron2 appends: a run in the same folder starts again at a lower iteration), or [] without the file."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if "iteration" in m and keep(m):
                if rows and int(m["iteration"]) <= int(rows[-1]["iteration"]):
                    rows = []
                rows.append(m)
    return rows


def read_loss_curve(output_dir: str):
    """``[{"iteration", "total_loss", "loss_*"...}]`` of the latest run in the Trainer's ``metrics.json`` (logged
    every 20 iterations, losses as the median of the last 20), or [] when there is none."""

    def is_loss(k):
        return k == "total_loss" or k.startswith("loss_")

    rows = _latest_run_rows(output_dir, lambda m: any(is_loss(k) for k in m))
    return [{"iteration": int(m["iteration"]), **{k: float(v) for k, v in m.items() if is_loss(k)}} for m in rows]


def read_train_seconds(output_dir: str) -> float:
    """Training seconds of the latest run in the Trainer's ``metrics.json``, estimated as the sum over its logging
    windows of (median iteration ``time`` × iterations in the window); 0.0 when there is none. Evaluation and
    checkpointing are not included."""
    seconds, previous = 0.0, -1
    for m in _latest_run_rows(output_dir, lambda m: "time" in m):
        seconds += float(m["time"]) * (int(m["iteration"]) - previous)
        previous = int(m["iteration"])
    return seconds


def evaluate_discovery_model(cfg, model, fit_dataset: str = FIT_DATASET, eval_dataset: str = EVAL_DATASET):
    """NMI, ARI, FG-NMI, FG-ARI (×100) and NME (%) of ``model``'s part maps on ``eval_dataset`` (a model that needs
    object classes is checked first: :func:`check_object_classes`)."""
    from .trainer import Trainer

    model.eval()
    num_object_classes = object_class_count(model)
    if num_object_classes:
        for name in dict.fromkeys((fit_dataset, eval_dataset)):
            check_object_classes(cfg, name, num_object_classes)
    FIT_DATA.pop(fit_dataset, None)
    fit = KeypointNMEEvaluator(fit_dataset, fit_on_same_split=True, normalizer="image", distributed=False)
    inference_on_dataset(model, Trainer.build_test_loader(cfg, fit_dataset), fit)
    nmi = PartNMIARIEvaluator(eval_dataset, target="masks", distributed=False)
    nme = KeypointNMEEvaluator(eval_dataset, fit_dataset=fit_dataset, normalizer="image", distributed=False)
    results = inference_on_dataset(model, Trainer.build_test_loader(cfg, eval_dataset), DatasetEvaluators([nmi, nme]))
    out = OrderedDict((k, float(results["part_nmi_ari_masks"][k])) for k in METRICS[:4])
    out["NME"] = float(results["part_landmark_nme"]["NME"])
    return out


def run_discovery_method(
    name: str,
    config_path: str,
    trained: bool,
    output_dir: str,
    seed: int,
    max_iter: int = 0,
    opts=(),
    eval_every: int = 0,
):
    """One (method, seed) run: ``{"method", "seed", "metrics", "iterations", "seconds", "loss_curve"}``; with
    ``eval_every`` also ``"metric_curve"``: the same metrics of the checkpoints saved every ``eval_every``
    iterations of this schedule (scored after training)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from .trainer import Trainer

    if trained and eval_every:
        opts = list(opts) + ["SOLVER.CHECKPOINT_PERIOD", str(int(eval_every))]
    cfg = method_cfg(config_path, output_dir, seed, max_iter if trained else 0, opts)
    seed_all_rng(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if trained:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model
        iterations = cfg.SOLVER.MAX_ITER
    else:
        model = Trainer.build_model(cfg)
        iterations = 0
    train_seconds = time.perf_counter() - start if trained else 0.0
    start = time.perf_counter()
    metrics = evaluate_discovery_model(cfg, model)
    eval_seconds = time.perf_counter() - start
    logger.info("%s seed %d: %s", name, seed, {k: round(v, 2) for k, v in metrics.items()})
    metric_curve = []
    if trained and eval_every:
        for it in range(int(eval_every), cfg.SOLVER.MAX_ITER, int(eval_every)):
            path = os.path.join(cfg.OUTPUT_DIR, f"model_{it - 1:07d}.pth")
            if os.path.isfile(path):
                DetectionCheckpointer(model).load(path)
                metric_curve.append({"iteration": it, "metrics": evaluate_discovery_model(cfg, model)})
                logger.info("%s seed %d, iteration %d: %s", name, seed, it, metric_curve[-1]["metrics"])
        metric_curve.append({"iteration": cfg.SOLVER.MAX_ITER, "metrics": metrics})
    out = {
        "method": name,
        "seed": int(seed),
        "metrics": metrics,
        "iterations": int(iterations),
        "seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "loss_curve": read_loss_curve(cfg.OUTPUT_DIR) if trained else [],
    }
    if metric_curve:
        out["metric_curve"] = metric_curve
    return out


def summarize_runs(runs):
    """Per method: mean, std (population), min, max of every metric over its seeds, plus iterations/seconds."""
    by_method = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    summary = OrderedDict()
    for name, rs in by_method.items():
        entry = {"seeds": [r["seed"] for r in rs], "iterations": rs[0]["iterations"]}
        entry["seconds_mean"] = float(np.mean([r["seconds"] for r in rs]))
        for m in METRICS:
            vals = np.array([r["metrics"][m] for r in rs], dtype=np.float64)
            entry[m] = {
                "mean": float(vals.mean()),
                "std": float(vals.std()),
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
        summary[name] = entry
    return summary


def format_summary(summary) -> str:
    """Markdown table: mean ± std over seeds."""
    lines = [
        f"| method | {' | '.join(METRICS)} | seeds | train iterations | train seconds (mean) |",
        "|" + "---|" * (len(METRICS) + 4),
    ]
    for name, e in summary.items():
        vals = " | ".join(f"{e[m]['mean']:.1f} ± {e[m]['std']:.1f}" for m in METRICS)
        lines.append(f"| {name} | {vals} | {len(e['seeds'])} | {e['iterations']} | {e['seconds_mean']:.0f} |")
    return "\n".join(lines)


def loss_gradient_norms(cfg, model, num_batches: int = 2):
    """Per loss term: its value and the L2 norm of its gradient w.r.t. the trainable parameters, averaged over
    ``num_batches`` training batches (the diagnostic for "which term drives training": with gradient clipping
    to a total norm the terms compete by their gradients, not by their values)."""
    from .trainer import Trainer

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loader = iter(Trainer.build_train_loader(cfg))
    sums = defaultdict(lambda: np.zeros(2))
    for _ in range(int(num_batches)):
        losses = model(next(loader))
        for i, (name, value) in enumerate(losses.items()):
            grads = torch.autograd.grad(value, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            sums[name] += np.array([float(value.detach()), float(norm)])
    model.eval()
    return {k: {"value": float(v[0] / num_batches), "grad_norm": float(v[1] / num_batches)} for k, v in sums.items()}
