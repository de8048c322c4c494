#!/usr/bin/env python
"""Batched torch K-means vs the reference's per-instance scikit-learn loop (pixel grouping, stage 1).

Workload (stage 1 of PartDistillation, supp. §2): 64 object instances with N in [1200, 1600] stride-8 feature
pixels each (padded to 1600, so padding is exercised), C = 1536 (res3+res4-like), K = 4,
n_init = 10. Features are drawn from a per-instance Gaussian mixture with more components than K
(parts are not exactly 4 blobs) plus a shared positive offset (backbone features are far from 0),
so clusters exist but K-means needs a few iterations.

Both sides run in the same process on the same data:

* ``sklearn``: what the reference does, ``KMeans(n_clusters=4, n_init=10, random_state=0).fit``
  on every instance's valid features (float32 NumPy, CPU);
* ``torch``: ``batched_kmeans`` on all instances at once (on ``--device``), exact
  (``project_dim=0``) and with the stage-1 default ``project_dim`` (``--project-dim``, the config's
  ``MODEL.PIXEL_GROUPING.KMEANS_PROJECT_DIM``: restarts in a random projection, the best ones
  finished by exact full-dimensional Lloyd). The targets apply to the configured (projected) run.

Reported: seconds, speed-up, mean inertia of each, relative inertia difference (of the means, and
the worst instance; positive = torch worse) and the mean adjusted Rand index between the two
labelings. On CPU the torch run is repeated with one thread: on the shared 2-core machine another
process holding a core makes 2-thread OpenMP runs erratic, and the load average is recorded.
scikit-learn runs with one thread by default (its fastest setting there, see ``run_sklearn``).
Results go to benchmarks/results/kmeans.json.

    python benchmarks/kmeans.py [--device cpu|cuda] [--threads 2] [--sklearn-threads 1|default] [--project-dim 64]
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.data.pseudo_labels import atomic_write_bytes  # noqa: E402
from part_distillation.clustering.kmeans import batched_kmeans  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kmeans.json")


def make_instances(num, min_points, max_points, channels, components=6, separation=0.06, seed=0):
    """Padded features [B, N_max, C] float32 and the validity mask [B, N_max].

    Each instance mixes ``components`` Gaussians (unit noise, means with per-dimension scale
    ``separation``: neighbouring parts overlap a little, as real part features do) with unequal
    weights, on top of a shared non-negative offset.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((num, max_points, channels), dtype=np.float32)
    valid = np.zeros((num, max_points), dtype=bool)
    offset = np.abs(rng.normal(size=channels)).astype(np.float32)
    for b in range(num):
        n = int(rng.integers(min_points, max_points + 1))
        means = rng.normal(scale=separation * np.sqrt(channels / 8.0), size=(components, channels))
        weights = rng.dirichlet(np.full(components, 2.0))
        labels = rng.choice(components, size=n, p=weights)
        x[b, :n] = offset + means[labels] + rng.normal(size=(n, channels))
        valid[b, :n] = True
    return x, valid


def run_sklearn(x, valid, k, n_init, threads):
    """The reference: one scikit-learn K-means per instance. Returns seconds, inertia, labels.

    ``threads``: OpenMP/BLAS threads of scikit-learn (None: its defaults). Next to torch on the
    2-core machine its defaults oversubscribe the cores and run ~10-40x slower than one thread,
    so the fair baseline is one thread.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    inertia, labels = [], []
    with threadpool_limits(limits=threads):
        start = time.perf_counter()
        for b in range(x.shape[0]):
            km = KMeans(n_clusters=k, n_init=n_init, random_state=0).fit(x[b][valid[b]])
            inertia.append(km.inertia_)
            labels.append(km.labels_)
        seconds = time.perf_counter() - start
    return seconds, np.asarray(inertia, dtype=np.float64), labels


def run_torch(x, valid, k, n_init, device, repeats, threads, project_dim=0):
    """Batched K-means with ``threads`` intra-op threads; best time of ``repeats`` runs (input on device)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xt = torch.from_numpy(x).to(device)
        vt = torch.from_numpy(valid).to(device)
        batched_kmeans(xt[:2], vt[:2], k, n_init=n_init, project_dim=project_dim)  # warm-up: allocator, threads, CUDA
        best, result = float("inf"), None
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            result = batched_kmeans(xt, vt, k, n_init=n_init, seed=0, project_dim=project_dim)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    inertia = result.inertia.double().cpu().numpy()
    labels = [result.labels[b].cpu().numpy()[valid[b]] for b in range(x.shape[0])]
    return best, inertia, labels, result.n_iter.float().mean().item()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device": str(device),
    }
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def compare(name, seconds, inertia, labels, reference):
    """One table row: timing and inertia of a torch run against the scikit-learn reference."""
    from sklearn.metrics import adjusted_rand_score

    ref_seconds, ref_inertia, ref_labels = reference
    rel = (inertia - ref_inertia) / ref_inertia
    return {
        "name": name,
        "seconds": seconds,
        "speedup": ref_seconds / seconds,
        "mean_inertia": float(inertia.mean()),
        "rel_inertia_diff_of_means": float(inertia.mean() / ref_inertia.mean() - 1.0),
        "rel_inertia_diff_mean": float(rel.mean()),
        "rel_inertia_diff_worst": float(rel.max()),
        "mean_adjusted_rand_vs_sklearn": float(
            np.mean([adjusted_rand_score(a, b) for a, b in zip(ref_labels, labels)])
        ),
    }


def print_table(reference, rows):
    print(f"{'':<36} {'seconds':>8} {'vs sklearn':>10} {'mean inertia':>14} {'rel. diff':>10} {'worst':>8}")
    print(f"{reference['name']:<36} {reference['seconds']:8.3f} {'1.0x':>10} {reference['mean_inertia']:14.1f}")
    for row in rows:
        print(
            f"{row['name']:<36} {row['seconds']:8.3f} {row['speedup']:9.1f}x {row['mean_inertia']:14.1f} "
            f"{100 * row['rel_inertia_diff_of_means']:+9.3f}% {100 * row['rel_inertia_diff_worst']:+7.2f}%"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (falls back to cpu if unavailable)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--sklearn-threads", default="1", help="scikit-learn OpenMP/BLAS threads, or 'default'")
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--min-points", type=int, default=1200)
    parser.add_argument("--max-points", type=int, default=1600)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n-init", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="torch runs (best time is reported)")
    parser.add_argument(
        "--project-dim", type=int, default=None, help="projected run's project_dim (default: the config's)"
    )
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available; running on cpu.")
        device = torch.device("cpu")
    sklearn_threads = None if args.sklearn_threads == "default" else int(args.sklearn_threads)
    load_before = _load()

    project_dim = args.project_dim
    if project_dim is None:
        from part_distillation.config import add_part_distillation_config
        from detectron2.config import get_cfg

        project_dim = add_part_distillation_config(get_cfg()).MODEL.PIXEL_GROUPING.KMEANS_PROJECT_DIM
    x, valid = make_instances(args.instances, args.min_points, args.max_points, args.channels)
    thread_counts = [args.threads] + ([1] if device.type == "cpu" and args.threads != 1 else [])  # 1: immune
    runs = []  # to another process holding a core
    for dim in [project_dim] + ([0] if project_dim else []):
        kind = f"projected d={dim}" if dim else "exact"
        for threads in thread_counts:
            runs.append((f"torch {device.type} {kind}, {threads} thr", threads, dim))
    measured = []
    for name, threads, dim in runs:
        seconds, inertia, labels, iters = run_torch(x, valid, args.k, args.n_init, device, args.repeats, threads, dim)
        measured.append((name, seconds, inertia, labels, iters, dim))
    reference = run_sklearn(x, valid, args.k, args.n_init, sklearn_threads)

    sk_name = f"sklearn loop, {args.sklearn_threads} thread(s)"
    sk_row = {"name": sk_name, "seconds": reference[0], "mean_inertia": float(reference[1].mean())}
    rows = []
    for name, seconds, inertia, labels, iters, dim in measured:
        row = compare(name, seconds, inertia, labels, reference)
        row["mean_n_iter_best_restart"] = iters
        row["project_dim"] = dim
        rows.append(row)
    print_table(sk_row, rows)
    payload = {
        "benchmark": "kmeans",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": _load()},
        "workload": {
            "instances": args.instances,
            "points": [args.min_points, args.max_points],
            "channels": args.channels,
            "k": args.k,
            "n_init": args.n_init,
            "dtype": "float32",
            "torch_repeats": args.repeats,
            "project_dim": project_dim,
        },
        "targets": {"speedup_min": 10.0, "rel_inertia_diff_max": 0.01, "applies_to": "the first torch row"},
        "sklearn": sk_row,
        "torch": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write_bytes(args.output, json.dumps(payload, indent=1).encode())
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
