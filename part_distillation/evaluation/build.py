"""Evaluator dispatch on the dataset's ``evaluator_type`` metadata."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..utils.errors import ConfigError

__all__ = ["EVALUATOR_BUILDERS", "register_evaluator", "build_evaluator"]

# evaluator_type -> fn(cfg, dataset_name, output_folder) returning a DatasetEvaluator
EVALUATOR_BUILDERS = {}


def register_evaluator(evaluator_type: str):
    """Decorator: make ``fn`` the builder for datasets whose metadata says ``evaluator_type``."""

    def deco(fn):
        if evaluator_type in EVALUATOR_BUILDERS:
            raise KeyError(f"evaluator_type {evaluator_type!r} is already registered")
        EVALUATOR_BUILDERS[evaluator_type] = fn
        return fn

    return deco


@register_evaluator("coco")
def build_coco_evaluator(cfg, dataset_name, output_folder):
    # Mask2Former predicts masks; its boxes are derived from them, so only segm AP is meaningful.
    return COCOEvaluator(dataset_name, tasks=("segm",), distributed=True, output_dir=output_folder)


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """One evaluator (or a DatasetEvaluators of several) for ``dataset_name``.

    The dataset's ``evaluator_type`` metadata is a registry key or a list of them; a non-empty
    ``TEST.EVALUATOR_TYPE`` overrides it (e.g. "part_proposal" for a part dataset registered as "coco").
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    types = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    override = cfg.TEST.get("EVALUATOR_TYPE", "")
    if override:
        types = override
    if types is None:
        raise ConfigError(
            f"Dataset {dataset_name!r} has no 'evaluator_type' metadata; set it when registering the dataset "
            f"(one of: {', '.join(sorted(EVALUATOR_BUILDERS))})."
        )
    types = [types] if isinstance(types, str) else list(types)
    evaluators = []
    for t in types:
        if t not in EVALUATOR_BUILDERS:
            known = ", ".join(sorted(EVALUATOR_BUILDERS))
            raise ConfigError(
                f"Dataset {dataset_name!r} has evaluator_type {t!r}, which is not registered; known: {known}."
            )
        evaluators.append(EVALUATOR_BUILDERS[t](cfg, dataset_name, output_folder))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
