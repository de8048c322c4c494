#!/usr/bin/env python
"""Stage 1: label a dataset with part segments (pixel grouping + dense CRF) into a pseudo-label store.

    python tools/make_pseudo_labels.py --config-file configs/quick_schedules/stage1_pixel_grouping_toyparts.yaml
    python tools/make_pseudo_labels.py --config-file configs/stage1_pixel_grouping.yaml --num-gpus 8 --resume

The model runs through detectron2's ``inference_on_dataset`` with a writer-"evaluator", so labelling is
distributed like evaluation: rank r of W labels shards r, r+W, ... of DATASETS.TEST[0] and writes them
atomically to ``DATASETS.PSEUDO_LABEL_ROOT/<dataset>/<stage>``; ``--resume`` keeps finished shards.
At the end rank 0 prints a summary, evaluates AR@k of the pseudo-parts against GT parts when
MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET names a dataset with part annotations, and ``--vis N`` renders
N overlays to OUTPUT_DIR/vis. The driver is :func:`part_distillation.engine.labelling.label_dataset`.
"""

from part_distillation.engine import default_argument_parser, launch_main, setup_cfg
from part_distillation.engine.labelling import label_dataset
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--stage", default="grouping", help="store name of this labelling stage")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard (fixed per store; a multiple of the batch)"
    )
    parser.add_argument("--vis", type=int, default=0, help="render this many overlays to OUTPUT_DIR/vis")
    return parser.parse_args(argv)


def main(args):
    cfg = setup_cfg(args)
    return label_dataset(cfg, stage=args.stage, shard_size=args.shard_size, resume=args.resume, vis=args.vis)


def cli():
    return launch_main(main, parse_args())


if __name__ == "__main__":
    cli()
