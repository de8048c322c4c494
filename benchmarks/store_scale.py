#!/usr/bin/env python
"""Training from a pseudo-label store at ImageNet-21K scale: memory and start-up vs the number of images.

For each N (default 10k, 100k, 1M) the script writes a synthetic stage-1 store of N images with the
project's writer (``PseudoLabelWriter.write_shard``; records are copies of a few templates with their own
image ids, so writing is fast), then starts a fresh training process per loader path and measures:

* time to register the store and build the stage-2 train loader, and time to its first batch;
* RSS of the training process (after imports, after building the loader, after 20 batches, peak) and RSS/PSS
  of its loader workers (forked: PSS splits the pages they share with the parent);
* bytes on disk per image (shards + sidecars + manifest).

Paths: ``store`` (``DATASETS.PSEUDO_LABEL_LOADER store``: PseudoLabelStoreDataset + shard-window sampler, the
default) and ``list`` (every record as a dict, detectron2 serialises the list; the previous behaviour). The list
path is measured up to ``--list-max`` images (default 100k: at 1M it needs several GB on this shared machine) and
extrapolated linearly beyond. Growth is fitted linearly in N and extrapolated to ImageNet-21K (14.2M images).

Templates: ImageNet-like sizes (333-500 px sides), 1-2 objects of ~15-45 % of the image with jittered outlines,
K=4 parts each (Voronoi cells of the object, as K-means with K=4 + CRF gives), compressed COCO RLE.
Images: one JPEG per template (every record of a template points at it).

    python benchmarks/store_scale.py [--sizes 10000 100000 1000000] [--workdir /tmp/store_scale] [--keep]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "store_scale.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = os.path.join(REPO, "configs", "quick_schedules", "stage2_proposals_toyparts.yaml")
IMAGENET_21K = 14_197_122
SOURCE, STAGE = "synthetic_in21k", "grouping"
NUM_TEMPLATES = 24


# ------------------------------------------------------------------------------------------------
# Synthetic store
# ------------------------------------------------------------------------------------------------
def _blob(h, w, rng, cy, cx, ry, rx):
    """An ellipse with a jittered outline (smooth random radius), as a boolean mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = np.ones_like(angle)
    for freq in (3, 5, 9, 17):
        wobble += rng.uniform(0.02, 0.08) * np.sin(freq * angle + rng.uniform(0, 2 * np.pi))
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2


def _parts(obj, rng, k=4):
    """K Voronoi cells of the object (seeds inside it) with smoothly wiggling boundaries, like K-means + CRF."""
    import cv2

    h, w = obj.shape
    ys, xs = np.nonzero(obj)
    seeds = rng.choice(len(ys), size=k, replace=False)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.stack([np.hypot(yy - ys[s], xx - xs[s]) for s in seeds])
    for j in range(k):  # noise on a 12-px grid, interpolated: boundaries wiggle by a few pixels
        coarse = rng.normal(0, 6.0, size=(h // 12 + 2, w // 12 + 2)).astype(np.float32)
        dist[j] += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    label = dist.argmin(0)
    return [obj & (label == j) for j in range(k)]


def make_templates(image_dir, seed=0):
    import cv2

    from part_distillation.data.pseudo_labels import make_object, make_part, validate_record

    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    sizes = [(375, 500), (500, 375), (333, 500), (400, 400), (500, 500), (375, 450)]
    templates = []
    for t in range(NUM_TEMPLATES):
        h, w = sizes[t % len(sizes)]
        objects = []
        for _ in range(1 + (t % 3 == 0)):  # 1.33 objects per image on average
            ry, rx = rng.uniform(0.2, 0.38) * h, rng.uniform(0.2, 0.38) * w
            obj = _blob(h, w, rng, rng.uniform(ry, h - ry), rng.uniform(rx, w - rx), ry, rx)
            parts = [make_part(m, score=float(rng.uniform(0.3, 1.0))) for m in _parts(obj, rng)]
            objects.append(make_object(obj, parts, score=float(rng.uniform(0.5, 1.0))))
        path = os.path.join(image_dir, f"template_{t:02d}.jpg")
        image = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
        cv2.imwrite(path, cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
        record = {
            "image_id": f"t{t}",
            "file_name": path,
            "height": h,
            "width": w,
            "class_code": "n00000000",
            "objects": objects,
        }
        templates.append(validate_record(record))
    return templates


def write_store(root, n, templates, shard_size):
    """N records through PseudoLabelWriter.write_shard (validated and canonicalised like any record)."""
    from tqdm import tqdm

    from part_distillation.data.pseudo_labels import PseudoLabelWriter, num_shards_for, shard_index_range

    writer = PseudoLabelWriter(root, SOURCE, STAGE, shard_size=shard_size, config="store_scale", num_images=n)
    start = time.perf_counter()
    for k in tqdm(range(num_shards_for(n, shard_size)), desc=f"writing {n} images", mininterval=10):
        records = (
            (i, dict(templates[i % len(templates)], image_id=f"n{i // 1300:08d}_{i}", class_code=f"n{i // 1300:08d}"))
            for i in shard_index_range(k, shard_size, n)
        )
        writer.write_shard(k, records)
    manifest = writer.finalize()
    return time.perf_counter() - start, manifest


def store_bytes(directory):
    total = 0
    for dirpath, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


# ------------------------------------------------------------------------------------------------
# Measurement (in a fresh process per N and path)
# ------------------------------------------------------------------------------------------------
def _kb(pid, field, path="status"):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def measure(root, path, workers, batches):
    """Runs in the child process: register + build the stage-2 train loader, time the first batch, RSS."""
    import torch

    from part_distillation.data.pseudo_labels import register_all_pseudo_label_datasets
    from part_distillation.engine import Trainer, load_cfg

    torch.set_num_threads(1)
    pid = os.getpid()
    out = {"path": path, "rss_imports_mb": _kb(pid, "VmRSS") / 1024}
    opts = [
        "DATASETS.PSEUDO_LABEL_ROOT",
        root,
        "DATASETS.PSEUDO_LABEL_LOADER",
        path,
        "DATASETS.TRAIN",
        f"('{SOURCE}_pseudo_{STAGE}',)",
        "DATALOADER.NUM_WORKERS",
        str(workers),
        "SOLVER.IMS_PER_BATCH",
        "4",
        "INPUT.IMAGE_SIZE",
        "256",
        "MODEL.DEVICE",
        "cpu",
    ]
    cfg = load_cfg(STAGE2, opts)
    t0 = time.perf_counter()
    register_all_pseudo_label_datasets(root, loader=path)
    loader = Trainer.build_train_loader(cfg)
    out["register_and_build_s"] = time.perf_counter() - t0
    out["rss_built_mb"] = _kb(pid, "VmRSS") / 1024
    it = iter(loader)
    batch = next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    assert len(batch) >= 1 and "instances" in batch[0]
    for _ in range(batches):
        next(it)
    out["batches_s"] = time.perf_counter() - t0
    out["rss_after_batches_mb"] = _kb(pid, "VmRSS") / 1024
    out["rss_peak_mb"] = _kb(pid, "VmHWM") / 1024
    kids = _children(pid)
    out["worker_rss_mb"] = [(_kb(c, "VmRSS") or 0) / 1024 for c in kids]
    out["worker_pss_mb"] = [(_kb(c, "Pss", "smaps_rollup") or 0) / 1024 for c in kids]
    out["main_pss_mb"] = (_kb(pid, "Pss", "smaps_rollup") or 0) / 1024
    return out


def run_child(root, path, workers, batches, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", root, path, str(workers), str(batches)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {path} on {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(ns, values):
    """Least-squares a + b·N; returns (a, b)."""
    b, a = np.polyfit(np.asarray(ns, dtype=float), np.asarray(values, dtype=float), 1)
    return float(a), float(b)


def extrapolate(ns, values, n):
    """The linear fit at ``n``; a slope <= 0 (flat within noise) extrapolates to the largest measured value."""
    a, b = fit(ns, values)
    flat = b <= 0
    return {"intercept": a, "per_image": b, "flat": flat, "at_imagenet_21k": max(values) if flat else a + b * n}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--list-max", type=int, default=100_000, help="largest N measured on the list path")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS of the measured loader")
    parser.add_argument("--batches", type=int, default=20, help="batches drawn after the first before RSS is read")
    parser.add_argument("--workdir", default="/tmp/store_scale")
    parser.add_argument("--keep", action="store_true", help="keep the stores (reused by the next run)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measuring process")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        root, path, workers, batches = args._measure
        print(json.dumps(measure(root, path, int(workers), int(batches))))
        return None

    from part_distillation.data.pseudo_labels import atomic_write_bytes, read_manifest

    os.makedirs(args.workdir, exist_ok=True)
    templates = make_templates(os.path.join(args.workdir, "images"))
    rows = []
    for n in sorted(args.sizes):
        root = os.path.join(args.workdir, f"n{n}")
        directory = os.path.join(root, SOURCE, STAGE)
        try:
            manifest = read_manifest(root, SOURCE, STAGE)
            reuse = manifest["complete"] and manifest["num_images"] == n and manifest["shard_size"] == args.shard_size
        except Exception:  # noqa: BLE001  (absent or foreign: rewrite)
            reuse = False
        if reuse:
            write_s = None
            print(f"N={n}: reusing {directory}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            write_s, manifest = write_store(root, n, templates, args.shard_size)
        disk = store_bytes(directory)
        row = {
            "n": n,
            "write_s": write_s,
            "disk_bytes": disk,
            "disk_bytes_per_image": disk / n,
            "manifest_bytes": os.path.getsize(os.path.join(directory, "manifest.json")),
            "num_parts": manifest["num_parts"],
            "num_objects": manifest["num_objects"],
        }
        for path in ("store", "list"):
            if path == "list" and n > args.list_max:
                continue
            print(f"N={n}: measuring the {path} path ...", flush=True)
            row[path] = run_child(root, path, args.workers, args.batches, args.timeout)
            print(f"  {json.dumps(row[path])}", flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "shard_size": args.shard_size,
        "workers": args.workers,
        "rows": rows,
        "extrapolation_n": IMAGENET_21K,
    }
    ns = [r["n"] for r in rows]
    summary = {}
    for path in ("store", "list"):
        have = [r for r in rows if path in r]
        if len(have) < 2:
            continue
        x = [r["n"] for r in have]
        s = {}
        for key in ("rss_built_mb", "rss_after_batches_mb", "rss_peak_mb", "first_batch_s"):
            s[key] = extrapolate(x, [r[path][key] for r in have], IMAGENET_21K)
        pss = [r[path]["main_pss_mb"] + sum(r[path]["worker_pss_mb"]) for r in have]
        s["pss_process_and_workers_mb"] = extrapolate(x, pss, IMAGENET_21K)
        s["rss_growth_mb"] = have[-1][path]["rss_after_batches_mb"] - have[0][path]["rss_after_batches_mb"]
        s["measured_n"] = [have[0]["n"], have[-1]["n"]]
        summary[path] = s
    a, b = fit(ns, [r["disk_bytes"] for r in rows]) if len(rows) > 1 else (0.0, rows[0]["disk_bytes_per_image"])
    summary["disk"] = {"bytes_per_image": b, "at_imagenet_21k_gb": (a + b * IMAGENET_21K) / 1e9}
    common = [r for r in rows if "list" in r]
    if common:
        r = common[-1]
        summary["rss_ratio_list_over_store"] = {
            "n": r["n"],
            "after_batches": r["list"]["rss_after_batches_mb"] / r["store"]["rss_after_batches_mb"],
            "delta_over_imports": (r["list"]["rss_after_batches_mb"] - r["list"]["rss_imports_mb"])
            / max(1e-6, r["store"]["rss_after_batches_mb"] - r["store"]["rss_imports_mb"]),
        }
    store = [r for r in rows if "store" in r]
    summary["targets"] = {
        "rss_growth_le_100mb": summary.get("store", {}).get("rss_growth_mb", float("nan")) <= 100,
        "first_batch_le_30s_at_largest": store[-1]["store"]["first_batch_s"] <= 30,
        "largest_n": store[-1]["n"],
    }
    result["summary"] = summary
    print(
        "\n| N | disk B/image | path | register+build s | first batch s | RSS built MB | RSS after batches MB | "
        "peak MB | workers RSS MB | workers PSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for path in ("store", "list"):
            if path in r:
                m = r[path]
                print(
                    f"| {r['n']} | {r['disk_bytes_per_image']:.0f} | {path} | {m['register_and_build_s']:.2f} | "
                    f"{m['first_batch_s']:.2f} | {m['rss_built_mb']:.0f} | {m['rss_after_batches_mb']:.0f} | "
                    f"{m['rss_peak_mb']:.0f} | {'/'.join(f'{v:.0f}' for v in m['worker_rss_mb'])} | "
                    f"{'/'.join(f'{v:.0f}' for v in m['worker_pss_mb'])} |"
                )
    print("\nExtrapolation to ImageNet-21K (%d images), linear fits in N:" % IMAGENET_21K)
    for path in ("store", "list"):
        if path in summary:
            s = summary[path]
            print(
                f"  {path}: RSS after batches {s['rss_after_batches_mb']['at_imagenet_21k']:.0f} MB "
                f"({s['rss_after_batches_mb']['per_image'] * 1e6:.1f} MB per 1M images), main+workers PSS "
                f"{s['pss_process_and_workers_mb']['at_imagenet_21k']:.0f} MB, first batch "
                f"{s['first_batch_s']['at_imagenet_21k']:.1f} s; RSS growth {s['measured_n'][0]}→"
                f"{s['measured_n'][1]}: {s['rss_growth_mb']:+.1f} MB"
            )
    disk = summary["disk"]
    print(f"  disk: {disk['bytes_per_image']:.0f} B/image → {disk['at_imagenet_21k_gb']:.1f} GB")
    if "rss_ratio_list_over_store" in summary:
        q = summary["rss_ratio_list_over_store"]
        print(
            f"  RSS list/store at N={q['n']}: {q['after_batches']:.2f}× (above imports: {q['delta_over_imports']:.1f}×)"
        )
    print(f"  targets: {summary['targets']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
