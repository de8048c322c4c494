#!/usr/bin/env python
"""Batched torch K-means vs the reference's per-instance scikit-learn loop (pixel grouping, stage 1).

Workload (anchors §4.1, spec §2.3): 64 object instances with N in [1200, 1600] stride-8 feature
pixels each (padded to 1600, so padding is exercised), C = 1536 (res3+res4-like), K = 4,
n_init = 10. Features are drawn from a per-instance Gaussian mixture with more components than K
(parts are not exactly 4 blobs) plus a shared positive offset (backbone features are far from 0),
so clusters exist but K-means needs a few iterations.

Both sides run in the same process on the same data:

* ``sklearn``: what the reference does, ``KMeans(n_clusters=4, n_init=10, random_state=0).fit``
  on every instance's valid features (float32 NumPy, CPU);
* ``torch``: ``batched_kmeans`` on all instances at once (on ``--device``).

Reported: seconds, speed-up, mean inertia of each, relative inertia difference (mean and worst
instance; positive = torch worse) and the mean adjusted Rand index between the two labelings.
Results go to benchmarks/results/kmeans.json.

    python benchmarks/kmeans.py [--device cpu|cuda] [--threads 2] [--instances 64] [--repeats 1]
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from part_distillation.modeling.grouping.kmeans import batched_kmeans  # noqa: E402

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


def run_sklearn(x, valid, k, n_init):
    """The reference: one scikit-learn K-means per instance. Returns seconds, inertia, labels."""
    from sklearn.cluster import KMeans

    inertia, labels = [], []
    start = time.perf_counter()
    for b in range(x.shape[0]):
        km = KMeans(n_clusters=k, n_init=n_init, random_state=0).fit(x[b][valid[b]])
        inertia.append(km.inertia_)
        labels.append(km.labels_)
    return time.perf_counter() - start, np.asarray(inertia, dtype=np.float64), labels


def run_torch(x, valid, k, n_init, device, repeats):
    """Batched K-means; the time is the best of ``repeats`` runs, input already on the device."""
    xt = torch.from_numpy(x).to(device)
    vt = torch.from_numpy(valid).to(device)
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = batched_kmeans(xt, vt, k, n_init=n_init, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    inertia = result.inertia.double().cpu().numpy()
    labels = [result.labels[b].cpu().numpy()[valid[b]] for b in range(x.shape[0])]
    return best, inertia, labels, result.n_iter.float().mean().item()


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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


def write_json_atomic(path, payload):
    """Write via a temporary file in the same directory + rename, so readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kmeans.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (falls back to cpu if unavailable)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--min-points", type=int, default=1200)
    parser.add_argument("--max-points", type=int, default=1600)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n-init", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="torch runs (best time is reported)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available; running on cpu.")
        device = torch.device("cpu")

    x, valid = make_instances(args.instances, args.min_points, args.max_points, args.channels)
    if device.type == "cuda":  # warm-up: CUDA context and kernels
        run_torch(x[:2], valid[:2], args.k, args.n_init, device, 1)
    t_torch, inertia_torch, labels_torch, iters = run_torch(x, valid, args.k, args.n_init, device, args.repeats)
    t_sk, inertia_sk, labels_sk = run_sklearn(x, valid, args.k, args.n_init)

    from sklearn.metrics import adjusted_rand_score

    rel = (inertia_torch - inertia_sk) / inertia_sk
    ari = float(np.mean([adjusted_rand_score(a, b) for a, b in zip(labels_sk, labels_torch)]))
    summary = {
        "sklearn_s": t_sk,
        "torch_s": t_torch,
        "speedup": t_sk / t_torch,
        "sklearn_mean_inertia": float(inertia_sk.mean()),
        "torch_mean_inertia": float(inertia_torch.mean()),
        "rel_inertia_diff_of_means": float(inertia_torch.mean() / inertia_sk.mean() - 1.0),
        "rel_inertia_diff_mean": float(rel.mean()),
        "rel_inertia_diff_worst": float(rel.max()),
        "mean_adjusted_rand": ari,
        "torch_mean_n_iter": iters,
    }
    print(f"{'':>8} {'seconds':>9} {'mean inertia':>14}")
    print(f"{'sklearn':>8} {t_sk:9.3f} {inertia_sk.mean():14.1f}")
    print(f"{'torch':>8} {t_torch:9.3f} {inertia_torch.mean():14.1f}")
    print(
        f"speed-up {summary['speedup']:.1f}x | inertia torch vs sklearn: "
        f"{100 * summary['rel_inertia_diff_of_means']:+.3f}% of means, "
        f"{100 * summary['rel_inertia_diff_mean']:+.3f}% mean per instance, "
        f"{100 * summary['rel_inertia_diff_worst']:+.3f}% worst | ARI {ari:.4f} | device {device}"
    )
    payload = {
        "benchmark": "kmeans",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "workload": {
            "instances": args.instances,
            "points": [args.min_points, args.max_points],
            "channels": args.channels,
            "k": args.k,
            "n_init": args.n_init,
            "dtype": "float32",
        },
        "targets": {"speedup_min": 10.0, "rel_inertia_diff_max": 0.01},
        "results": summary,
    }
    write_json_atomic(args.output, payload)
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
