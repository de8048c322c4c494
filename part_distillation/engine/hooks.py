"""Training hooks of the one Trainer."""

import logging

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.dataset_mappers import build_dataset_mapper
from ..utils.data_vis import draw_predictions, image_to_rgb

__all__ = ["PredictionImagesHook"]

logger = logging.getLogger(__name__)


class PredictionImagesHook(HookBase):
    """Pictures of the model's predictions on the first ``num_images`` images of ``dataset_name``, put into the
    EventStorage (``put_image``: TensorBoard's "images" tab through detectron2's TensorboardXWriter) at every
    evaluation (``TEST.EVAL_PERIOD``) and after the last iteration; also logged to Weights & Biases when
    ``use_wandb`` and the ``wandb`` package is installed and a run is active.

    Runs on the main process only, with the model in eval mode, outside ``forward``'s training path.
    """

    def __init__(self, cfg, dataset_name: str, num_images: int, period: int, use_wandb: bool = False):
        self._cfg = cfg.clone()
        self._dataset_name = dataset_name
        self._num_images = num_images
        self._period = period
        self._inputs = None
        self._wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                logger.warning(
                    "VIS.WANDB is set but wandb is not installed: prediction pictures go to TensorBoard only."
                )
            else:
                self._wandb = wandb

    def _load_inputs(self):
        mapper = build_dataset_mapper(self._cfg, is_train=False)
        records = DatasetCatalog.get(self._dataset_name)[: self._num_images]
        self._inputs = [x for x in (mapper(r) for r in records) if x is not None and "image" in x]

    @torch.no_grad()
    def put_images(self):
        if not comm.is_main_process() or self._num_images <= 0:
            return
        if self._inputs is None:
            self._load_inputs()
        model = self.trainer.model
        model = getattr(model, "module", model)  # DDP
        was_training = model.training
        model.eval()
        try:
            for i, x in enumerate(self._inputs):
                output = model([x])[0]
                rgb = image_to_rgb(x["image"].permute(1, 2, 0).numpy(), self._cfg.INPUT.FORMAT)
                picture = draw_predictions(rgb, output)
                name = f"predictions/{self._dataset_name}/{i}"
                self.trainer.storage.put_image(
                    name, torch.from_numpy(np.ascontiguousarray(picture.transpose(2, 0, 1))).float() / 255.0
                )
                if self._wandb is not None and getattr(self._wandb, "run", None) is not None:
                    self._wandb.log({name: self._wandb.Image(picture)}, step=self.trainer.iter)
        finally:
            model.train(was_training)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self.put_images()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.put_images()
