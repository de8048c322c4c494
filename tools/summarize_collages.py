#!/usr/bin/env python
"""The manual-evaluation numbers (PartDistillation, Cho et al. 2023, supp. "Manual evaluation") from a filled
collages.csv (tools/make_collages.py): the share of consistent parts and the number of object classes with at
least 3 consistent parts.

    python tools/summarize_collages.py out/collages/collages.csv [--min-consistent 3] [--output summary.json]
"""

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="collages.csv with the 'consistent' column filled (yes/no)")
    p.add_argument("--min-consistent", type=int, default=3, help="consistent parts a class needs to count (paper: 3)")
    p.add_argument("--output", default="", help="also write the summary as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tabulate import tabulate

    from part_distillation.data.pseudo_labels import atomic_write_bytes
    from part_distillation.evaluation.manual_eval import summarize_annotations
    from part_distillation.utils.errors import UserError

    args = parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{args.csv} does not exist; give the collages.csv written by tools/make_collages.py.")
    summary = summarize_annotations(rows, args.min_consistent, source=args.csv)
    table = [[cid, e["class_name"], e["parts"], e["consistent"]] for cid, e in summary["per_class"].items()]
    print(tabulate(table, headers=["object class", "name", "parts", "consistent"]))
    print(
        f"\nconsistent parts: {summary['consistent_parts']} / {summary['parts']} = {summary['consistent_share']:.1f} %"
    )
    print(
        f"classes with >= {args.min_consistent} consistent parts: {summary['classes_with_min_consistent']} / "
        f"{summary['classes']}"
    )
    if args.output:
        atomic_write_bytes(os.path.abspath(args.output), json.dumps(summary, indent=1).encode("utf-8"))
    return summary


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)
