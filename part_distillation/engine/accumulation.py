"""Gradient accumulation: one detectron2 iteration = GRAD_ACCUM_STEPS micro-batches, one optimizer step.

It reaches the paper's batch (PartDistillation supp. §2: 128; the reference script: 256 for distillation) on fewer GPUs:
effective batch = SOLVER.IMS_PER_BATCH × SOLVER.GRAD_ACCUM_STEPS, with the same learning rate.
DDP synchronises gradients only on the last micro-batch.
"""

import contextlib
import time

from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["AccumulatingTrainer", "AccumulatingAMPTrainer"]


class _AccumulationMixin:
    """Shared ``run_step``; the trainer classes below supply ``_forward``, ``_backward`` and ``_step``."""

    accum_steps = 1

    def run_step(self):
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        self.optimizer.zero_grad()
        data_time, logged = 0.0, {}
        for micro in range(self.accum_steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = micro == self.accum_steps - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss_dict = self._forward(data)
                self._backward(sum(loss_dict.values()) / self.accum_steps)
            for k, v in loss_dict.items():
                logged[k] = logged.get(k, 0.0) + v.detach() / self.accum_steps
        self.after_backward()
        self._write_metrics(logged, data_time)
        self._step()


class AccumulatingTrainer(_AccumulationMixin, SimpleTrainer):
    def __init__(self, model, data_loader, optimizer, accum_steps: int):
        super().__init__(model, data_loader, optimizer)
        self.accum_steps = int(accum_steps)

    def _forward(self, data):
        return self.model(data)

    def _backward(self, losses):
        losses.backward()

    def _step(self):
        self.optimizer.step()


class AccumulatingAMPTrainer(_AccumulationMixin, AMPTrainer):
    def __init__(self, model, data_loader, optimizer, accum_steps: int):
        super().__init__(model, data_loader, optimizer)
        self.accum_steps = int(accum_steps)

    def _forward(self, data):
        import torch

        with torch.autocast("cuda", dtype=self.precision):
            return self.model(data)

    def _backward(self, losses):
        self.grad_scaler.scale(losses).backward()

    def _step(self):
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
