"""The one Trainer used by every stage and head (selected by config, not by script)."""
import contextlib
import functools
import logging

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from ..data import build_detection_test_loader, build_detection_train_loader
from ..evaluation import build_evaluator
from ..utils.errors import ConfigError
from .accumulation import AccumulatingAMPTrainer, AccumulatingTrainer
from .optimizer import build_optimizer

__all__ = ["Trainer"]


@contextlib.contextmanager
def _ddp_without_device_ids(enabled: bool):
    """While ``enabled``, DefaultTrainer's DDP wrapper gets ``device_ids=None``.

    detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which
    ``DistributedDataParallel`` rejects for CPU modules, so multi-process (gloo) training on CPU needs
    ``device_ids=None``. Only that one call changes: the rest of ``DefaultTrainer.__init__`` runs as
    detectron2 wrote it (a rename upstream fails here loudly, it cannot diverge silently).
    """
    if not enabled:
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with registry-driven loaders/evaluators and Mask2Former's optimizer.

    Everything else (checkpointing, ``--resume``, EventStorage → JSON/TensorBoard logs, periodic
    evaluation, distributed training through ``launch``) is DefaultTrainer's.
    """

    def __init__(self, cfg):
        accum = cfg.SOLVER.GRAD_ACCUM_STEPS
        if accum < 1:
            raise ConfigError(f"SOLVER.GRAD_ACCUM_STEPS={accum}: use 1 (no accumulation) or more.")
        with _ddp_without_device_ids(cfg.MODEL.DEVICE == "cpu"):
            super().__init__(cfg)
        if accum > 1:
            # Same model, loader and optimizer in a trainer that steps every ``accum`` micro-batches.
            # The hooks read them through ``self`` (e.g. ``self.optimizer``), so swapping is safe here.
            base = self._trainer
            trainer_cls = AccumulatingAMPTrainer if cfg.SOLVER.AMP.ENABLED else AccumulatingTrainer
            self._trainer = trainer_cls(base.model, base.data_loader, base.optimizer, accum)

    def resume_or_load(self, resume=True):
        """DefaultTrainer's, then a resumed run's shard-window sampler (data/store_dataset.py) skips the images
        the first ``start_iter`` iterations drew on this rank, instead of replaying the order from the start."""
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "resumable_sampler", None)
        if sampler is not None and self.start_iter > 0:
            per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size() * self.cfg.SOLVER.GRAD_ACCUM_STEPS
            sampler.set_start(self.start_iter * per_rank)
            logging.getLogger(__name__).info(
                "Resuming the store's training order after %d images per rank", self.start_iter * per_rank
            )

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

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # DeepLab's builder = detectron2's schedulers + "WarmupPolyLR" (SOLVER.POLY_LR_POWER; Choudhury et al.: 0.9)
        from detectron2.projects.deeplab import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        """DefaultTrainer's hooks, plus prediction pictures for TensorBoard (``VIS.NUM_PREDICTION_IMAGES``),
        placed before the writer so that they are written at the same step."""
        hooks = super().build_hooks()
        if self.cfg.VIS.NUM_PREDICTION_IMAGES > 0 and self.cfg.DATASETS.TEST:
            from .hooks import PredictionImagesHook

            vis = PredictionImagesHook(self.cfg, self.cfg.DATASETS.TEST[0], self.cfg.VIS.NUM_PREDICTION_IMAGES,
                                       self.cfg.TEST.EVAL_PERIOD, self.cfg.VIS.WANDB)  # fmt: skip
            hooks.insert(len(hooks) - 1 if comm.is_main_process() else len(hooks), vis)
        return hooks

    def train(self):
        """Train; return the last evaluation's results (detectron2 returns them only with EXPECTED_RESULTS)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)
