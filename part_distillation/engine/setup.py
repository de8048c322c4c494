"""Config set-up and the command-line wrapper shared by every tool."""

import argparse
import functools
import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import default_setup

from ..config import load_cfg
from ..utils.errors import ConfigError, UserError
from . import checks
from .checks import check_checkpoint_file, check_checkpoints, resolve_stage_config

__all__ = [
    "default_argument_parser",
    "load_cfg",
    "check_runtime",
    "check_checkpoints",
    "check_checkpoint_file",
    "setup_cfg",
    "run_cli",
    "run_worker",
]


def default_argument_parser(epilog: str = None) -> argparse.ArgumentParser:
    """detectron2's parser (--config-file, --resume, --eval-only, --num-gpus, --num-machines,
    --machine-rank, --dist-url, opts)."""
    return d2_argument_parser(epilog=epilog)


def _check_registered(cfg):
    """Unregistered model pieces fail here in one line, not deep inside a registry lookup."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    for key, name, registry in (
        ("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, META_ARCH_REGISTRY),
        ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY),
    ):
        if name not in registry:
            known = ", ".join(sorted(k for k, _ in registry))
            raise ConfigError(f"{key}={name!r} is not registered; use one of: {known}.")


def check_runtime(cfg):
    """Adapt/validate ``cfg`` for the machine it runs on (no GPU → clear error; AMP off on CPU) and check
    the checkpoint files it names."""
    _check_registered(cfg)
    check_checkpoints(cfg)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("MODEL.DEVICE is 'cuda' but no GPU is visible; add `MODEL.DEVICE cpu` to the command.")
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logging.getLogger(__name__).warning("SOLVER.AMP.ENABLED is ignored on CPU (mixed precision needs CUDA).")
        cfg.SOLVER.AMP.ENABLED = False
    return cfg


def setup_cfg(args):
    """Frozen config for a tool run, with detectron2's logging/output-dir set-up done."""
    cfg = check_runtime(load_cfg(args.config_file, args.opts))
    if cfg.DATASETS.PART_COCO:
        from ..data.datasets.part_coco import register_part_coco_specs

        register_part_coco_specs(cfg.DATASETS.PART_COCO)
    if cfg.DATASETS.PSEUDO_LABEL_ROOT:
        from ..data.pseudo_labels import register_all_pseudo_label_datasets

        # stage 4 trains on part classes 0..P-1 (stage-3 stores); earlier stages are class-agnostic
        num_parts = cfg.MODEL.PART_DISTILLATION.NUM_PART_CLASSES if cfg.INPUT.PSEUDO_LABELS.USE_PART_CLASSES else 0
        classes = [f"part {i}" for i in range(num_parts)] if num_parts else ["part"]
        register_all_pseudo_label_datasets(
            cfg.DATASETS.PSEUDO_LABEL_ROOT, thing_classes=classes, loader=cfg.DATASETS.PSEUDO_LABEL_LOADER
        )
    resolve_stage_config(cfg)  # data-dependent values (classes of a store) before the config is frozen and dumped
    # through the module: benchmarks/pseudo_labels.py --paper times a random Swin-L and replaces this one check
    checks.check_stage_weights(cfg, eval_only=getattr(args, "eval_only", False), resume=getattr(args, "resume", False))
    cfg.freeze()
    if logging.getLogger("detectron2").handlers:
        _setup_again(cfg)  # a second tool run in this process (the demo): don't stack log handlers
    else:
        default_setup(cfg, args)
    # detectron2 configures only its own loggers; ours (evaluator tables, skips, progress) go to the same places
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    if not logging.getLogger("part_distillation").handlers:  # a calling tool may have set it up already
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="part_distillation", abbrev_name="pd")
    return cfg


def _setup_again(cfg):
    """What ``default_setup`` does besides adding log handlers: output dir, config dump, seeding."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    if comm.is_main_process() and cfg.OUTPUT_DIR:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def run_cli(fn, *args):
    """Run ``fn(*args)``; a :class:`UserError` prints ``error: <message>`` and exits 2 (no traceback)."""
    try:
        return fn(*args)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the original line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_worker(main, args):
    """Entry point of one ``launch``-ed process: ``run_cli(main, args)``, then a clean distributed exit.

    All ranks meet at a barrier and the process group is destroyed before the interpreter exits;
    otherwise gloo's background threads can abort the process at shutdown ("terminate called without an
    active exception"), failing a run that finished.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    try:
        return run_cli(main, args)
    finally:
        if dist.is_available() and dist.is_initialized():
            comm.synchronize()
            dist.destroy_process_group()
            # detectron2's comm still holds the groups (launch's local group, the cached gloo group), which
            # keeps them and their gloo/TCPStore threads alive until interpreter teardown; drop them so
            # they are destroyed here
            comm._LOCAL_PROCESS_GROUP = None
            comm._get_global_gloo_group.cache_clear()


def launch_main(main, args):
    """A tool's command line: check the config in this process (a bad key or path is one ``error:`` line, before
    any worker is spawned), then run ``main(args)`` on ``--num-gpus`` × ``--num-machines`` processes through
    detectron2's ``launch``, each ending cleanly (:func:`run_worker`)."""
    from detectron2.engine import launch

    from .checks import check_object_source, check_stage_weights

    def check():
        cfg = load_cfg(args.config_file, args.opts)
        check_object_source(cfg)  # what the stage reads comes first: no weights can fix a wrong object source
        check_stage_weights(cfg, eval_only=args.eval_only, resume=args.resume)
        check_runtime(cfg)

    run_cli(check)
    return launch(
        functools.partial(run_worker, main),
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
