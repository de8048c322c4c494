"""The one Trainer used by every stage and head (selected by config, not by script)."""
from detectron2.engine import DefaultTrainer

from ..data import build_detection_test_loader, build_detection_train_loader
from ..evaluation import build_evaluator
from .optimizer import build_optimizer

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with registry-driven loaders/evaluators and Mask2Former's optimizer.

    Everything else (checkpointing, ``--resume``, EventStorage → JSON/TensorBoard logs, periodic
    evaluation, distributed training through ``launch``) is DefaultTrainer's.
    """

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def train(self):
        """Train; return the last evaluation's results (detectron2 returns them only with EXPECTED_RESULTS)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)
