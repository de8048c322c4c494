"""Checks that a stage's config can produce the model it documents, before anything heavy runs.

Every checkpoint file a config names is checked here too (:func:`check_checkpoints`, run by ``check_runtime``
for every tool): it must exist and look like a PyTorch/pickle file.

A stage whose checkpoints would leave a *frozen* module random (PartDistillation, Cho et al. 2023, freezes the
backbone and the pixel-decoder encoder from stage 2 on; stage 1 groups frozen backbone features; stage 3 ranks
with the frozen stage-2 model) stops with one ``error:`` line naming the key and the file to give it. Each stage's
config names, by default, the conventional output of the stage before it (``output/stage0_instance/...``), so a
missing file is reported with the command that writes it.

:func:`resolve_stage_config` fills the values that come from the data (the number of object classes of a store
whose objects carry ImageNet synsets), and refuses labelling an image-level-labelled dataset with ground-truth
objects it does not have.

:func:`check_object_classes` refuses evaluating a model with per-object-class part classifiers on a split whose
objects have no object class (it would predict no part and score 0 on every metric).
"""

import logging
import os

import torch

from detectron2.data import MetadataCatalog

from ..utils.errors import ConfigError

__all__ = [
    "check_checkpoints",
    "check_checkpoint_file",
    "check_stage_weights",
    "check_object_source",
    "resolve_stage_config",
    "object_class_count",
    "check_object_classes",
    "PRODUCERS",
]

logger = logging.getLogger(__name__)

# Conventional output folder of a stage → the command that writes it (for the error messages).
PRODUCERS = {
    "output/stage0_instance": "tools/train_net.py --config-file configs/stage0_instance.yaml",
    "output/stage2_proposals": "tools/train_net.py --config-file configs/stage2_proposals.yaml",
    "output/stage4_distillation": "tools/train_net.py --config-file configs/stage4_distillation.yaml",
}
# Models whose forward pass is labelling (never trained): every module they use must be loaded.
_LABELLING = ("PixelGroupingModel", "PartRankingModel")
_MASK2FORMER_FAMILY = ("Mask2Former", "ProposalModel", "PartRankingModel", "PartDistillationModel")
# Config keys naming a checkpoint file to load, whatever the model; checked before any model is built.
_CHECKPOINT_KEYS = ("MODEL.WEIGHTS", "MODEL.PROPOSAL.INIT_FROM", "MODEL.PART_DISTILLATION.INIT_FROM")


def _is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def _missing_file_message(key: str, path: str) -> str:
    norm = os.path.normpath(path).replace(os.sep, "/")
    for prefix, command in PRODUCERS.items():
        if norm.startswith(prefix + "/"):
            return f"{key}={path!r} does not exist: run that stage first ({command}) or set {key} to an existing file."
    return f'{key}={path!r} does not exist: give an existing checkpoint file (see MODEL_ZOO.md) or set {key} "".'


def _cfg_value(cfg, key):
    node = cfg
    for k in key.split("."):
        node = node.get(k) if hasattr(node, "get") else None
    return node


def check_checkpoint_file(path: str, key: str) -> None:
    """One-line :class:`ConfigError` if checkpoint ``path`` (given by config ``key``) is missing or is not a
    checkpoint: a PyTorch file is a zip archive (``torch.save``) or a pickle (legacy ``torch.save``,
    detectron2's model-zoo ``.pkl``), so the first bytes and the zip directory tell a truncated or
    unrelated file apart without unpickling anything."""
    import zipfile

    if not os.path.isfile(path):
        raise ConfigError(_missing_file_message(key, path))
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        ok = zipfile.is_zipfile(path)
    else:
        ok = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # pickle protocol 2..5
    if not ok:
        what = (
            "empty"
            if not head
            else ("a truncated zip archive" if head.startswith(b"PK") else "not a PyTorch/pickle file")
        )
        raise ConfigError(
            f"{key}={path!r} is not a readable checkpoint ({what}); re-download it or point {key} at a "
            "model_final.pth written by tools/train_net.py (or a model-zoo .pkl)."
        )


def check_checkpoints(cfg) -> None:
    """:func:`check_checkpoint_file` for every local path in :data:`_CHECKPOINT_KEYS` (URLs are left to the
    checkpointer)."""
    for key in _CHECKPOINT_KEYS:
        path = _cfg_value(cfg, key)
        if isinstance(path, str) and _is_local(path):
            check_checkpoint_file(path, key)


def _backbone_self_initialised(cfg) -> bool:
    """The backbone loads its own ImageNet weights when built (bundled EfficientNet-Lite0, a ViT WEIGHTS file), or has
    none to load (raw RGB)."""
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_raw_rgb_backbone":  # no weights at all: the raw-RGB baseline
        return True
    if "efficientnet" in name:
        return bool(cfg.MODEL.EFFICIENTNET.PRETRAINED)
    if "vit" in name.lower():
        return bool(cfg.MODEL.VIT.WEIGHTS)
    return False


def _sources(cfg):
    """{module: [config keys that load it]} for the Mask2Former-family models (see each model's loader)."""
    weights = ["MODEL.WEIGHTS"] if cfg.MODEL.WEIGHTS else []
    arch = cfg.MODEL.META_ARCHITECTURE
    backbone, encoder = list(weights), list(weights)
    if arch == "ProposalModel" and cfg.MODEL.PROPOSAL.INIT_FROM:  # pixel decoder + transformer decoder
        encoder.append("MODEL.PROPOSAL.INIT_FROM")
    if arch == "PartDistillationModel" and cfg.MODEL.PART_DISTILLATION.INIT_FROM:  # backbone + sem_seg_head
        backbone.append("MODEL.PART_DISTILLATION.INIT_FROM")
        encoder.append("MODEL.PART_DISTILLATION.INIT_FROM")
    if _backbone_self_initialised(cfg):
        backbone.append("MODEL.BACKBONE (pretrained)")
    return {"backbone": backbone, "encoder": encoder}


def _give_hint(cfg, module: str) -> str:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "ProposalModel":
        return (
            "MODEL.WEIGHTS output/stage0_instance/model_final.pth (the stage-0 instance model, or the COCO "
            "Mask2Former checkpoint)" + (" and MODEL.PROPOSAL.INIT_FROM the same file" if module == "encoder" else "")
        )
    if arch == "PartDistillationModel":
        return "MODEL.PART_DISTILLATION.INIT_FROM output/stage2_proposals/model_final.pth (the stage-2 model)"
    return "MODEL.WEIGHTS (a checkpoint holding this module)"


def check_stage_weights(cfg, eval_only: bool = False, resume: bool = False) -> None:
    """Raise :class:`ConfigError` when a frozen or labelling module would stay random, or a named file is missing."""
    arch = cfg.MODEL.META_ARCHITECTURE
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    files = [("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)] if not resuming else []
    if arch == "ProposalModel":
        files.append(("MODEL.PROPOSAL.INIT_FROM", cfg.MODEL.PROPOSAL.INIT_FROM))
    if arch == "PartDistillationModel":
        files.append(("MODEL.PART_DISTILLATION.INIT_FROM", cfg.MODEL.PART_DISTILLATION.INIT_FROM))
    pg = cfg.MODEL.PIXEL_GROUPING
    object_model = arch == "PixelGroupingModel" and pg.OBJECT_MASK_SOURCE in ("model", "detic")
    if object_model:
        files += [
            ("MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG", pg.OBJECT_MODEL_CONFIG),
            ("MODEL.PIXEL_GROUPING.OBJECT_MODEL_WEIGHTS", pg.OBJECT_MODEL_WEIGHTS),
        ]
    for key, path in files:
        if _is_local(path) and not os.path.isfile(path):
            raise ConfigError(_missing_file_message(key, path))

    if arch in ("PixelGroupingModel", "ClassPixelGroupingModel"):
        if not cfg.MODEL.WEIGHTS and not _backbone_self_initialised(cfg):
            raise ConfigError(
                f"{arch} groups the features of a random backbone: set MODEL.WEIGHTS to a checkpoint with the backbone "
                "(output/stage0_instance/model_final.pth or the COCO Mask2Former checkpoint)."
            )
        if object_model and not pg.OBJECT_MODEL_WEIGHTS:
            if not pg.OBJECT_MODEL_CONFIG:
                raise ConfigError(
                    f"MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE={pg.OBJECT_MASK_SOURCE!r} needs "
                    "MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG and OBJECT_MODEL_WEIGHTS."
                )
            # the object config's own MODEL.WEIGHTS is checked when the object model is built
        return
    if arch == "PartRankingModel":
        if not cfg.MODEL.WEIGHTS:
            raise ConfigError(
                "stage 3 ranks with the stage-2 model: set MODEL.WEIGHTS to its checkpoint, e.g. "
                "output/stage2_proposals/model_final.pth."
            )
        return
    if eval_only or resuming or arch not in _MASK2FORMER_FAMILY:
        return
    sources = _sources(cfg)
    for freeze_key in cfg.MODEL.MASK_FORMER.FREEZE_KEYS:
        module = "backbone" if "backbone" in freeze_key else "encoder" if "encoder" in freeze_key else None
        if module is not None and not sources[module]:
            raise ConfigError(
                f"MODEL.MASK_FORMER.FREEZE_KEYS freezes the {module} but no checkpoint initialises it, so it would be "
                f"trained random-and-frozen: set {_give_hint(cfg, module)}, or drop {freeze_key!r} from FREEZE_KEYS."
            )


def _store_of(name: str):
    meta = MetadataCatalog.get(name)
    root, source, stage = (
        meta.get(k, None) for k in ("pseudo_label_root", "pseudo_label_source", "pseudo_label_stage")
    )
    return os.path.join(root, source, stage) if root and source and stage else None


def _store_num_classes(name: str):
    from ..data.object_classes import read_store_classes

    directory = _store_of(name)
    data = read_store_classes(directory) if directory else None
    return len(data["class_codes"]) if data else None


def check_object_source(cfg) -> None:
    """``OBJECT_MASK_SOURCE gt`` on a dataset with image-level labels only (an ImageNet folder) is an error."""
    if cfg.MODEL.META_ARCHITECTURE in ("PixelGroupingModel", "ClassPixelGroupingModel") and (
        cfg.MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE == "gt"
    ):
        for name in cfg.DATASETS.TEST:
            if MetadataCatalog.get(name).get("image_level_labels", False):
                raise ConfigError(
                    f"MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE='gt' but {name} has image-level labels only (no object "
                    "masks): set OBJECT_MASK_SOURCE model with OBJECT_MODEL_CONFIG/OBJECT_MODEL_WEIGHTS (stage 0), or "
                    "detic, or json."
                )


def resolve_stage_config(cfg) -> None:
    """Fill data-dependent values of ``cfg`` (not frozen) and refuse impossible stage/dataset pairs.

    * ``MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES 0``: one part classifier per object class of the training store
      (its ``object_classes.json``); ``MODEL.PART_RANKING.NUM_OBJECT_CLASSES 0`` likewise for the ranked store.
    * ``MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE gt`` on an image-level-labelled dataset (no object annotations).

    Pseudo-label stores must be registered (``setup_cfg`` registers them before calling this).
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    check_object_source(cfg)
    group = cfg.MODEL.PART_DISTILLATION
    if arch == "PartDistillationModel" and group.NUM_OBJECT_CLASSES == 0:
        n = _store_num_classes(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        if not n:
            raise ConfigError(
                "MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES is 0 (= the object classes of the training store) but "
                f"DATASETS.TRAIN={tuple(cfg.DATASETS.TRAIN)} names no pseudo-label store with object_classes.json; "
                "set NUM_OBJECT_CLASSES to the number of object classes."
            )
        group.NUM_OBJECT_CLASSES = n
        logger.info("MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES = %d (the classes of %s)", n, cfg.DATASETS.TRAIN[0])
    if arch == "PartRankingModel" and cfg.MODEL.PART_RANKING.NUM_OBJECT_CLASSES == 0 and cfg.DATASETS.TEST:
        n = _store_num_classes(cfg.DATASETS.TEST[0])
        if n:
            cfg.MODEL.PART_RANKING.NUM_OBJECT_CLASSES = n


def object_class_count(model) -> int:
    """N_c^o of a model whose part predictions need each object's class (:class:`PartDistillationModel`: one part
    classifier per object class, PartDistillation supp. Eq. 6), else 0."""
    from ..modeling.meta_arch.distillation import PartDistillationModel

    for _ in range(
        3
    ):  # the model itself, or inside DistributedDataParallel (.module) / the skip-aware wrapper (.model)
        if isinstance(model, PartDistillationModel):
            return int(model.part_classifier.num_object_classes)
        model = getattr(model, "module", None) or getattr(model, "model", None)
    return 0


def check_object_classes(cfg, dataset_name: str, num_object_classes: int, max_batches=None):
    """``(unclassed, total)`` objects of ``dataset_name``'s test inputs (the test mapper's ``objects.gt_classes``)
    whose class is outside [0, ``num_object_classes``): a model conditioned on the object class predicts no part
    for them.

    Raises :class:`ConfigError` when no object of the split has a class: the model would score 0 on every metric, a
    silent wrong result. Reads the test inputs, no model; with ``max_batches`` it stops after that many batches once
    one object with a class was seen, or when none had objects (counts are then of what was read), so only a split
    that looks unclassed is read to the end. A few unclassed objects are not an error here: the model counts each
    as an ``object_without_class`` skip when it runs. With several processes each reads its own share of the split
    (detectron2's InferenceSampler) and the counts are summed over all of them before deciding, so every rank
    raises or none does (call it on every rank).
    """
    from detectron2.utils import comm

    from ..data.build import build_detection_test_loader

    unclassed = total = 0
    for i, batch in enumerate(build_detection_test_loader(cfg, dataset_name)):
        if max_batches is not None and i >= max_batches and (unclassed < total or total == 0):
            break
        for x in batch:
            objects = x.get("objects") if x is not None else None
            if objects is None:
                continue
            classes = objects.gt_classes if objects.has("gt_classes") else torch.full((len(objects),), -1)
            total += len(classes)
            unclassed += int(((classes < 0) | (classes >= num_object_classes)).sum())
    if comm.get_world_size() > 1:
        counts = comm.all_gather((unclassed, total))
        unclassed, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if total and unclassed == total:
        raise ConfigError(
            f"{dataset_name}: none of its {total} objects has an object class in [0, {num_object_classes}), so a model "
            "with per-object-class part classifiers predicts no part and would score 0: give the records "
            "object_annotations with a category_id (as toyparts_landmarks_* have), the dataset's metadata a "
            "part_to_object table, or set TEST.OBJECT_CLASS_MAP for a zero-shot split."
        )
    return unclassed, total
