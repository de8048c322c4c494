#!/usr/bin/env python
"""ImageNet-21K class subsets by WordNet (PartDistillation supp. "Manual evaluation"), as a manifest subset.

    python datasets/prepare_image_list.py --root datasets/imagenet_21k/train --out
    datasets/imagenet_21k/manifest_all.tsv
    python tools/wordnet_filter.py --manifest datasets/imagenet_21k/manifest_all.tsv \
        --out datasets/imagenet_21k/train_manifest.tsv --num-classes 10000 [--balanced 300] [--seed 0]

Removes the paper's subtrees ("non-object" / "object without parts" classes), samples --num-classes of the rest
(paper: 10K) and, with --balanced N, N classes inside and N outside the PartImageNet subtree (paper: 300/300). The
kept images' lines are written atomically to --out, which ``imagenet_21k_train`` reads as ``train_manifest.tsv``.
Logic: part_distillation/data/wordnet_filter.py.
"""

import argparse
import json
import logging
import sys

from part_distillation.data.wordnet_filter import PARTIMAGENET_ROOTS, filter_manifest, manifest_synsets, select_classes
from part_distillation.engine.setup import run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="full manifest (datasets/prepare_image_list.py)")
    parser.add_argument("--out", required=True, help="manifest subset to write, e.g. <root>/train_manifest.tsv")
    parser.add_argument(
        "--num-classes", type=int, default=10000, help="random classes kept after the removal (0 = all)"
    )
    parser.add_argument("--balanced", type=int, default=0, help="N inside + N outside the PartImageNet subtree")
    parser.add_argument("--inside-roots", default=",".join(PARTIMAGENET_ROOTS), help="WordNet synsets of the subtree")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes-out", default="", help="also write the selection (JSON) here")
    return parser.parse_args(argv)


def main(args):
    synsets = manifest_synsets(args.manifest)
    roots = tuple(r.strip() for r in args.inside_roots.split(",") if r.strip())
    sel = select_classes(synsets, args.num_classes, args.balanced, args.seed, inside_roots=roots)
    images = filter_manifest(args.manifest, args.out, sel["selected"])
    if args.classes_out:
        from part_distillation.data.pseudo_labels import atomic_write_bytes

        atomic_write_bytes(args.classes_out, json.dumps(sel, indent=1).encode("utf-8"))
    logging.getLogger("wordnet_filter").info(
        "%d synsets: %d after the subtree removal, %d selected (%d inside / %d outside); %d images → %s",
        len(synsets),
        len(sel["kept"]),
        len(sel["selected"]),
        len(sel["inside"]),
        len(sel["outside"]),
        images,
        args.out,
    )
    return sel


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, parse_args())
    sys.exit(0)
