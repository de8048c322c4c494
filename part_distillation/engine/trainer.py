"""The one Trainer used by every stage and head (selected by config, not by script)."""
import logging
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import build_detection_test_loader, build_detection_train_loader
from ..evaluation import build_evaluator
from ..utils.errors import ConfigError
from .accumulation import AccumulatingAMPTrainer, AccumulatingTrainer
from .optimizer import build_optimizer

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with registry-driven loaders/evaluators and Mask2Former's optimizer.

    Everything else (checkpointing, ``--resume``, EventStorage → JSON/TensorBoard logs, periodic
    evaluation, distributed training through ``launch``) is DefaultTrainer's.
    """

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, except for the DDP wrapper: detectron2
        # always passes device_ids=[local_rank], which DistributedDataParallel rejects for CPU modules,
        # so multi-process (gloo) training on CPU needs device_ids=None.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = cfg.MODEL.DEVICE == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        accum = cfg.SOLVER.GRAD_ACCUM_STEPS
        if accum < 1:
            raise ConfigError(f"SOLVER.GRAD_ACCUM_STEPS={accum}: use 1 (no accumulation) or more.")
        if accum == 1:
            self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        else:
            trainer_cls = AccumulatingAMPTrainer if cfg.SOLVER.AMP.ENABLED else AccumulatingTrainer
            self._trainer = trainer_cls(model, data_loader, optimizer, accum)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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

    def train(self):
        """Train; return the last evaluation's results (detectron2 returns them only with EXPECTED_RESULTS)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)
