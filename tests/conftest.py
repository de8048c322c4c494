"""Shared fixtures: one tiny toyparts dataset per test session, and a CPU quick-schedule config; shared helpers
(registering in-memory datasets, reading a folder's files)."""

import os

import pytest
from detectron2.engine import HookBase

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_STAGE0 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage0_instance_toyparts.yaml")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite: the tests' models are tiny, and on a loaded 2-core machine two
    OpenMP threads spin-wait and run up to ~10x slower (subprocess tests set OMP_NUM_THREADS=1 themselves)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """$DETECTRON2_DATASETS pointing at a freshly generated, tiny toyparts (12 train / 6 val, 128 px)."""
    from part_distillation.data.datasets.toyparts import ensure_toyparts

    root = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    ensure_toyparts(str(root / "toyparts"), num_train=12, num_val=6, seed=0, image_size=128, progress=False)
    yield str(root)
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old


class RecordLoss(HookBase):
    """Trainer hook: ``losses``, the ``total_loss`` of every step."""

    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


def register_records(name, records=(), **meta):
    """(Re-)register ``name`` in detectron2's catalogs: a loader returning ``records`` (the same dicts every call) and
    the metadata ``meta``; returns ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    records = list(records)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(**meta)
    return name


def read_tree(root) -> dict:
    """``{path relative to root: bytes}`` of every file below ``root``."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def train_frozen_backbone(trainer, head_key: str) -> dict:
    """Run ``trainer`` (a part-discovery model with a frozen backbone) and check that the backbone stayed in eval mode
    with its weights untouched while the head trained (its ``head_key`` tensor changed); the state dict after."""
    import torch

    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert not model.backbone.training and model.head.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before[head_key], after[head_key])
    return after


def tiny_quick_opts(output_dir, max_iter=20):
    """Overrides that shrink the stage-0 quick schedule to seconds on 2 CPU cores."""
    return [
        "OUTPUT_DIR",
        str(output_dir),
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.STEPS",
        "()",
        "SOLVER.WARMUP_ITERS",
        "0",
        "INPUT.IMAGE_SIZE",
        "128",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "128",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
        "512",
    ]


@pytest.fixture
def quick_cfg(datasets_root, tmp_path):
    """Factory: the stage-0 quick-schedule config with tiny overrides (not frozen)."""
    from part_distillation.engine import load_cfg

    def make(max_iter=20, extra=()):
        return load_cfg(QUICK_STAGE0, tiny_quick_opts(tmp_path / "out", max_iter) + list(extra))

    return make


def run_train_net(*args, timeout=300, env=None):
    """``python tools/train_net.py ARGS`` in a subprocess from the repository root, as a user runs it; returns
    ``(returncode, stdout + stderr)``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "train_net.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def repo_script():
    """Factory: import a repository script (not a package module) by its path relative to the repository
    root, e.g. ``repo_script("tools/inspect_pseudo_labels.py")``; the module is named after the file."""
    import importlib.util

    def load(relpath):
        name = os.path.splitext(os.path.basename(relpath))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, relpath))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
