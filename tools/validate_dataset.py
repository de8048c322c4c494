#!/usr/bin/env python
"""Check a registered dataset for files and annotations that would break (or silently skew) training.

    python tools/validate_dataset.py --dataset pascal_part_val
    python tools/validate_dataset.py --dataset cityscapes_panoptic_parts_train --max-images 200 \
        --num-workers 4 --json report.json

Loads the dataset through detectron2's DatasetCatalog (as training does), runs the checks of
``part_distillation.data.validation`` on every record (missing/corrupt/truncated images, CMYK and
16-bit images, EXIF rotation, size mismatches, masks outside the image, empty masks, unknown
category ids, dangling part→object references, duplicate image ids, alpha channels, extreme aspect
ratios, masks of fewer than K pixels, annotations the loader dropped) and prints a summary table. A
loader that refuses the annotation file (truncated JSON, duplicate annotation ids, unknown category ids,
annotations without segmentation) is reported in one line with exit status 2.

Exit status: 0 when there are no errors (warnings allowed), 1 when there is at least one error,
2 when the dataset cannot be loaded (unknown name, files not found).
"""

import argparse
import difflib
import json
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a registered dataset name, e.g. pascal_part_val")
    parser.add_argument("--max-images", type=int, default=None, metavar="N", help="check only the first N records")
    parser.add_argument("--num-workers", type=int, default=1, metavar="K", help="threads for the per-image checks")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the findings as JSON (atomically)")
    parser.add_argument("--no-image-checks", action="store_true", help="check annotations only (no image I/O)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-examples", type=int, default=3, help="examples per check in the table")
    parser.add_argument("--num-parts", type=int, default=4, metavar="K", help="warn about masks of fewer than K pixels")
    parser.add_argument(
        "--part-coco",
        action="append",
        default=[],
        metavar="NAME,JSON,IMAGE_ROOT[,OBJECTS_NAME]",
        help="register your own COCO part dataset first (as config DATASETS.PART_COCO)",
    )
    return parser.parse_args(argv)


def write_json_atomic(path, payload):
    """Write ``payload`` as JSON to ``path`` via a temporary file in the same folder and a rename."""
    from part_distillation.utils.io import atomic_write_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode("utf-8"))


def build_report(dataset, num_records, findings):
    from part_distillation.data.validation import ERROR, WARNING, summarize_findings

    return {
        "dataset": dataset,
        "num_records": num_records,
        "num_errors": sum(f.severity == ERROR for f in findings),
        "num_warnings": sum(f.severity == WARNING for f in findings),
        "summary": [
            {"check": g["check"], "severity": g["severity"], "count": g["count"]} for g in summarize_findings(findings)
        ],
        "findings": [f._asdict() for f in findings],
    }


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import part_distillation  # noqa: F401  (registers the datasets)
    from part_distillation.data.validation import ERROR, format_summary_table, validate_dataset_dicts
    from part_distillation.data.datasets.part_coco import register_part_coco_specs
    from part_distillation.utils.errors import UserError

    try:
        register_part_coco_specs(args.part_coco, "--part-coco")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dataset not in DatasetCatalog.list():
        close = difflib.get_close_matches(args.dataset, DatasetCatalog.list(), n=5, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(close)}?" if close else f" ({len(DatasetCatalog.list())} names are registered)"
        )
        print(f"error: dataset {args.dataset!r} is not registered{hint}", file=sys.stderr)
        return 2
    try:
        records = DatasetCatalog.get(args.dataset)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_images is not None:
        records = records[: args.max_images]
    metadata = MetadataCatalog.get(args.dataset)
    findings = validate_dataset_dicts(
        records,
        metadata,
        num_workers=args.num_workers,
        check_images=not args.no_image_checks,
        progress=not args.no_progress,
        min_mask_pixels=args.num_parts,
    )
    print(f"dataset {args.dataset}")
    print(format_summary_table(findings, num_records=len(records), max_examples=args.max_examples))
    if args.json:
        write_json_atomic(args.json, build_report(args.dataset, len(records), findings))
        print(f"report written to {args.json}")
    return 1 if any(f.severity == ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
