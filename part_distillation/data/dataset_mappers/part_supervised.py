"""Supervised (and few-shot) training of the stage-4 model on a GT part dataset.

:class:`PartSupervisedDatasetMapper` feeds a ``*_parts_*`` dataset (e.g. ``toyparts_parts_train``,
``part_imagenet_parts_train``) to :class:`~part_distillation.modeling.meta_arch.distillation.PartDistillationModel`
exactly as :class:`PseudoLabelDatasetMapper` feeds it a stage-3 store: each record is converted in memory to the
store record of its GT parts (:func:`~part_distillation.data.gt_parts.gt_part_records`: objects with their class,
parts with their within-object index as ``part_class``, same-category parts of an object OR-ed) and then goes
through the pseudo-label mapper's own code (same LSJ / crop / flip augmentation, same redraws when no part
survives, same outputs). Targets::

    instances.gt_classes        = the part's index within its object class's parts (dataset metadata
                                  ``part_to_object``; e.g. toyparts "Car Window" -> 1)
    instances.gt_object_classes = the object class
    instances.gt_masks / gt_boxes / gt_object_index, object_masks  as PseudoLabelDatasetMapper

Differences from the pseudo-label mapper: parts are never dropped for being small (GT parts; the reference's
GT mappers keep them all — only parts that the crop empties are gone), and ``part_class`` always comes from
the GT. Differences from the reference's supervised mappers (reference code): those apply only a shortest-edge
resize + flip (their ``AUG_NAME_LIST`` is ignored, a [DIFF] with the supplement's "random crop/scale/flip");
here the stage-4 LSJ pipeline is used so that supervised, few-shot and distilled models see the same data
pipeline.

Evaluation uses :class:`~part_distillation.data.dataset_mappers.part_eval.PartEvalDatasetMapper` (GT objects
for conditioning) and the ``part_miou`` evaluator in mode "within_object", which maps the predicted
(object class, within-object index) back to the dataset's part ids.
"""

import logging

from detectron2.config import configurable
from detectron2.data import MetadataCatalog

from ...utils.errors import ConfigError
from ..gt_parts import gt_part_records, max_parts_per_object, object_part_lists, part_to_object_table
from ..pseudo_labels import record_to_dataset_dict
from .instance_lsj import build_lsj_augmentations
from .pseudo_label_mapper import PseudoLabelDatasetMapper
from .registry import DATASET_MAPPER_REGISTRY

__all__ = ["PartSupervisedDatasetMapper"]

logger = logging.getLogger(__name__)


def _train_part_to_object(cfg) -> list:
    """The ``part_to_object`` shared by every dataset of ``DATASETS.TRAIN`` (ConfigError if absent/different)."""
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ConfigError("PartSupervisedDatasetMapper: DATASETS.TRAIN is empty; name a GT part dataset.")
    tables = []
    for name in names:
        meta = MetadataCatalog.get(name)
        try:
            tables.append(part_to_object_table(meta))
        except ConfigError as e:
            raise ConfigError(
                f"PartSupervisedDatasetMapper trains on GT part datasets with object classes; DATASETS.TRAIN "
                f"names {name!r}: {e}"
            ) from None
    if any(t != tables[0] for t in tables[1:]):
        raise ConfigError(
            f"PartSupervisedDatasetMapper: the datasets of DATASETS.TRAIN {names} have different part_to_object "
            "tables (different part label spaces); train on one label space at a time."
        )
    return tables[0]


@DATASET_MAPPER_REGISTRY.register()
class PartSupervisedDatasetMapper(PseudoLabelDatasetMapper):
    """GT part-dataset dict → the pseudo-label mapper's ``{"image", "instances", "object_masks"}`` (module doc)."""

    @configurable
    def __init__(
        self, *, part_to_object, is_train: bool, augmentations: list, image_format: str, max_retries: int = 10
    ):
        """
        Args:
            part_to_object: the training datasets' part category → object class table (metadata).
            is_train, augmentations, image_format, max_retries: as :class:`PseudoLabelDatasetMapper`.
        """
        super().__init__(
            is_train=is_train,
            augmentations=augmentations,
            image_format=image_format,
            use_part_classes=True,
            min_part_area_ratio=0.0,  # GT parts: keep every part the augmentation leaves non-empty
            max_retries=max_retries,
        )
        self.part_to_object = list(part_to_object)
        self.object_parts = object_part_lists(self.part_to_object)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        part_to_object = _train_part_to_object(cfg)
        if "PART_DISTILLATION" in cfg.MODEL and cfg.MODEL.META_ARCHITECTURE == "PartDistillationModel":
            group = cfg.MODEL.PART_DISTILLATION
            parts, objects = max_parts_per_object(part_to_object), len(object_part_lists(part_to_object))
            if group.NUM_PART_CLASSES < parts:
                raise ConfigError(
                    f"MODEL.PART_DISTILLATION.NUM_PART_CLASSES={group.NUM_PART_CLASSES}, but an object class of "
                    f"{list(cfg.DATASETS.TRAIN)} has {parts} part classes; set it to at least {parts}."
                )
            if group.NUM_OBJECT_CLASSES < objects:
                raise ConfigError(
                    f"MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES={group.NUM_OBJECT_CLASSES}, but "
                    f"{list(cfg.DATASETS.TRAIN)} has {objects} object classes; set it to at least {objects}."
                )
        return {
            "part_to_object": part_to_object,
            "is_train": is_train,
            "augmentations": build_lsj_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def as_store_dict(self, dataset_dict: dict):
        """The pseudo-label dataset dict of ``dataset_dict``'s GT parts (None when it has no part)."""
        record = gt_part_records([dataset_dict], self.part_to_object, part_classes=True)[0]
        if record is None:
            return None
        out = record_to_dataset_dict(dict(record, index=-1))
        out.pop("pseudo_label_index", None)
        for key in ("image_id", "class_code"):
            if key in dataset_dict:
                out[key] = dataset_dict[key]
        return out

    def __call__(self, dataset_dict: dict):
        converted = self.as_store_dict(dataset_dict)
        if converted is None:
            if self.is_train:
                return None  # no GT part: nothing to learn; the loader draws another image
            converted = {k: v for k, v in dataset_dict.items() if k not in ("annotations", "object_annotations")}
        return super().__call__(converted)
