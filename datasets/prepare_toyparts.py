#!/usr/bin/env python
"""Generate the embedded "toyparts" dataset (PartImageNet layout, COCO json).

Example:
    python datasets/prepare_toyparts.py --out datasets/toyparts --num-train 200 --num-val 50
"""

import argparse
import os
import sys

# Allow running from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.data.datasets.toyparts_generator import generate_toyparts  # noqa: E402


def main(argv=None):
    default_out = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "toyparts")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)

    s = generate_toyparts(args.out, args.num_train, args.num_val, args.seed, image_size=args.image_size)
    print(
        f"toyparts: wrote {s['train']['images']} train / {s['val']['images']} val images "
        f"({s['train']['objects'] + s['val']['objects']} objects, "
        f"{s['train']['parts'] + s['val']['parts']} parts) to {args.out} in {s['seconds']:.1f}s"
    )


if __name__ == "__main__":
    main()
