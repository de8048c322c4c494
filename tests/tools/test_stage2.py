"""Stage 2 end to end on CPU: train on a pseudo-label store, --resume, AR@k through the CLI, 1 vs 2
processes, and the SLURM launcher (its parameters, and a run through submitit's in-process debug executor).

1 vs 2 processes: the comparison is on evaluation (``--eval-only`` of one checkpoint), which is per image
and deterministic whatever the number of processes. Training cannot be compared bitwise: each rank draws
its own augmentations and matcher points from a rank-dependent seed and the gradient all-reduce sums in
another order. (Multi-process training on CPU also needs the Trainer to build DDP without ``device_ids``:
detectron2's ``create_ddp_model`` passes ``[local_rank]``, which DDP rejects for CPU modules.)
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from part_distillation.data.gt_parts import write_gt_part_store
from part_distillation.engine import Trainer, load_cfg

from conftest import REPO_ROOT, tiny_quick_opts

QUICK_STAGE2 = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")
TRAIN_NET = os.path.join(REPO_ROOT, "tools", "train_net.py")
AR_KEYS = ["AR@1", "AR@10", "AR@50", "AR@100", "AR@200"]
ITERS = 100  # enough for non-zero AR on toyparts at 128 px (~10 s on 2 cores)


@pytest.fixture(scope="module")
def store_root(datasets_root, tmp_path_factory):
    """toyparts GT parts written as the stage-1 store toyparts_train/grouping (registered too)."""
    root = str(tmp_path_factory.mktemp("pseudo_labels"))
    write_gt_part_store(
        "toyparts_parts_train",
        root,
        "toyparts_train",
        "grouping",
        part_classes=False,
        shard_size=5,
        config="gt",
        register_as="toyparts_train_pseudo_grouping",
    )
    return root


def stage2_opts(store_root, output_dir, max_iter):
    return tiny_quick_opts(output_dir, max_iter) + ["DATASETS.PSEUDO_LABEL_ROOT", store_root]


class RecordIter(HookBase):
    def __init__(self):
        self.iters = []

    def after_step(self):
        self.iters.append(self.trainer.iter)


@pytest.fixture(scope="module")
def trained(store_root, tmp_path_factory):
    """ITERS iterations in process (checkpoint every 50); returns (cfg, its final AR results)."""
    out = tmp_path_factory.mktemp("stage2") / "out"
    cfg = load_cfg(QUICK_STAGE2, stage2_opts(store_root, out, ITERS) + ["SOLVER.CHECKPOINT_PERIOD", "50"])
    seed_all_rng(cfg.SEED)  # what default_setup does for the CLI: the same data order and initialisation
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    # no TorchScript fusion warm-up of the criterion's losses (up to ~20 s on a loaded 2-core machine)
    with torch.jit.optimized_execution(False):
        results = trainer.train()
    return cfg, results["part_proposals"]


def _run(args, timeout=240):
    # plain-Python losses (no TorchScript warm-up in each process); one thread per process, as in process
    env = dict(os.environ, PYTORCH_JIT="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _copypaste(log):
    """The last part_proposals table printed by detectron2's print_csv_format."""
    lines = re.findall(r"copypaste: (.*)", log)
    start = max(i for i, line in enumerate(lines) if line == "Task: part_proposals")
    keys, values = lines[start + 1].split(","), [float(v) for v in lines[start + 2].split(",")]
    return dict(zip(keys, values))


def test_training_evaluates_ar_on_part_dataset(trained):
    cfg, results = trained
    assert all(k in results for k in AR_KEYS)
    assert results["num_images"] == len(DatasetCatalog.get("toyparts_parts_val"))
    assert 0 < results["AR@200"] <= 100 and results["AR@1"] <= results["AR@10"] <= results["AR@200"]
    for name in ("model_0000049.pth", "model_0000099.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, name)), name


def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    cfg, _ = trained
    out = tmp_path / "resumed"
    shutil.copytree(cfg.OUTPUT_DIR, out)
    cfg = cfg.clone()
    cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER, cfg.DATASETS.TEST = str(out), ITERS + 2, ()
    trainer = Trainer(cfg)
    recorder = RecordIter()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == ITERS
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    state = trainer.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in final.items())
    with torch.jit.optimized_execution(False):
        trainer.train()
    assert recorder.iters == [ITERS, ITERS + 1]


def test_eval_only_cli_one_and_two_processes_agree(trained, store_root, tmp_path):
    cfg, in_process = trained
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    runs = {}
    for n in (1, 2):  # 2 processes: gloo, each evaluates half of the images, the evaluator gathers
        log = _run(
            [
                "--config-file",
                QUICK_STAGE2,
                "--eval-only",
                "--num-gpus",
                str(n),
                "--dist-url",
                "auto",
                *stage2_opts(store_root, tmp_path / f"eval{n}", 0),
                "MODEL.WEIGHTS",
                weights,
            ]
        )
        runs[n] = _copypaste(log)
    assert list(runs[1])[:5] == AR_KEYS
    assert runs[1] == runs[2], runs
    assert runs[1]["num_images"] == 6 and runs[1]["AR@200"] > 0
    # and the same as the trainer's own final evaluation of these weights
    assert all(abs(runs[1][k] - round(in_process[k], 4)) < 1e-4 for k in AR_KEYS)


# ------------------------------------------------------------------------------------------
# tools/launch_slurm.py
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch_slurm():
    spec = importlib.util.spec_from_file_location("launch_slurm", os.path.join(REPO_ROOT, "tools", "launch_slurm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_slurm_parameters_and_task_arguments(launch_slurm, monkeypatch, tmp_path):
    import submitit

    args = launch_slurm.get_parser().parse_args(
        [
            "--config-file",
            QUICK_STAGE2,
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--partition",
            "learn",
            "--timeout",
            "600",
            "--account",
            "acct",
            "SOLVER.MAX_ITER",
            "7",
        ]
    )
    params = launch_slurm.executor_parameters(args)
    assert params["nodes"] == 2 and params["gpus_per_node"] == params["tasks_per_node"] == 8  # one task per GPU
    assert params["slurm_partition"] == "learn" and params["slurm_account"] == "acct"
    assert params["timeout_min"] == 600 and "slurm_qos" not in params  # optional and unset
    # what SLURM would be asked for (submitit's slurm executor, as if srun existed)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = launch_slurm.build_executor(args, str(tmp_path / "%j"))
    slurm = executor._executor.parameters
    assert (slurm["nodes"], slurm["ntasks_per_node"], slurm["gpus_per_node"]) == (2, 8, 8)
    assert (slurm["partition"], slurm["account"], slurm["time"]) == ("learn", "acct", 600)

    # task 11 of 16 runs on the second node: local rank 3 of 8, rendezvous on the first node
    env = types.SimpleNamespace(
        num_nodes=2, num_tasks=16, node=1, local_rank=3, hostnames=["gpu-a", "gpu-b"], job_id="4242"
    )
    task = launch_slurm.task_args(args, env)
    port = launch_slurm.rendezvous_port("4242")
    assert (task.num_machines, task.num_gpus, task.machine_rank) == (2, 8, 1)
    assert task.dist_url == f"tcp://gpu-a:{port}" and 20000 <= port < 40000
    assert task.opts == ["SOLVER.MAX_ITER", "7"] and not task.resume and args.dist_url != task.dist_url

    # preemption/timeout: requeued as the same command with --resume
    job = launch_slurm.TrainJob(args)
    requeued = job.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert isinstance(requeued.function, launch_slurm.TrainJob) and requeued.function.args.resume
    assert requeued.function.args.opts == args.opts and not job.args.resume


def test_launch_slurm_debug_executor_runs_two_iterations(launch_slurm, store_root, tmp_path):
    out = tmp_path / "debug"
    args = launch_slurm.get_parser().parse_args(
        [
            "--config-file",
            QUICK_STAGE2,
            "--cluster",
            "debug",
            "--job-dir",
            str(tmp_path / "jobs"),
            *stage2_opts(store_root, out, 2),
        ]
    )
    job = launch_slurm.submit(args)
    with torch.jit.optimized_execution(False):
        results = job.result()
    assert all(k in results["part_proposals"] for k in AR_KEYS)
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert state["iteration"] == 1  # iterations 0 and 1
