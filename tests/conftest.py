"""Shared fixtures: one tiny toyparts dataset per test session, and a CPU quick-schedule config."""

import os

import pytest

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


def tiny_quick_opts(output_dir, max_iter=20):
    """Overrides that shrink the stage-0 quick schedule to seconds on 2 CPU cores."""
    return [
        "OUTPUT_DIR", str(output_dir),
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0",
        "INPUT.IMAGE_SIZE", "128",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "512",
    ]  # fmt: skip


@pytest.fixture
def quick_cfg(datasets_root, tmp_path):
    """Factory: the stage-0 quick-schedule config with tiny overrides (not frozen)."""
    from part_distillation.engine import load_cfg

    def make(max_iter=20, extra=()):
        return load_cfg(QUICK_STAGE0, tiny_quick_opts(tmp_path / "out", max_iter) + list(extra))

    return make


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
