"""Run the tools in-process on a corpus case and classify the outcome.

Outcome classes (the table's cells):

* ``error``: the tool stopped with a one-line ``error:`` message (exit 2) that names the file or key;
* ``skip``: it finished and counted what it skipped or dropped, by reason;
* ``ok``: it finished with a correct result and nothing to count;
* ``reported``: (validator) the problem is listed and the exit status is 1.

Every run also checks that no partial output is left: a failed run leaves no ``model_final.pth`` and no
store that a later stage would accept.
"""

import contextlib
import io
import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import make_pseudo_labels  # noqa: E402
import rank_parts  # noqa: E402
import train_net  # noqa: E402
import validate_dataset  # noqa: E402

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules")
STAGE0 = os.path.join(QUICK, "stage0_instance_toyparts.yaml")
STAGE1 = os.path.join(QUICK, "stage1_pixel_grouping_toyparts.yaml")
STAGE2 = os.path.join(QUICK, "stage2_proposals_toyparts.yaml")
STAGE3 = os.path.join(QUICK, "stage3_ranking_toyparts.yaml")
STAGE4 = os.path.join(QUICK, "stage4_distillation_toyparts.yaml")

TINY = [
    "SOLVER.IMS_PER_BATCH", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "1",
    "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "0", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


class Result:
    def __init__(self, outcome, message="", value=None):
        self.outcome, self.message, self.value = outcome, message, value

    def __repr__(self):
        return f"Result({self.outcome!r}, {self.message[:200]!r})"


def _skip_total():
    from part_distillation.data.skips import skip_counts

    return sum(skip_counts().values())


def run_tool(fn, *args):
    """``fn(*args)`` as the CLI runs it: a UserError becomes ``error`` with its one-line message."""
    from part_distillation.engine.setup import run_cli

    err = io.StringIO()
    before = _skip_total()
    try:
        with contextlib.redirect_stderr(err):
            value = run_cli(fn, *args)
    except SystemExit as e:
        message = err.getvalue().strip().splitlines()
        return Result("error" if e.code == 2 else f"exit {e.code}", message[-1] if message else "")
    return Result("ok", "", value), _skip_total() - before


def validate(dataset, out_dir):
    report = os.path.join(out_dir, "report.json")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = validate_dataset.main(["--dataset", dataset, "--no-progress", "--json", report])
    if rc == 2:
        assert not os.path.exists(report), "a report was written although the dataset could not be loaded"
        return Result("error", err.getvalue().strip().splitlines()[-1])
    import json

    findings = json.load(open(report))
    checks = sorted({f["check"] for f in findings["findings"]})
    if rc == 1:
        return Result("reported", ", ".join(checks))
    return Result("ok" if not checks else "ok+warn", ", ".join(checks))


def _parse(module, argv):
    old = sys.argv
    sys.argv = [module.__name__ + ".py", *argv]
    try:
        return module.parse_args() if hasattr(module, "parse_args") else module.default_argument_parser().parse_args()
    finally:
        sys.argv = old


def label(
    dataset,
    store_root,
    out_dir,
    extra=(),
    config=STAGE1,
    module=make_pseudo_labels,
    stage="grouping",
    eval_parts="",
    resume=False,
):
    argv = [
        "--config-file",
        config,
        *(["--resume"] if resume else []),
        "--shard-size",
        "2",
        "--stage",
        stage,
        *TINY,
        "MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET",
        eval_parts,
        "DATASETS.PSEUDO_LABEL_ROOT",
        str(store_root),
        "OUTPUT_DIR",
        str(out_dir),
        "DATASETS.TEST",
        f"('{dataset}',)",
        "MODEL.PIXEL_GROUPING.KMEANS_N_INIT",
        "1",
        "DATALOADER.LABELLING_IMS_PER_BATCH",
        "2",
        "MODEL.PIXEL_GROUPING.CRF.ENABLED",
        "False",
        *extra,
    ]
    if module is rank_parts:  # an untrained stage-2 model scores low: keep every part it proposes
        argv += ["MODEL.PART_RANKING.MIN_SCORE", "0.0", "MODEL.PART_RANKING.MIN_AREA_RATIO", "0.0"]
    res = run_tool(module.main, _parse(module, argv))
    if isinstance(res, Result):
        return res
    res, _ = res
    summary = res.value
    dropped = summary.get("store_counts", {}).get("dropped_by_reason", {})
    at_load = summary.get("store_counts", {}).get("dropped_at_load", {})
    counted = dict(summary.get("skipped_by_reason", {}), **dropped, **at_load)
    return Result("skip" if counted else "ok", ", ".join(f"{k}: {v}" for k, v in sorted(counted.items())), summary)


def train(config, out_dir, extra=(), eval_only=False):
    argv = ["--config-file", config, *(["--eval-only"] if eval_only else []), *TINY, "OUTPUT_DIR", str(out_dir), *extra]
    res = run_tool(train_net.main, _parse(train_net, argv))
    if isinstance(res, Result):
        assert not os.path.exists(os.path.join(out_dir, "model_final.pth")), "a failed run wrote model_final.pth"
        return res
    res, skips = res
    counted = {"counted skips": skips}
    for metrics in (res.value or {}).values():
        if isinstance(metrics, dict):
            for key in ("num_images_skipped", "num_gt_parts_unusable"):
                counted[key] = counted.get(key, 0) + int(metrics.get(key, 0) or 0)
    counted = {k: v for k, v in counted.items() if v}
    return Result("skip" if counted else "ok", ", ".join(f"{k}: {v}" for k, v in counted.items()), res.value)
