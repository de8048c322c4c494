#!/usr/bin/env python
"""Stage 3: class-specific part ranking in two passes (PartDistillation, Cho et al. 2023, supp. "Class-specific part
ranking").

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

The same two passes label with :class:`ClassPixelGroupingModel` (the one-stage baseline, PartDistillation
supplement): pixel features sampled inside each object are clustered per object class instead of query
features, and every object pixel gets its nearest prototype (no MODEL.WEIGHTS needed):

    python tools/rank_parts.py --config-file configs/quick_schedules/onestage_grouping_toyparts.yaml --stage onestage

The driver is :func:`part_distillation.engine.labelling.rank_and_label`; the per-class K-means and the
prototypes file are :mod:`part_distillation.clustering.prototypes`.
"""

from part_distillation.engine import default_argument_parser, launch_main, setup_cfg
from part_distillation.engine.labelling import rank_and_label
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--stage", default="ranking", help="store name of this labelling stage")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (fixed per store)")
    parser.add_argument("--prototypes", default="", help="prototypes file (default OUTPUT_DIR/prototypes.pth)")
    return parser.parse_args(argv)


def main(args):
    cfg = setup_cfg(args)
    return rank_and_label(
        cfg, stage=args.stage, shard_size=args.shard_size, resume=args.resume, prototypes=args.prototypes
    )


def cli():
    return launch_main(main, parse_args())


if __name__ == "__main__":
    cli()
