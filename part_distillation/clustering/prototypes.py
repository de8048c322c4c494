"""Per-object-class clustering of part features and the prototypes file: the one owner of both.

PartDistillation (Cho et al. 2023) clusters part features *per object class* in two places, both here:

* **Class-specific part ranking** (stage 3, Eq. 4; also the one-stage baseline's class-level pixel grouping):
  the features of all parts of an object class across the dataset become ``K`` prototypes
  (:func:`cluster_prototypes`, Euclidean K-means as the reference code's scikit-learn default), saved to a
  prototypes file (:func:`save_prototypes`) that the labelling pass and the models read back
  (:func:`load_prototypes`); a part's scores are ``softmax_k(−‖f − μ_k‖₂ / T)`` (:func:`prototype_soft_scores`).
* **mIoU-clustered** evaluation: the part features of every object class of the evaluated split are clustered
  and the cluster ids become the predicted part ids (:func:`cluster_features_per_class`).

Both go through :func:`cluster_per_class`, one :func:`~part_distillation.clustering.kmeans.batched_kmeans` per
class (best of ``n_init`` k-means++ restarts; a class with fewer than K distinct features gets fewer clusters).

Prototypes file (``torch.save`` of a dict, written atomically, read with ``weights_only=True``)::

    {"prototypes": float [C, K, D],   # rows beyond a class's num_clusters (and classes without parts) are 0
     "num_clusters": long [C],        # effective K per object class (0: no prototypes)
     "num_features": long [C]}        # part features clustered per class
"""

import os
import pickle
from typing import Dict, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils import comm

from ..utils.errors import ConfigError
from ..utils.io import atomic_file
from .kmeans import batched_kmeans

__all__ = [
    "DEFAULT_FILENAME",
    "ClassClusters",
    "cluster_per_class",
    "cluster_features_per_class",
    "cluster_prototypes",
    "save_prototypes",
    "load_prototypes",
    "prototype_soft_scores",
]

# Name of the prototypes file in OUTPUT_DIR when none is given (tools/rank_parts.py --prototypes).
DEFAULT_FILENAME = "prototypes.pth"
# batched_kmeans chunks of classes: at most this many padded feature values (B * N * D) per call.
_KMEANS_CHUNK_ELEMENTS = 2**26


class ClassClusters(NamedTuple):
    """K-means of one class's features."""

    labels: torch.Tensor  # long [N_c], cluster id of every feature
    centers: torch.Tensor  # [K, D] (rows beyond num_clusters are 0; [K, 0] for a class without features)
    num_clusters: int  # effective K: min(K, distinct features)


def cluster_per_class(
    features_by_class,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    seed: int = 0,
    normalize: bool = True,
    batch_classes: bool = True,
) -> Dict[int, ClassClusters]:
    """K-means (Euclidean, ``k`` clusters, best of ``n_init`` restarts, ``seed``) of every class's feature set.

    Args:
        features_by_class: dict class → [N_c, D] float tensor (or array).
        normalize: L2-normalise the features first (the reference code clusters unit-norm features for
            mIoU-clustered).
        batch_classes: cluster classes of similar size together (one padded problem per chunk); False: one
            K-means call per class. Both give the same labels (batched_kmeans does not depend on batching).
    Returns:
        dict class → :class:`ClassClusters`; a class without features gets empty labels and 0 clusters.
    """
    items = []
    for c, feats in features_by_class.items():
        feats = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats).float()
        if normalize and len(feats):
            feats = F.normalize(feats, dim=-1)
        items.append((c, feats))
    items.sort(key=lambda item: -len(item[1]))
    out = {
        c: ClassClusters(torch.zeros(0, dtype=torch.long), f.new_zeros(k, f.shape[-1] if f.dim() == 2 else 0), 0)
        for c, f in items
        if len(f) == 0
    }
    items = [(c, f) for c, f in items if len(f)]
    start = 0
    while start < len(items):
        if batch_classes:
            n_max, dim = items[start][1].shape
            per_chunk = max(1, _KMEANS_CHUNK_ELEMENTS // max(1, n_max * dim))
            chunk = items[start : start + per_chunk]
            x = torch.zeros(len(chunk), n_max, dim)
            valid = torch.zeros(len(chunk), n_max, dtype=torch.bool)
            for i, (_, feats) in enumerate(chunk):
                x[i, : len(feats)] = feats
                valid[i, : len(feats)] = True
        else:
            per_chunk, chunk = 1, items[start : start + 1]
            x, valid = chunk[0][1][None], None
        result = batched_kmeans(x, valid, k, n_init=n_init, max_iter=max_iter, metric="l2", seed=seed)
        for i, (c, feats) in enumerate(chunk):
            out[c] = ClassClusters(result.labels[i, : len(feats)], result.centers[i], int(result.num_clusters[i]))
        start += per_chunk
    return out


def cluster_features_per_class(features_by_class, k: int, n_init: int = 10, seed: int = 0, normalize: bool = True):
    """Cluster ids of every class's features (mIoU-clustered): dict class → int64 numpy [N_c].

    Classes are batched by size; ``normalize`` L2-normalises the features first (see :func:`cluster_per_class`).
    """
    clusters = cluster_per_class(features_by_class, k, n_init=n_init, seed=seed, normalize=normalize)
    return {c: r.labels.numpy().astype(np.int64) for c, r in clusters.items()}


def cluster_prototypes(
    classes, feats, num_classes: int, k: int, n_init: int, max_iter: int, seed: int, rank: int = 0, world_size: int = 1
):
    """Prototypes of the classes r, r+W, ... of this rank, all-gathered: ([C, K, D], num_clusters [C], counts [C]).

    ``classes`` [P] (object class of every feature; < 0 = none, not clustered) and ``feats`` [P, D] are the
    whole dataset's, in dataset order. Every class is one deterministic K-means, so the result does not depend
    on the number of processes.
    """
    dim = feats.shape[1]
    mine = {}
    for c in range(rank, num_classes, world_size):
        x = feats[classes == c]
        if len(x) == 0:
            continue
        result = cluster_per_class(
            {c: x}, k, n_init=n_init, max_iter=max_iter, seed=seed, normalize=False, batch_classes=False
        )[c]
        mine[c] = (result.centers.float(), result.num_clusters, len(x))
    prototypes = torch.zeros(num_classes, k, dim)
    num_clusters = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for part in comm.all_gather(mine):
        for c, (centers, n, count) in part.items():
            prototypes[c], num_clusters[c], counts[c] = centers, n, count
    return prototypes, num_clusters, counts


def save_prototypes(path: str, prototypes, num_clusters, counts) -> None:
    """Write the prototypes file (module doc) atomically: a temporary file in the same folder, then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as f:
        torch.save({"prototypes": prototypes, "num_clusters": num_clusters, "num_features": counts}, f)


def load_prototypes(path: str, setting: str = "MODEL.ONE_STAGE.PROTOTYPES"):
    """(prototypes [C, K, D], num_clusters [C]) from a prototypes file; ``setting`` names where the path came
    from in the one-line error of a missing or wrong file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{setting}={path!r} does not exist; write it with tools/rank_parts.py.")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{setting}={path!r} is not a prototypes file ({type(e).__name__}).")
    if not isinstance(saved, dict) or not {"prototypes", "num_clusters"} <= set(saved):
        raise ConfigError(f"{path} is not a prototypes file (needs 'prototypes' and 'num_clusters').")
    return saved["prototypes"], saved["num_clusters"]


def prototype_soft_scores(features, prototypes, num_clusters: int, temperature: float = 1.0):
    """softmax_k(−‖f − μ_k‖₂ / T) over the first ``num_clusters`` prototypes; [P, K] (zeros beyond)."""
    k = prototypes.shape[0]
    out = torch.zeros(features.shape[0], k, dtype=torch.float32, device=features.device)
    if num_clusters <= 0 or features.shape[0] == 0:
        return out
    dist = torch.cdist(features.float(), prototypes[:num_clusters].float().to(features.device))
    out[:, :num_clusters] = torch.softmax(-dist / float(temperature), dim=-1)
    return out
