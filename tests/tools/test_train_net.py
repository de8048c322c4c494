"""Stage 0 end to end on CPU: training lowers the loss, checkpoints evaluate and resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from part_distillation.engine import Trainer

from conftest import QUICK_STAGE0, REPO_ROOT, RecordLoss, tiny_quick_opts


def _train(cfg, resume=False):
    trainer = Trainer(cfg)
    recorder = RecordLoss()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer, recorder.losses


def test_training_lowers_loss_and_writes_logs(quick_cfg):
    cfg = quick_cfg(max_iter=40, extra=["TEST.EVAL_PERIOD", "0"])
    trainer, losses = _train(cfg)
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, f"loss did not decrease: first {first:.2f}, last {last:.2f}"
    # EventStorage writers: JSON metrics, TensorBoard events, final checkpoint
    out = cfg.OUTPUT_DIR
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert any("total_loss" in m for m in metrics)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    # the final evaluation ran COCOEvaluator on toyparts_val
    assert "segm" in trainer.test(cfg, trainer.model)


def test_eval_only_cli_from_checkpoint(quick_cfg, tmp_path):
    cfg = quick_cfg(max_iter=4, extra=["TEST.EVAL_PERIOD", "0"])
    trainer, _ = _train(cfg)
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            QUICK_STAGE0,
            "--eval-only",
            *tiny_quick_opts(out),
            "MODEL.WEIGHTS",
            weights,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: Task: segm" in proc.stdout + proc.stderr
    results = os.path.join(out, "inference", "toyparts_val", "coco_instances_results.json")
    assert os.path.isfile(results) and isinstance(json.load(open(results)), list)
    # the weights used for evaluation are the trained ones, not a fresh init
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_resume_continues_from_last_checkpoint(quick_cfg):
    cfg = quick_cfg(max_iter=6, extra=["SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "0"])
    first, _ = _train(cfg)
    assert open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")).read().strip() == "model_final.pth"
    cfg.SOLVER.MAX_ITER = 9
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6  # continues after the 6 finished iterations
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    resumed.train()
    assert resumed.iter == cfg.SOLVER.MAX_ITER  # ran iterations 6, 7, 8


def test_two_process_cpu_training(datasets_root, tmp_path):
    """`--num-gpus 2` on CPU: gloo + DDP without device_ids (detectron2's default would reject CPU modules)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            QUICK_STAGE0,
            "--num-gpus",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{port}",
            *tiny_quick_opts(out, max_iter=2),
            "SOLVER.IMS_PER_BATCH",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(out / "model_final.pth")
    assert "copypaste: Task: segm" in proc.stdout + proc.stderr


def test_gradient_accumulation_averages_micro_batches():
    """One iteration = GRAD_ACCUM_STEPS forwards and one optimizer step on the mean gradient."""
    from part_distillation.engine.accumulation import AccumulatingTrainer

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return {"loss": (self.w * x).sum()}

    model = Linear().train()
    batches = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 4.0])]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = AccumulatingTrainer(model, iter(batches * 2), optimizer, accum_steps=3)
    trainer.iter = 0
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        trainer.run_step()
    assert model.calls == 3
    # SGD step with lr 1 on the mean gradient (1, 2, 4) / 3
    assert torch.allclose(model.w.detach(), -torch.tensor([1.0, 2.0, 4.0]) / 3)


def test_gradient_accumulation_in_the_trainer(quick_cfg):
    cfg = quick_cfg(max_iter=3, extra=["SOLVER.GRAD_ACCUM_STEPS", "2", "TEST.EVAL_PERIOD", "0"])
    trainer, losses = _train(cfg)
    assert type(trainer._trainer).__name__ == "AccumulatingTrainer" and len(losses) == 3
    assert all(np.isfinite(losses))


def test_cpu_ddp_wrapper_is_scoped_to_trainer_construction():
    """DefaultTrainer.__init__ runs unchanged; only its create_ddp_model call gets device_ids=None (CPU), and
    detectron2's function is restored afterwards, also when construction fails."""
    from detectron2.engine import defaults

    from part_distillation.engine.trainer import _ddp_without_device_ids

    original = defaults.create_ddp_model
    with _ddp_without_device_ids(False):
        assert defaults.create_ddp_model is original
    with _ddp_without_device_ids(True):
        assert defaults.create_ddp_model.func is original and defaults.create_ddp_model.keywords == {"device_ids": None}
    assert defaults.create_ddp_model is original
    with pytest.raises(RuntimeError), _ddp_without_device_ids(True):
        raise RuntimeError("build failed")
    assert defaults.create_ddp_model is original
