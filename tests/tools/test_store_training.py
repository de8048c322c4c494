"""Stages 2 and 4 train from a pseudo-label store through PseudoLabelStoreDataset (records decoded on access)
exactly as from the list of all records: same loss curve with a fixed seed, in 1 and 2 processes.

The comparison runs with ``DATALOADER.STORE_SHUFFLE global`` (detectron2's TrainingSampler, the list path's
order); the default shard-window order is another order by design, tested for its own properties in
tests/data/test_store_dataset.py and run here once end to end with --resume.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from part_distillation.data.gt_parts import write_gt_part_store
from part_distillation.data.pseudo_labels import register_pseudo_label_dataset
from part_distillation.data.store_dataset import PseudoLabelStoreDataset
from part_distillation.engine import Trainer, load_cfg

from conftest import REPO_ROOT, tiny_quick_opts

QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedules")
STAGES = {
    "stage2": ("stage2_proposals_toyparts.yaml", "grouping", ["part"]),
    "stage4": ("stage4_distillation_toyparts.yaml", "ranking", [f"part {k}" for k in range(8)]),
}
ITERS = 3


@pytest.fixture(scope="module")
def store_root(datasets_root, tmp_path_factory):
    """toyparts GT parts as a stage-1 store (class-agnostic) and a stage-3 store (part classes), 5-image shards."""
    root = str(tmp_path_factory.mktemp("pseudo_labels"))
    for stage, part_classes in (("grouping", False), ("ranking", True)):
        write_gt_part_store(
            "toyparts_parts_train", root, "toyparts_train", stage, part_classes=part_classes, shard_size=5, config="gt"
        )
    return root


def _opts(stage, store_root, out, loader, extra=(), shuffle="global"):
    return tiny_quick_opts(out, ITERS) + [
        "DATASETS.PSEUDO_LABEL_ROOT",
        store_root,
        "DATASETS.PSEUDO_LABEL_LOADER",
        loader,
        "DATALOADER.STORE_SHUFFLE",
        shuffle,
        *extra,
    ]


class RecordLosses(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        latest = self.trainer.storage.latest()
        self.losses.append({k: v for k, (v, _) in latest.items() if k.startswith("loss") or k == "total_loss"})


def _train_in_process(stage, store_root, out, loader):
    config, store_stage, classes = STAGES[stage]
    register_pseudo_label_dataset(
        f"toyparts_train_pseudo_{store_stage}",
        store_root,
        "toyparts_train",
        store_stage,
        thing_classes=classes,
        loader=loader,
    )
    cfg = load_cfg(os.path.join(QUICK, config), _opts(stage, store_root, out, loader))
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    recorder = RecordLosses()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    with torch.jit.optimized_execution(False):
        trainer.train()
    return trainer, recorder.losses


def _innermost_dataset(loader):
    """The dataset under detectron2's wrappers (DataLoader → AspectRatioGrouped → ToIterable → MapDataset)."""
    dataset = loader
    while hasattr(dataset, "dataset") or hasattr(dataset, "_dataset"):
        dataset = dataset.dataset if hasattr(dataset, "dataset") else dataset._dataset
    return dataset


@pytest.mark.parametrize("stage", ["stage2", "stage4"])
def test_store_path_gives_the_list_path_loss_curve(stage, store_root, tmp_path):
    store_trainer, from_store = _train_in_process(stage, store_root, tmp_path / "store", "store")
    assert isinstance(_innermost_dataset(store_trainer.data_loader), PseudoLabelStoreDataset)
    _, from_list = _train_in_process(stage, store_root, tmp_path / "list", "list")
    assert len(from_store) == ITERS and from_store[0].keys() == from_list[0].keys()
    for a, b in zip(from_store, from_list):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def _train_two_processes(stage, store_root, out, loader, extra=(), shuffle="global"):
    config = STAGES[stage][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTORCH_JIT="0")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            os.path.join(QUICK, config),
            "--num-gpus",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{port}",
            *_opts(
                stage, store_root, out, loader, ["SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0", *extra], shuffle
            ),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return proc.stdout + proc.stderr, [r for r in rows if "total_loss" in r]


@pytest.mark.parametrize("stage", ["stage2", "stage4"])
def test_two_process_store_path_gives_the_list_path_loss_curve(stage, store_root, tmp_path):
    # detectron2's JSON writer logs each loss smoothed (median) over the iterations so far, at the last one
    log, from_store = _train_two_processes(stage, store_root, tmp_path / "store", "store")
    _, from_list = _train_two_processes(stage, store_root, tmp_path / "list", "list")
    assert "pseudo-labelled images from" not in log  # load_pseudo_label_dicts (the list path) never ran
    assert [r["iteration"] for r in from_store] == [r["iteration"] for r in from_list] == [ITERS - 1]
    keys = [k for k in from_list[0] if k.startswith("loss") or k == "total_loss"]
    assert len(keys) > 3
    for key in keys:
        assert from_store[0][key] == pytest.approx(from_list[0][key], rel=1e-5), key


def test_two_process_training_in_the_default_shard_window_order(store_root, tmp_path):
    """The default path end to end: 3 shards of 5 images dealt to 2 ranks, loader workers, a finite loss."""
    log, rows = _train_two_processes(
        "stage2", store_root, tmp_path / "sw", "store", ["DATALOADER.NUM_WORKERS", "1"], shuffle="shard_window"
    )
    assert "shard-window order, 8 shards a window" in log
    assert rows and np.isfinite(rows[-1]["total_loss"])
    assert os.path.isfile(tmp_path / "sw" / "model_final.pth")


def test_resume_continues_the_shard_window_order(store_root, tmp_path):
    """--resume: the sampler skips what the checkpoint's iterations drew (2 images per iteration here)."""
    register_pseudo_label_dataset("toyparts_train_pseudo_grouping", store_root, "toyparts_train", "grouping")
    opts = _opts("stage2", store_root, tmp_path / "out", "store", shuffle="shard_window")
    cfg = load_cfg(os.path.join(QUICK, STAGES["stage2"][0]), opts + ["SOLVER.CHECKPOINT_PERIOD", "2"])
    seed_all_rng(cfg.SEED)
    first = Trainer(cfg)
    first.resume_or_load(resume=False)
    with torch.jit.optimized_execution(False):
        first.train()
    sampler = first._trainer.data_loader.resumable_sampler
    assert sampler is not None and sampler._start == 0
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == ITERS
    assert resumed._trainer.data_loader.resumable_sampler._start == ITERS * cfg.SOLVER.IMS_PER_BATCH
