#!/usr/bin/env python
"""Summarise a pseudo-label store and render a few overlays.

    python tools/inspect_pseudo_labels.py --root pseudo_labels --source toyparts_train --stage grouping
    python tools/inspect_pseudo_labels.py --root R --source S --stage T --vis 8 --out output/inspect

Prints the number of images, objects and parts, per-class counts (object category_id, and
part_class when the stage has part classes) and the part/object area ratio (mean, median).
``--vis N`` writes N overlays (parts coloured, object outlines) as PNG files to ``--out``.
"""

import argparse
import os
import sys

import numpy as np
from tabulate import tabulate

# Allow running from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.data.pseudo_labels import PseudoLabelReader, mask_area  # noqa: E402
from part_distillation.data.visualization import render_pseudo_labels  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="pseudo_labels", help="store root (default: pseudo_labels)")
    parser.add_argument("--source", required=True, help="name of the labelled dataset, e.g. toyparts_train")
    parser.add_argument("--stage", required=True, help="e.g. grouping or ranking")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="render N overlays (default 0)")
    parser.add_argument("--out", default="output/inspect_pseudo_labels", help="directory for the overlays")
    parser.add_argument("--no-verify", action="store_true", help="skip the shards' sha256 check")
    parser.add_argument("--allow-incomplete", action="store_true", help="inspect a store with missing shards")
    return parser.parse_args(argv)


def _class_names(source, key):
    """Names for ids from the source dataset's metadata, if it is registered (else None)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if source not in DatasetCatalog.list():
        return None
    return MetadataCatalog.get(source).get(key)


def summarise(reader):
    stats = {"images": 0, "objects": 0, "parts": 0, "object_classes": {}, "part_classes": {}, "ratios": []}
    for record in reader:
        stats["images"] += 1
        for obj in record["objects"]:
            stats["objects"] += 1
            cid = obj["category_id"]
            stats["object_classes"][cid] = stats["object_classes"].get(cid, 0) + 1
            obj_area = mask_area(obj["segmentation"])
            for part in obj["parts"]:
                stats["parts"] += 1
                if "part_class" in part:
                    pc = part["part_class"]
                    stats["part_classes"][pc] = stats["part_classes"].get(pc, 0) + 1
                if obj_area > 0:
                    stats["ratios"].append(mask_area(part["segmentation"]) / obj_area)
    return stats


def _class_table(counts, names, title):
    rows = []
    for cid in sorted(counts):
        name = names[cid] if names is not None and 0 <= cid < len(names) else ("unknown" if cid < 0 else "")
        rows.append([cid, name, counts[cid]])
    return tabulate(rows, headers=[title, "name", "count"], tablefmt="pipe")


def render(record, out_dir, rank):
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record["image_id"]))
    return render_pseudo_labels(record, os.path.join(out_dir, f"{rank:04d}_{safe_id}.png"))


def main(argv=None):
    args = parse_args(argv)
    reader = PseudoLabelReader(
        args.root, args.source, args.stage, verify=not args.no_verify, allow_incomplete=args.allow_incomplete
    )
    manifest = reader.manifest
    stats = summarise(reader)
    ratios = np.asarray(stats["ratios"]) if stats["ratios"] else np.zeros(1)
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"pseudo-label store {reader.dir}")
    print(
        tabulate(
            [
                [
                    "shards",
                    f"{len(manifest['shards'])} of {manifest['num_shards']} (shard size {manifest['shard_size']})",
                ],
                ["complete", manifest["complete"]],
                ["images (labelled / expected)", f"{stats['images']} / {manifest['num_images_expected']}"],
                ["objects", stats["objects"]],
                ["parts", stats["parts"]],
                ["parts per object", f"{stats['parts'] / max(stats['objects'], 1):.2f}"],
                ["part/object area ratio mean", f"{ratios.mean():.4f}"],
                ["part/object area ratio median", f"{np.median(ratios):.4f}"],
                ["bytes per image", f"{size / max(stats['images'], 1):.0f}"],
            ],
            headers=["", "value"],
            tablefmt="pipe",
        )
    )
    print()
    print(_class_table(stats["object_classes"], _class_names(args.source, "thing_classes"), "object category_id"))
    if stats["part_classes"]:
        print()
        print(_class_table(stats["part_classes"], None, "part_class"))
    written = []
    if args.vis > 0:
        os.makedirs(args.out, exist_ok=True)
        for rank, record in enumerate(reader):
            if rank >= args.vis:
                break
            written.append(render(record, args.out, rank))
        print(f"\nwrote {len(written)} overlays to {args.out}")
    stats["overlays"] = written
    return stats


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)  # a UserError (missing/corrupt store) prints one line and exits 2
