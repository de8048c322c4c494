#!/usr/bin/env python
"""Stage 3: class-specific part ranking (seed 000 "Class-specific part ranking"; spec §5) in two passes.

    python tools/rank_parts.py --config-file configs/quick_schedules/stage3_ranking_toyparts.yaml \
        MODEL.WEIGHTS output/quick_schedules/stage2_proposals_toyparts/model_final.pth
    python tools/rank_parts.py --config-file configs/stage3_ranking.yaml --num-gpus 8 MODEL.WEIGHTS <stage-2 .pth>

1. Cluster pass: :class:`PartRankingModel` runs over DATASETS.TEST[0] (rank r of W takes images r, r+W,
   ...) and keeps, per object, the parts that pass τr/τs with their query features. The (object class,
   feature) pairs are all-gathered and put in dataset order, then each object class is clustered into
   ``MODEL.PART_RANKING.NUM_CLUSTERS`` prototypes with :func:`batched_kmeans` ("l2" on the normalised
   features, best of ``KMEANS_N_INIT`` k-means++ restarts). Classes are sharded over the ranks (rank r
   clusters classes r, r+W, ...; one deterministic K-means per class), the results are all-gathered and
   rank 0 saves ``OUTPUT_DIR/prototypes.pth`` atomically: ``{"prototypes": [C, K, D], "num_clusters": [C],
   "num_features": [C]}`` (rows beyond a class's ``num_clusters`` are zeros). ``--resume`` reuses an
   existing prototypes file.
2. Labelling pass: the same model with the prototypes assigns every kept part its prototype id
   (``part_class``) and soft scores softmax_k(−‖f − μ_k‖ / T), written through the writer-evaluator to the
   store ``DATASETS.PSEUDO_LABEL_ROOT/<dataset>/<--stage>`` (default "ranking"), sharded like stage 1. When
   DATASETS.TEST[0] is itself a pseudo-label dataset (``<source>_pseudo_<stage>``, e.g. ranking inside the
   objects stage 1 stored: ``INPUT.TEST_DATASET_MAPPER_NAME PixelGroupingDatasetMapper`` with
   ``MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE store``), the result is the store ``<root>/<source>/<--stage>``.

The same two passes label with :class:`ClassPixelGroupingModel` (the one-stage baseline, seed 000
supplement): pixel features sampled inside each object are clustered per object class instead of query
features, and every object pixel gets its nearest prototype (no MODEL.WEIGHTS needed):

    python tools/rank_parts.py --config-file configs/quick_schedules/onestage_grouping_toyparts.yaml --stage onestage
"""
import io
import json
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils import comm
from tabulate import tabulate

from part_distillation.data import build_labelling_loader
from part_distillation.data.build import check_dataset_names
from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.data.pseudo_labels import PseudoLabelWriter, atomic_write_bytes
from part_distillation.engine import default_argument_parser, launch_main, setup_cfg
from part_distillation.evaluation.pseudo_label_writer import PseudoLabelWriterEvaluator
from part_distillation.modeling.grouping.kmeans import batched_kmeans
from part_distillation.utils.errors import ConfigError
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pseudo_labels import SkipAwareModel  # noqa: E402 (the labelling tool's skipped-input wrapper)

logger = logging.getLogger("part_distillation.rank_parts")

_LABEL_KEYS = ("MODEL", "INPUT", "DATASETS.TEST")
# Models with the prototype protocol: a cluster pass (outputs carry features per object), set_prototypes(),
# then a labelling pass whose parts carry pred_classes (prototype ids) and soft_scores.
PROTOTYPE_MODELS = ("PartRankingModel", "ClassPixelGroupingModel")


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--stage", default="ranking", help="store name of this labelling stage")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (fixed per store)")
    parser.add_argument("--prototypes", default="", help="prototypes file (default OUTPUT_DIR/prototypes.pth)")
    return parser.parse_args(argv)


def label_config(cfg) -> dict:
    out = {}
    for key in _LABEL_KEYS:
        node = cfg
        for k in key.split("."):
            node = node[k]
        out[key] = json.loads(json.dumps(node, default=list))
    return out


def _cluster_features(out):
    """(object index [P], features [P, D]) of one output: ``cluster_features`` (class-level grouping) or the
    ranked parts' query features."""
    if "cluster_features" in out:
        return out["cluster_features"]["object_index"].cpu(), out["cluster_features"]["features"].cpu()
    parts = out["part_instances"].to("cpu")
    return parts.object_index, parts.query_features


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


def cluster_prototypes(classes, feats, num_classes: int, k: int, n_init: int, max_iter: int, seed: int,
                       rank: int = 0, world_size: int = 1):  # fmt: skip
    """Prototypes of the classes r, r+W, ... of this rank, all-gathered: ([C, K, D], num_clusters [C], counts [C])."""
    dim = feats.shape[1]
    mine = {}
    for c in range(rank, num_classes, world_size):
        x = feats[classes == c]
        if len(x) == 0:
            continue
        result = batched_kmeans(x[None].float(), None, k, n_init=n_init, max_iter=max_iter, metric="l2", seed=seed)
        mine[c] = (result.centers[0].float(), int(result.num_clusters[0]), len(x))
    prototypes = torch.zeros(num_classes, k, dim)
    num_clusters = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for part in comm.all_gather(mine):
        for c, (centers, n, count) in part.items():
            prototypes[c], num_clusters[c], counts[c] = centers, n, count
    return prototypes, num_clusters, counts


def save_prototypes(path: str, prototypes, num_clusters, counts) -> None:
    buffer = io.BytesIO()
    torch.save({"prototypes": prototypes, "num_clusters": num_clusters, "num_features": counts}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _num_object_classes(cfg, dataset_name, classes) -> int:
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


def main(args):
    cfg = setup_cfg(args)
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
    path = args.prototypes or os.path.join(cfg.OUTPUT_DIR, "prototypes.pth")

    # 1. cluster pass
    if args.resume and os.path.isfile(path):
        logger.info("Reusing prototypes %s (--resume)", path)
    else:
        loader = build_labelling_loader(dicts, range(rank, len(dicts), world), mapper, 1, cfg.DATALOADER.NUM_WORKERS)
        classes, feats = gather_features(*collect_features(model, loader))
        num_classes = _num_object_classes(cfg, dataset_name, classes)
        prototypes, num_clusters, counts = cluster_prototypes(
            classes, feats, num_classes, ranking.NUM_CLUSTERS, ranking.KMEANS_N_INIT, ranking.KMEANS_MAX_ITER,
            ranking.KMEANS_SEED, rank, world,
        )  # fmt: skip
        if comm.is_main_process():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_prototypes(path, prototypes, num_clusters, counts)
            logger.info("Saved prototypes %s for %d classes (%d features)", path, num_classes, len(classes))
        comm.synchronize()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.set_prototypes(saved["prototypes"], saved["num_clusters"])

    # 2. labelling pass
    # ranking a pseudo-label dataset (the stage-1 store's objects) writes a sibling stage of the same source:
    # toyparts_train_pseudo_grouping → <root>/toyparts_train/ranking = toyparts_train_pseudo_ranking
    source = MetadataCatalog.get(dataset_name).get("pseudo_label_source", dataset_name)
    writer = PseudoLabelWriter(
        cfg.DATASETS.PSEUDO_LABEL_ROOT, source, args.stage, shard_size=args.shard_size,
        config=label_config(cfg), num_images=len(dicts), resume=args.resume,
    )  # fmt: skip
    indices = writer.pending_indices(rank=rank, world_size=world)
    loader = build_labelling_loader(dicts, indices, mapper, 1, cfg.DATALOADER.NUM_WORKERS)
    results = inference_on_dataset(SkipAwareModel(model), loader, PseudoLabelWriterEvaluator(writer, cfg.DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION))
    if not comm.is_main_process():
        return {}
    summary = results["pseudo_labels"]
    summary["prototypes"] = path
    rows = [[k, v] for k, v in summary.items() if k != "skipped_files"]
    print(tabulate(rows, headers=["part ranking", "value"], tablefmt="pipe"))
    return summary


def cli():
    return launch_main(main, parse_args())


if __name__ == "__main__":
    cli()
