#!/usr/bin/env python
"""Collages of discovered parts for manual evaluation (PartDistillation, Cho et al. 2023, supp. "Manual
evaluation", Fig. 4).

    python tools/make_collages.py --root pseudo_labels --source imagenet_train --stage ranking --output out/collages
    python tools/make_collages.py --predictions out/demo/predictions.json --output out/collages
    python tools/make_collages.py ... --drop-object-like 0.5     # the paper's filter: drop parts with IoU > 50 % with
    their object

Writes, for every (object class, part class), a 3×3 collage of random instances with the part in red
(``collages/<class>/part_<k>.png``), one ``index.html`` showing all collages per class, and
``collages.csv`` for annotators (fill ``consistent`` with yes/no, then run tools/summarize_collages.py).
"""

import argparse
import json
import logging
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("part_distillation.collages")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input: a pseudo-label store (stage 3/4) or demo/demo.py predictions")
    src.add_argument("--root", default="pseudo_labels", help="store root")
    src.add_argument("--source", help="labelled dataset name, e.g. toyparts_train")
    src.add_argument("--stage", help="store stage, e.g. ranking")
    src.add_argument("--predictions", help="demo/demo.py's predictions.json (a stage-3/4 model's parts)")
    p.add_argument("--output", required=True, help="folder for index.html, collages.csv and collages/")
    p.add_argument(
        "--drop-object-like",
        type=float,
        default=None,
        metavar="IOU",
        help="drop parts whose IoU with their object exceeds IOU (paper: 0.5); default: keep all",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random instance draw")
    p.add_argument("--tile-size", type=int, default=160, help="pixels per tile (a collage is 3x3 tiles)")
    p.add_argument("--title", default="", help="page title (default: the input's name)")
    return p.parse_args(argv)


def _store_class_names(source):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import part_distillation.data.datasets  # noqa: F401  (lazy registrations: names only)

    if source not in DatasetCatalog.list():
        return {}
    meta = MetadataCatalog.get(source)
    # part datasets name their object classes in "object_classes" (their thing_classes are part classes)
    names = meta.get("object_classes", None) or meta.get("thing_classes", None) or []
    return dict(enumerate(names))


def main(argv=None) -> dict:
    from detectron2.utils.logger import setup_logger

    from part_distillation.data.pseudo_labels import PseudoLabelReader
    from part_distillation.evaluation.manual_eval import records_from_predictions, sample_part_instances, write_collages
    from part_distillation.utils.errors import UserError

    args = parse_args(argv)
    if not logging.getLogger("part_distillation").handlers:
        setup_logger(name="part_distillation", abbrev_name="pd")
    if bool(args.predictions) == bool(args.source and args.stage):
        raise UserError("give either --source and --stage (a pseudo-label store under --root) or --predictions.")
    if args.predictions:
        records = records_from_predictions(args.predictions)
        names = {k: v for r in records for k, v in r["class_names"].items() if v}
        title = args.title or f"Discovered parts: {args.predictions}"
    else:
        reader = PseudoLabelReader(args.root, args.source, args.stage)
        records = tqdm(reader, total=len(reader), desc="records", unit="img")
        names = _store_class_names(args.source)
        title = args.title or f"Discovered parts: {args.source} / {args.stage}"
    samples, counts, stats = sample_part_instances(records, seed=args.seed, max_object_iou=args.drop_object_like)
    result = write_collages(
        samples,
        counts,
        args.output,
        names,
        title,
        args.tile_size,
        progress=lambda keys: tqdm(keys, desc="collages", unit="part"),
    )
    result.update(stats, drop_object_like=args.drop_object_like)
    logger.info(
        "%d collages of %d classes in %s (%d parts seen, %d dropped as object-like, %d without part class, "
        "%d unreadable instances)",
        result["collages"],
        result["classes"],
        args.output,
        stats["parts"],
        stats["dropped_object_like"],
        stats["without_part_class"],
        result["skipped_instances"],
    )
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    return result


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)
