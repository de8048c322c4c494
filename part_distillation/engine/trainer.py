"""The one Trainer used by every stage and head (selected by config, not by script)."""

import contextlib
import functools
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from ..data import build_detection_test_loader, build_detection_train_loader
from ..evaluation import build_evaluator
from ..utils.errors import ConfigError, UserError
from .accumulation import AccumulatingAMPTrainer, AccumulatingTrainer
from .checks import check_object_classes, object_class_count
from .optimizer import build_optimizer
from .skip_aware import SkipAwareModel, wrap_evaluators

__all__ = ["Trainer", "CheckedCheckpointer", "TrainingDivergedError"]

# Test batches read (no model) before evaluating a model conditioned on object classes: enough to tell a split
# without classes from one with a few unclassed objects, cheap next to the evaluation.
OBJECT_CLASS_CHECK_BATCHES = 16


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite: training stopped (the message names the iteration and last checkpoint)."""


class CheckedCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose unreadable files (truncated, not a checkpoint) raise a one-line
    :class:`ConfigError` naming the file, instead of torch's unpickling traceback."""

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except (OSError, EOFError, RuntimeError, ValueError) as e:
            raise ConfigError(_unreadable_checkpoint(filename, e)) from None
        except Exception as e:  # pickle.UnpicklingError and friends
            if type(e).__module__ in ("pickle", "_pickle", "zipfile"):
                raise ConfigError(_unreadable_checkpoint(filename, e)) from None
            raise


def _unreadable_checkpoint(filename, e):
    # torch's own message may advise loading with weights_only=False: never do that for a file of unknown origin
    return (
        f"checkpoint {filename} cannot be read ({type(e).__name__}); it is truncated or not a checkpoint: delete it "
        "(--resume then uses the previous one) or point MODEL.WEIGHTS at a model_final.pth written by train_net.py."
    )


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
        # unreadable checkpoint files: one line, not torch's traceback (same object: the checkpoint hook holds it)
        self.checkpointer.__class__ = CheckedCheckpointer

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
        return wrap_evaluators(build_evaluator(cfg, dataset_name, output_folder))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test loop; unreadable images are skipped and counted, never replaced (engine/skip_aware.py).

        A model with per-object-class part classifiers is refused on a split whose first test batches have no object
        with a class (it would predict no part and score 0 everywhere: :func:`check_object_classes`)."""
        num_object_classes = object_class_count(model)
        if num_object_classes:
            for name in cfg.DATASETS.TEST:
                check_object_classes(cfg, name, num_object_classes, max_batches=OBJECT_CLASS_CHECK_BATCHES)
        if evaluators is not None:
            evaluators = [wrap_evaluators(e) for e in (evaluators if isinstance(evaluators, list) else [evaluators])]
        return super().test(cfg, SkipAwareModel(model), evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # DeepLab's builder = detectron2's schedulers + "WarmupPolyLR" (SOLVER.POLY_LR_POWER; Choudhury et al.: 0.9)
        from detectron2.projects.deeplab import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:  # detectron2's check of the reduced loss, after each step
            self._stop_diverged(str(e).splitlines()[-1].strip())
            raise
        except ValueError as e:
            # Mask2Former's Hungarian matcher (scipy) meets NaN costs before any loss is computed
            if "invalid numeric entries" not in str(e):
                raise
            self._stop_diverged("the matching cost is NaN: predictions or loss weights are not finite")
            raise FloatingPointError(str(e)) from None

    def _stop_diverged(self, why):
        self._diverged = why
        # the end-of-training hooks save model_final and evaluate when iter + 1 >= max_iter: a diverged
        # model must not become model_final, so push max_iter out of their reach
        self.max_iter = self.iter + 2 + 10**9

    def build_hooks(self):
        """DefaultTrainer's hooks, plus prediction pictures for TensorBoard (``VIS.NUM_PREDICTION_IMAGES``),
        placed before the writer so that they are written at the same step."""
        hooks = super().build_hooks()
        if self.cfg.VIS.NUM_PREDICTION_IMAGES > 0 and self.cfg.DATASETS.TEST:
            from .hooks import PredictionImagesHook

            vis = PredictionImagesHook(
                self.cfg,
                self.cfg.DATASETS.TEST[0],
                self.cfg.VIS.NUM_PREDICTION_IMAGES,
                self.cfg.TEST.EVAL_PERIOD,
                self.cfg.VIS.WANDB,
            )
            hooks.insert(len(hooks) - 1 if comm.is_main_process() else len(hooks), vis)
        return hooks

    def train(self):
        """Train; return the last evaluation's results (detectron2 returns them only with EXPECTED_RESULTS).

        A non-finite loss stops training with :class:`TrainingDivergedError` naming the iteration and the last
        checkpoint (no model_final is written for the diverged model)."""
        from ..data.skips import skip_counts

        self._diverged = None
        skips_before = skip_counts()
        # detectron2 logs every training exception with its traceback; a divergence gets the one line below
        quiet = _DropRecordIf(lambda record: self._diverged is not None and record.exc_info is not None)
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        train_loop_logger.addFilter(quiet)
        try:
            results = super().train()
        except FloatingPointError:
            if self._diverged is None:
                raise
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            raise TrainingDivergedError(
                f"training stopped: the loss is not finite at iteration {self.iter} ({self._diverged}); last "
                f"checkpoint: {last or 'none (nothing saved yet)'}. Lower SOLVER.BASE_LR or enable "
                "SOLVER.CLIP_GRADIENTS, then rerun (with --resume to continue from that checkpoint)."
            ) from None
        finally:
            train_loop_logger.removeFilter(quiet)
            skipped = {k: v - skips_before.get(k, 0) for k, v in skip_counts().items() if v > skips_before.get(k, 0)}
            if skipped:  # counted in this process (with DATALOADER.NUM_WORKERS > 0 the workers log their own)
                logging.getLogger(__name__).warning(
                    "Samples skipped or dropped during training, by reason: %s", skipped
                )
        return results if results is not None else getattr(self, "_last_eval_results", None)


class _DropRecordIf(logging.Filter):
    def __init__(self, predicate):
        super().__init__()
        self.predicate = predicate

    def filter(self, record):
        return not self.predicate(record)
