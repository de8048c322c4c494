"""Labelling drivers: how inference becomes a pseudo-label store (stages 1 and 3), shared by the tools.

* :func:`label_dataset` (``tools/make_pseudo_labels.py``, stage 1; also stage-0/Detic object sources): the
  model runs through detectron2's ``inference_on_dataset`` with a writer-"evaluator", so labelling is
  distributed like evaluation: rank r of W labels shards r, r+W, ... of DATASETS.TEST[0] and writes them
  atomically to ``DATASETS.PSEUDO_LABEL_ROOT/<dataset>/<stage>``; ``resume`` keeps finished shards. At the
  end rank 0 evaluates AR@k of the pseudo-parts against GT parts when MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET
  names a dataset with part annotations, and renders ``vis`` overlays to OUTPUT_DIR/vis.
* :func:`rank_and_label` (``tools/rank_parts.py``, stage 3 and the one-stage baseline), in two passes:

  1. Cluster pass: a model with the prototype protocol (:data:`PROTOTYPE_MODELS`) runs over DATASETS.TEST[0]
     (rank r of W takes images r, r+W, ...) and keeps, per object, its parts with their features (the
     ranking model: parts passing τr/τs with their query features). The (object class, feature) pairs are
     all-gathered and put in dataset order, then each object class is clustered into
     ``MODEL.PART_RANKING.NUM_CLUSTERS`` prototypes with
     :func:`~part_distillation.clustering.prototypes.cluster_prototypes` ("l2", best of
     ``KMEANS_N_INIT`` k-means++ restarts). Classes are sharded over the ranks (one deterministic K-means per
     class), the results are all-gathered and rank 0 saves ``OUTPUT_DIR/prototypes.pth`` atomically:
     ``{"prototypes": [C, K, D], "num_clusters": [C], "num_features": [C]}`` (rows beyond a class's
     ``num_clusters`` are zeros; the format is owned by :mod:`part_distillation.clustering.prototypes`).
     ``resume`` reuses an existing prototypes file.
  2. Labelling pass: the same model with the prototypes assigns every kept part its prototype id
     (``part_class``) and soft scores, written through the writer-evaluator like stage 1. When
     DATASETS.TEST[0] is itself a pseudo-label dataset (``<source>_pseudo_<stage>``), the result is the store
     ``<root>/<source>/<stage>``.

Both record :func:`label_config` (the config groups that change the labels) as the store's identity, so a
resumed run with other labels is refused.
"""

import json
import logging
import os

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils import comm
from tabulate import tabulate

from ..clustering.prototypes import (
    DEFAULT_FILENAME,
    cluster_prototypes,
    load_prototypes,
    save_prototypes,
)
from ..data import build_labelling_loader
from ..data.build import check_dataset_names
from ..data.dataset_mappers import build_dataset_mapper
from ..data.pseudo_labels import PseudoLabelReader, PseudoLabelWriter, decode_mask
from ..data.visualization import render_pseudo_labels
from ..evaluation.proposal_ar import ProposalAREvaluator
from ..evaluation.pseudo_label_writer import PseudoLabelWriterEvaluator
from ..utils.errors import ConfigError
from .skip_aware import SkipAwareModel  # noqa: F401 (also exported from here)

__all__ = [
    "LABEL_KEYS",
    "PROTOTYPE_MODELS",
    "SkipAwareModel",
    "label_config",
    "evaluate_store_ar",
    "label_dataset",
    "collect_features",
    "gather_features",
    "cluster_prototypes",
    "save_prototypes",
    "num_object_classes",
    "rank_and_label",
]

logger = logging.getLogger(__name__)

# Config groups that change the labels; only these define a store's identity for resume.
LABEL_KEYS = ("MODEL", "INPUT", "DATASETS.TEST")
# Models with the prototype protocol: a cluster pass (outputs carry features per object), set_prototypes(),
# then a labelling pass whose parts carry pred_classes (prototype ids) and soft_scores.
PROTOTYPE_MODELS = ("PartRankingModel", "ClassPixelGroupingModel")


def label_config(cfg) -> dict:
    """The part of the config that determines the labels (not OUTPUT_DIR, logging, ...)."""
    out = {}
    for key in LABEL_KEYS:
        node = cfg
        for k in key.split("."):
            node = node[k]
        out[key] = json.loads(json.dumps(node, default=list))  # CfgNode/tuples → plain JSON
    return out


def evaluate_store_ar(reader: PseudoLabelReader, parts_dataset: str) -> dict:
    """AR@k of the stored part segments against the GT parts of the same images."""
    evaluator = ProposalAREvaluator(parts_dataset, distributed=False)
    evaluator.reset()
    gt_ids = {r["image_id"] for r in DatasetCatalog.get(parts_dataset)}
    for record in reader:
        if record["image_id"] not in gt_ids:
            raise ConfigError(
                f"MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET={parts_dataset!r} has no image {record['image_id']!r} of "
                "the labelled dataset; name the part view of the same images (e.g. toyparts_parts_train for "
                'toyparts_train) or set it to "" to skip the evaluation.'
            )
        parts = [p for obj in record["objects"] for p in obj["parts"]]
        h, w = record["height"], record["width"]
        masks = (
            torch.from_numpy(np.stack([decode_mask(p["segmentation"]) for p in parts]))
            if parts
            else torch.zeros((0, h, w), dtype=torch.bool)
        )
        scores = torch.tensor([p["score"] for p in parts], dtype=torch.float32)
        evaluator.process(
            [{"image_id": record["image_id"]}], [{"instances": Instances((h, w), pred_masks=masks, scores=scores)}]
        )
    return evaluator.evaluate()["part_proposals"]


def _write_store(cfg, model, loader, writer):
    """Run ``model`` over ``loader`` with the store writer as the evaluator; the run summary on the main process,
    None elsewhere (skipped images are counted, not fatal, up to ``DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION``)."""
    results = inference_on_dataset(
        SkipAwareModel(model),
        loader,
        PseudoLabelWriterEvaluator(writer, max_skipped_fraction=cfg.DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION),
    )
    return results["pseudo_labels"] if comm.is_main_process() else None


def label_dataset(cfg, *, stage: str = "grouping", shard_size: int = 1000, resume: bool = False, vis: int = 0) -> dict:
    """Stage 1 (``tools/make_pseudo_labels.py``): label ``DATASETS.TEST[0]`` with the config's model into the store
    ``DATASETS.PSEUDO_LABEL_ROOT/<dataset>/<stage>`` (module doc). Returns rank 0's summary ({} on other ranks).

    Args:
        stage: store name of this labelling stage.
        shard_size: images per shard (fixed per store; a multiple of ``DATALOADER.LABELLING_IMS_PER_BATCH``).
        resume: keep the finished shards of an interrupted run with the same label config.
        vis: render this many overlays to ``OUTPUT_DIR/vis``.
    """
    dataset_name = cfg.DATASETS.TEST[0]
    check_dataset_names([dataset_name], "DATASETS.TEST")
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:  # e.g. a Mask2Former checkpoint: its backbone.* tensors load into our backbone
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    batch = cfg.DATALOADER.LABELLING_IMS_PER_BATCH
    if shard_size % batch:
        raise ConfigError(
            f"--shard-size {shard_size} must be a multiple of DATALOADER.LABELLING_IMS_PER_BATCH={batch}, so "
            "that resumed and multi-process runs batch images exactly as one uninterrupted run does."
        )
    dicts = DatasetCatalog.get(dataset_name)
    writer = PseudoLabelWriter(
        cfg.DATASETS.PSEUDO_LABEL_ROOT,
        dataset_name,
        stage,
        shard_size=shard_size,
        config=label_config(cfg),
        num_images=len(dicts),
        resume=resume,
    )
    indices = writer.pending_indices(rank=comm.get_rank(), world_size=comm.get_world_size())
    logger.info("Rank %d labels %d of %d images of %s", comm.get_rank(), len(indices), len(dicts), dataset_name)
    loader = build_labelling_loader(
        dicts,
        indices,
        build_dataset_mapper(cfg, is_train=False),
        batch_size=batch,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    summary = _write_store(cfg, model, loader, writer)
    if summary is None:
        return {}
    reader = PseudoLabelReader(cfg.DATASETS.PSEUDO_LABEL_ROOT, dataset_name, stage)
    rows = [[k, v] for k, v in summary.items() if k not in ("skipped_files",)]
    if cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET:
        ar = evaluate_store_ar(reader, cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET)
        summary["ar"] = ar
        rows += [
            [f"{k} ({cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET})", f"{ar[k]:.2f}"]
            for k in ar
            if "-" not in k and k.startswith("AR@")
        ]
    if vis:
        vis_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
        os.makedirs(vis_dir, exist_ok=True)
        for i, record in zip(range(vis), reader):
            render_pseudo_labels(record, os.path.join(vis_dir, f"{i:04d}.png"))
        rows.append(["overlays", vis_dir])
    print(tabulate(rows, headers=["pseudo-labels", "value"], tablefmt="pipe"))
    return summary


def _cluster_features(out):
    """(object index [P], features [P, D]) of one output: ``cluster_features`` (class-level grouping) or the
    ranked parts' query features."""
    if "cluster_features" in out:
        return out["cluster_features"]["object_index"].cpu(), out["cluster_features"]["features"].cpu()
    parts = out["part_instances"].to("cpu")
    return parts.object_index, parts.features


def collect_features(model, loader):
    """This rank's features: (keys [P, 3] = (dataset index, object, item), classes [P], features [P, D])."""
    keys, classes, feats = [], [], []
    with torch.no_grad():
        for batch in loader:
            keep = [x for x in batch if not x.get("skipped")]
            if not keep:
                continue
            for inp, out in zip(keep, model(keep)):
                owners, features = _cluster_features(out)
                obj_classes = out["instances"].pred_classes.to("cpu")
                for p in range(len(owners)):
                    owner = int(owners[p])
                    keys.append([int(inp["dataset_index"]), owner, p])
                    classes.append(int(obj_classes[owner]))
                    feats.append(features[p].float())
    dim = model.cluster_feature_dim
    return (
        torch.tensor(keys, dtype=torch.long).reshape(-1, 3),
        torch.tensor(classes, dtype=torch.long),
        torch.stack(feats) if feats else torch.zeros(0, dim),
    )


def gather_features(keys, classes, feats):
    """All ranks' pairs in dataset order (independent of the number of processes)."""
    gathered = comm.all_gather((keys, classes, feats))
    keys = torch.cat([g[0] for g in gathered])
    classes = torch.cat([g[1] for g in gathered])
    feats = torch.cat([g[2] for g in gathered])
    order = sorted(range(len(keys)), key=lambda i: tuple(keys[i].tolist()))
    order = torch.tensor(order, dtype=torch.long)
    return classes[order], feats[order]


def num_object_classes(cfg, dataset_name, classes) -> int:
    if cfg.MODEL.PART_RANKING.NUM_OBJECT_CLASSES > 0:
        n = cfg.MODEL.PART_RANKING.NUM_OBJECT_CLASSES
    else:
        meta = MetadataCatalog.get(dataset_name)
        names = meta.get("object_classes", None)
        if not names and meta.get("metadata_from", None):  # a pseudo-label dataset: its source's object classes
            source = MetadataCatalog.get(meta.metadata_from)
            names = source.get("object_classes", None) or source.get("thing_classes", None)
        n = len(names) if names else (int(classes.max()) + 1 if len(classes) else 0)
    if len(classes) and int(classes.max()) >= n:
        raise ConfigError(
            f"object class {int(classes.max())} is out of range for MODEL.PART_RANKING.NUM_OBJECT_CLASSES={n}."
        )
    if len(classes) and int(classes.min()) < 0:
        logger.warning("Parts of objects without a class (-1) are not clustered.")
    return n


def rank_and_label(
    cfg, *, stage: str = "ranking", shard_size: int = 1000, resume: bool = False, prototypes: str = ""
) -> dict:
    """Stage 3 (``tools/rank_parts.py``): the cluster pass (prototypes per object class) and the labelling pass
    (module doc). Returns rank 0's summary ({} on other ranks).

    Args:
        stage: store name of this labelling stage.
        shard_size: images per shard (fixed per store).
        resume: reuse an existing prototypes file and the finished shards.
        prototypes: prototypes file; "" = ``OUTPUT_DIR/prototypes.pth``.
    """
    dataset_name = cfg.DATASETS.TEST[0]
    check_dataset_names([dataset_name], "DATASETS.TEST")
    if cfg.MODEL.META_ARCHITECTURE not in PROTOTYPE_MODELS:
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE must be one of {PROTOTYPE_MODELS}, got {cfg.MODEL.META_ARCHITECTURE!r}."
        )
    if cfg.MODEL.META_ARCHITECTURE == "PartRankingModel" and not cfg.MODEL.WEIGHTS:
        raise ConfigError("MODEL.WEIGHTS must name a stage-2 (ProposalModel) checkpoint.")
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    rank, world = comm.get_rank(), comm.get_world_size()
    dicts = DatasetCatalog.get(dataset_name)
    mapper = build_dataset_mapper(cfg, is_train=False)
    ranking = cfg.MODEL.PART_RANKING
    path = prototypes or os.path.join(cfg.OUTPUT_DIR, DEFAULT_FILENAME)
    path_setting = "--prototypes" if prototypes else "OUTPUT_DIR"  # names the path in a load error

    # 1. cluster pass
    if resume and os.path.isfile(path):
        logger.info("Reusing prototypes %s (--resume)", path)
    else:
        loader = build_labelling_loader(dicts, range(rank, len(dicts), world), mapper, 1, cfg.DATALOADER.NUM_WORKERS)
        classes, feats = gather_features(*collect_features(model, loader))
        num_classes = num_object_classes(cfg, dataset_name, classes)
        prototypes, num_clusters, counts = cluster_prototypes(
            classes,
            feats,
            num_classes,
            ranking.NUM_CLUSTERS,
            ranking.KMEANS_N_INIT,
            ranking.KMEANS_MAX_ITER,
            ranking.KMEANS_SEED,
            rank,
            world,
        )
        if comm.is_main_process():
            save_prototypes(path, prototypes, num_clusters, counts)
            logger.info("Saved prototypes %s for %d classes (%d features)", path, num_classes, len(classes))
        comm.synchronize()
    model.set_prototypes(*load_prototypes(path, setting=path_setting))

    # 2. labelling pass
    # ranking a pseudo-label dataset (the stage-1 store's objects) writes a sibling stage of the same source:
    # toyparts_train_pseudo_grouping → <root>/toyparts_train/ranking = toyparts_train_pseudo_ranking
    source = MetadataCatalog.get(dataset_name).get("pseudo_label_source", dataset_name)
    writer = PseudoLabelWriter(
        cfg.DATASETS.PSEUDO_LABEL_ROOT,
        source,
        stage,
        shard_size=shard_size,
        config=label_config(cfg),
        num_images=len(dicts),
        resume=resume,
    )
    indices = writer.pending_indices(rank=rank, world_size=world)
    loader = build_labelling_loader(dicts, indices, mapper, 1, cfg.DATALOADER.NUM_WORKERS)
    summary = _write_store(cfg, model, loader, writer)
    if summary is None:
        return {}
    summary["prototypes"] = path
    rows = [[k, v] for k, v in summary.items() if k != "skipped_files"]
    print(tabulate(rows, headers=["part ranking", "value"], tablefmt="pipe"))
    return summary
