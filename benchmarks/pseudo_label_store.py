#!/usr/bin/env python
"""Pseudo-label store vs the reference's one-torch.save-per-image files: bytes and throughput.

Labels: toyparts ground-truth objects and parts (200 train images, 256 px), with random float
scores as a model would produce, written as stage-3-like labels (parts with a part class).

Variants, all holding the same object and part masks:

* ``store``: part_distillation.data.pseudo_labels (gzip JSON-lines shards + sidecars + manifest);
* ``reference (RLE in torch.save)``: what the reference does (reference code): one ``torch.save`` per image of
  a dict with masks as COCO RLE dicts ``[{"segmentation": rle}]``, labels/boxes/scores as tensors/arrays
  (the keys of its stage-3 file, plus stage-0's object masks/boxes/scores);
* ``dense torch.save``: the same dict with masks as dense bool tensors (N×H×W, 1 byte per pixel) — the
  obvious alternative, not what the reference does.

Bytes are reported both as file sizes ("apparent") and as allocated disk blocks, which is what a
file system charges for 14M small files. Writes of the store fsync each shard; torch.save does not
fsync. Results go to benchmarks/results/pseudo_label_store.json.

    python benchmarks/pseudo_label_store.py [--num-train 200] [--shard-size 100]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.data.datasets.toyparts import ensure_toyparts  # noqa: E402
from part_distillation.data.pseudo_labels import (  # noqa: E402
    PseudoLabelReader,
    PseudoLabelWriter,
    decode_mask,
    make_object,
    make_part,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pseudo_label_store.json")


def toyparts_records(root, split="train", seed=0):
    """Store records from toyparts' GT: every object with its parts (part_class = part category - 1)."""
    rng = np.random.default_rng(seed)
    with open(os.path.join(root, "annotations", f"{split}.json")) as f:
        parts_json = json.load(f)
    with open(os.path.join(root, "annotations", f"{split}_whole.json")) as f:
        whole_json = json.load(f)
    parts_of = {}
    for ann in parts_json["annotations"]:
        parts_of.setdefault(ann["object_id"], []).append(ann)
    objects_of = {}
    for ann in whole_json["annotations"]:
        objects_of.setdefault(ann["image_id"], []).append(ann)
    records = []
    for img in whole_json["images"]:
        objects = []
        for obj in objects_of.get(img["id"], []):
            parts = [
                make_part(p["segmentation"], score=float(np.float32(rng.random())), part_class=p["category_id"] - 1)
                for p in parts_of.get(obj["id"], [])
            ]
            objects.append(
                make_object(obj["segmentation"], parts, float(np.float32(rng.random())), obj["category_id"] - 1)
            )
        records.append(
            {
                "image_id": img["id"],
                "file_name": os.path.join(root, "images", split, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "class_code": os.path.dirname(img["file_name"]),
                "objects": objects,
            }
        )
    return records


def reference_dict(record, dense):
    """The reference's per-image dict (stage-3 keys + stage-0 object keys) for ``record``."""
    h, w = record["height"], record["width"]
    parts = [(j, p) for j, o in enumerate(record["objects"]) for p in o["parts"]]
    part_masks = [{"segmentation": p["segmentation"]} for _, p in parts]
    object_masks = [{"segmentation": o["segmentation"]} for o in record["objects"]]
    if dense:
        part_masks = torch.from_numpy(
            np.stack([decode_mask(p["segmentation"]) for _, p in parts]) if parts else np.zeros((0, h, w), bool)
        )
        object_masks = torch.from_numpy(
            np.stack([decode_mask(o["segmentation"]) for o in record["objects"]])
            if record["objects"]
            else np.zeros((0, h, w), bool)
        )
    areas = [float(decode_mask(p["segmentation"]).sum()) for _, p in parts]
    return {
        "file_name": record["file_name"],
        "image_id": os.path.basename(record["file_name"]),
        "class_code": record["class_code"],
        "height": h,
        "width": w,
        "part_masks": part_masks,
        "part_labels": torch.tensor([p["part_class"] for _, p in parts], dtype=torch.int64),
        "part_object_ids": torch.tensor([j for j, _ in parts], dtype=torch.int64),
        "part_scores": np.asarray([p["score"] for _, p in parts], dtype=np.float32),
        "part_ratios": [a / (h * w) for a in areas],
        "object_ratio": sum(areas) / (h * w),
        "object_class_label": record["objects"][0]["category_id"] if record["objects"] else -1,
        "object_masks": object_masks,
        "object_boxes": torch.tensor([o["bbox"] for o in record["objects"]], dtype=torch.float32).reshape(-1, 4),
        "object_scores": torch.tensor([o["score"] for o in record["objects"]], dtype=torch.float32),
    }


def tree_bytes(path):
    apparent = allocated = files = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def write_reference(records, out, dense):
    """One torch.save per image at <out>/<class_code>/<image file name>, as the reference lays them out.

    Only the saving is timed: the dicts (mask decoding for the dense variant, areas) are built first.
    """
    dicts = [reference_dict(record, dense) for record in records]
    start = time.perf_counter()
    for record, data in zip(records, dicts):
        directory = os.path.join(out, record["class_code"])
        os.makedirs(directory, exist_ok=True)
        torch.save(data, os.path.join(directory, os.path.basename(record["file_name"])))
    return time.perf_counter() - start


def read_reference(out, decode):
    start = time.perf_counter()
    n = 0
    for dirpath, _, names in sorted(os.walk(out)):
        for name in sorted(names):
            data = torch.load(os.path.join(dirpath, name), weights_only=False)
            if decode and isinstance(data["part_masks"], list):
                for m in data["part_masks"] + data["object_masks"]:
                    decode_mask(m["segmentation"])
            n += 1
    return time.perf_counter() - start, n


def read_store(root, decode):
    start = time.perf_counter()
    n = 0
    for record in PseudoLabelReader(root, "toyparts_train", "ranking"):
        if decode:
            for obj in record["objects"]:
                decode_mask(obj["segmentation"])
                for part in obj["parts"]:
                    decode_mask(part["segmentation"])
        n += 1
    return time.perf_counter() - start, n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=100, help="store shard size (default 100: 2 shards)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="pseudo_label_bench_")
    try:
        data_root = ensure_toyparts(
            os.path.join(tmp, "toyparts"),
            num_train=args.num_train,
            num_val=10,
            image_size=args.image_size,
            progress=False,
        )
        records = toyparts_records(data_root)
        n = len(records)
        num_objects = sum(len(r["objects"]) for r in records)
        num_parts = sum(len(o["parts"]) for r in records for o in r["objects"])

        store_root = os.path.join(tmp, "store")
        start = time.perf_counter()
        writer = PseudoLabelWriter(store_root, "toyparts_train", "ranking", shard_size=args.shard_size, num_images=n)
        for index, record in enumerate(records):
            writer.add(index, record)
        writer.close()
        writer.finalize()
        store_write_s = time.perf_counter() - start
        store_read_s, _ = min(read_store(store_root, decode=False) for _ in range(3))
        store_decode_s, _ = min(read_store(store_root, decode=True) for _ in range(3))

        variants = {"store": {"write_s": store_write_s, "read_s": store_read_s, "read_decode_s": store_decode_s}}
        variants["store"].update(zip(("apparent", "allocated", "files"), tree_bytes(store_root)))
        for name, dense in (("reference (RLE in torch.save)", False), ("dense torch.save", True)):
            out = os.path.join(tmp, "dense" if dense else "rle")
            write_s = write_reference(records, out, dense)
            read_s, count = min(read_reference(out, decode=False) for _ in range(3))
            assert count == n
            decode_s = min(read_reference(out, decode=True) for _ in range(3))[0] if not dense else read_s
            variants[name] = {"write_s": write_s, "read_s": read_s, "read_decode_s": decode_s}
            variants[name].update(zip(("apparent", "allocated", "files"), tree_bytes(out)))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    store = variants["store"]
    rows = []
    for name, v in variants.items():
        v["bytes_per_image"] = v["apparent"] / n
        v["disk_bytes_per_image"] = v["allocated"] / n
        v["store_ratio"] = store["apparent"] / v["apparent"]
        v["store_disk_ratio"] = store["allocated"] / v["allocated"]
        v["write_images_per_s"] = n / v["write_s"]
        v["read_images_per_s"] = n / v["read_s"]
        v["read_decode_images_per_s"] = n / v["read_decode_s"]
        rows.append(v | {"name": name})

    columns = ["files", "B/image", "disk B/img", "store/this", "disk ratio", "write img/s", "read img/s", "read+decode"]
    header = f"{'variant':32s} " + " ".join(f"{c:>11s}" for c in columns)
    print(
        f"toyparts train: {n} images, {num_objects} objects, {num_parts} parts, {args.image_size} px; "
        f"store shard size {args.shard_size}"
    )
    print(header)
    print("-" * len(header))
    for v in rows:
        values = [
            f"{v['files']:d}",
            f"{v['bytes_per_image']:.0f}",
            f"{v['disk_bytes_per_image']:.0f}",
            f"{v['store_ratio']:.3f}",
            f"{v['store_disk_ratio']:.3f}",
            f"{v['write_images_per_s']:.0f}",
            f"{v['read_images_per_s']:.0f}",
            f"{v['read_decode_images_per_s']:.0f}",
        ]
        print(f"{v['name']:32s} " + " ".join(f"{x:>11s}" for x in values))
    reference = variants["reference (RLE in torch.save)"]
    target_met = reference["store_ratio"] <= 0.2
    print(
        f"\nstore / reference (RLE in torch.save): {reference['store_ratio']:.3f} of the bytes "
        f"({1 / reference['store_ratio']:.1f}x smaller; target <= 0.2: {'met' if target_met else 'NOT met'}); "
        f"on disk {reference['store_disk_ratio']:.3f}"
    )
    result = {
        "benchmark": "pseudo_label_store",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "dataset": {
            "name": "toyparts_train",
            "images": n,
            "objects": num_objects,
            "parts": num_parts,
            "image_size": args.image_size,
        },
        "shard_size": args.shard_size,
        "variants": variants,
        "target": "store bytes/image <= 1/5 of the reference (RLE in torch.save)",
        "target_met": target_met,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
