"""The store's files: directory and shard arithmetic, sidecars merged into the manifest, the store's
identity (format, shard size, producing config) and the per-shard skip/drop counts of labelling.

Shard ``k`` holds dataset indices ``[k*shard_size, (k+1)*shard_size)``; a shard counts as complete only
once its sidecar exists and the shard's size (and, when verifying, its sha256) matches it.
"""

import collections
import copy
import logging
import os
import re

from ...utils.errors import ConfigError, DatasetNotFoundError, UserError
from ...utils.io import atomic_write_json, read_json, sha256_file
from .records import jsonable

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CorruptShardError",
    "is_plain_name",
    "store_dir",
    "shard_stem",
    "shard_of",
    "num_shards_for",
    "shard_index_range",
    "shards_for_rank",
    "EVAL_ONLY_KEYS",
    "config_value",
    "without_eval_only_keys",
    "check_format",
    "list_sidecars",
    "complete_sidecar",
    "merge_sidecars",
    "read_manifest",
    "counts_path",
    "write_shard_counts",
    "merge_shard_counts",
    "record_store_outcome",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "part_distillation.pseudo_labels"
FORMAT_VERSION = 1
_SHARD_DIGITS = 5
_SHARD_RE = re.compile(r"^shard-(\d+)\.json$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CorruptShardError(UserError):
    """A shard file does not match the checksum its sidecar/manifest recorded (or cannot be decoded)."""


# ------------------------------------------------------------------------------------------
# Paths and shard arithmetic
# ------------------------------------------------------------------------------------------
def is_plain_name(value) -> bool:
    """Whether ``value`` may be a source or stage name (letters, digits, '_', '-', '.'; not starting with one
    of the last three): it becomes a directory and part of a dataset name."""
    return isinstance(value, str) and bool(_NAME_RE.match(value))


def _check_name(value, what):
    if not is_plain_name(value):
        raise ConfigError(
            f"pseudo-label {what} {value!r} must be a plain name (letters, digits, '_', '-', '.'); "
            "it becomes a directory and part of the dataset name"
        )
    return value


def store_dir(root: str, source: str, stage: str) -> str:
    """``<root>/<source>/<stage>``: where one stage's labels of one source dataset live."""
    return os.path.join(root, _check_name(source, "source"), _check_name(stage, "stage"))


def shard_stem(k: int) -> str:
    """File name stem of shard ``k``: ``shard-00042``."""
    return f"shard-{k:0{_SHARD_DIGITS}d}"


def shard_of(index: int, shard_size: int) -> int:
    """The shard holding dataset index ``index``."""
    return index // shard_size


def num_shards_for(num_images: int, shard_size: int) -> int:
    return -(-num_images // shard_size)


def shard_index_range(k: int, shard_size: int, num_images=None) -> range:
    """Dataset indices of shard ``k`` (clipped to ``num_images`` when given)."""
    stop = (k + 1) * shard_size
    if num_images is not None:
        stop = min(stop, num_images)
    return range(k * shard_size, stop)


def shards_for_rank(num_shards: int, rank: int = 0, world_size: int = 1) -> list:
    """Shards owned by ``rank``: ``rank, rank + world_size, ...`` (round-robin balances the tail)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return list(range(rank, num_shards, world_size))


# ------------------------------------------------------------------------------------------
# Identity: the producing config
# ------------------------------------------------------------------------------------------
def config_value(config):
    """The producing config as JSON: a CfgNode becomes its YAML dump, a dict stays a dict."""
    if config is None or isinstance(config, str):
        return config
    if hasattr(config, "dump"):  # detectron2/yacs CfgNode
        return config.dump()
    return jsonable(config, {}, "config")


# Config keys that do not change the labels (evaluation/reporting only): kept out of a store's identity,
# so changing them never refuses --resume.
EVAL_ONLY_KEYS = ("MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET",)


def without_eval_only_keys(config):
    """``config`` (a nested dict keyed by config groups, e.g. ``{"MODEL": {...}}``) without :data:`EVAL_ONLY_KEYS`."""
    if not isinstance(config, dict):
        return config
    config = copy.deepcopy(config)
    for key in EVAL_ONLY_KEYS:
        parts = key.split(".")
        for split in range(len(parts) - 1, 0, -1):  # groups may be flattened ("DATASETS.TEST": [...])
            node = config.get(".".join(parts[:split]))
            for k in parts[split:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
    return config


# ------------------------------------------------------------------------------------------
# Manifest: merged sidecars
# ------------------------------------------------------------------------------------------
def check_format(meta: dict, path: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a pseudo-label store file (format {meta.get('format')!r}); check --root")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path} has store format version {meta['version']}, newer than this code's {FORMAT_VERSION}; "
            "update part_distillation"
        )


def list_sidecars(shard_dir: str) -> dict:
    found = {}
    if os.path.isdir(shard_dir):
        for name in os.listdir(shard_dir):
            m = _SHARD_RE.match(name)
            if m:
                found[int(m.group(1))] = os.path.join(shard_dir, name)
    return found


def complete_sidecar(directory, k, store_meta, verify):
    """The sidecar of shard ``k`` if the shard is complete (and, with ``verify``, its sha256 matches)."""
    shard_dir = os.path.join(directory, "shards")
    try:
        side = read_json(os.path.join(shard_dir, shard_stem(k) + ".json"))
    except (FileNotFoundError, ValueError):  # absent, or torn by something other than our writer
        return None
    if side.get("shard") != k or side.get("shard_size") != store_meta["shard_size"]:
        return None
    if side.get("config_sha256") != store_meta["config_sha256"]:
        return None
    path = os.path.join(shard_dir, side["file"])
    try:
        if os.path.getsize(path) != side["bytes"]:
            return None
    except FileNotFoundError:
        return None
    if verify and sha256_file(path) != side["sha256"]:
        return None
    return side


def merge_sidecars(directory: str, store_meta: dict, num_images=None, verify=False) -> dict:
    num_images = store_meta.get("num_images") if num_images is None else num_images
    sidecars = list_sidecars(os.path.join(directory, "shards"))
    if num_images is None:
        num_shards = max(sidecars) + 1 if sidecars else 0
    else:
        num_shards = num_shards_for(num_images, store_meta["shard_size"])
    stale = sorted(k for k in sidecars if k >= num_shards)
    if stale:
        logger.warning(
            "Ignoring %d shard(s) beyond the dataset's %d shards in %s: %s",
            len(stale),
            num_shards,
            directory,
            stale[:10],
        )
    shards, missing = [], []
    for k in range(num_shards):
        side = complete_sidecar(directory, k, store_meta, verify) if k in sidecars else None
        if side is None:
            missing.append(k)
            continue
        shards.append(
            {
                "shard": k,
                "file": "shards/" + side["file"],
                "index_range": [
                    side["index_range"][0],
                    min(side["index_range"][1], num_images or side["index_range"][1]),
                ],
                "num_images": side["num_images"],
                "num_objects": side["num_objects"],
                "num_parts": side["num_parts"],
                "bytes": side["bytes"],
                "sha256": side["sha256"],
                "first_image_id": side["first_image_id"],
                "last_image_id": side["last_image_id"],
            }
        )
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": store_meta["source"],
        "stage": store_meta["stage"],
        "shard_size": store_meta["shard_size"],
        "num_images_expected": num_images,
        "num_shards": num_shards,
        "complete": num_images is not None and not missing,
        "missing_shards": missing,
        "num_images": sum(s["num_images"] for s in shards),
        "num_objects": sum(s["num_objects"] for s in shards),
        "num_parts": sum(s["num_parts"] for s in shards),
        "config": store_meta.get("config"),
        "config_sha256": store_meta["config_sha256"],
        "shards": shards,
    }


def read_manifest(root: str, source: str, stage: str) -> dict:
    """The store's manifest: ``manifest.json`` if finalize() wrote it, else the sidecars merged now.

    Raises:
        DatasetNotFoundError: nothing was ever written at ``<root>/<source>/<stage>``.
    """
    directory = store_dir(root, source, stage)
    manifest_path = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest_path):
        manifest = read_json(manifest_path)
        check_format(manifest, manifest_path)
        return manifest
    store_path = os.path.join(directory, "store.json")
    if not os.path.isfile(store_path):
        raise DatasetNotFoundError(
            f"pseudo-label store not found: {directory} has no manifest.json or store.json; run "
            f"tools/make_pseudo_labels.py for source {source!r} and stage {stage!r}, or fix the root/source/stage"
        )
    store_meta = read_json(store_path)
    check_format(store_meta, store_path)
    logger.info(
        "%s has no manifest.json (writers still running, or finalize() not called): merging sidecars", directory
    )
    return merge_sidecars(directory, store_meta)


# ------------------------------------------------------------------------------------------
# Labelling counts
# ------------------------------------------------------------------------------------------
def counts_path(shard_dir: str, k: int) -> str:
    """Per-shard skip/drop counts written by labelling (see :func:`merge_shard_counts`)."""
    return os.path.join(shard_dir, shard_stem(k) + ".counts.json")


def write_shard_counts(shard_dir: str, k: int, counts: dict) -> None:
    atomic_write_json(counts_path(shard_dir, k), counts, compact=True)


def merge_shard_counts(directory: str, shards) -> dict:
    """Skip/drop counts of ``shards`` summed by reason, plus the shards that have no counts file
    (labelled by a version that did not count, or killed between the shard and its counts)."""
    merged = {
        "skipped_by_reason": collections.Counter(),
        "dropped_by_reason": collections.Counter(),
        "first_skipped": [],
    }
    uncounted = []
    for k in shards:
        path = counts_path(os.path.join(directory, "shards"), k)
        if not os.path.isfile(path):
            uncounted.append(k)
            continue
        c = read_json(path)
        merged["skipped_by_reason"].update(c.get("skipped_by_reason", {}))
        merged["dropped_by_reason"].update(c.get("dropped_by_reason", {}))
        merged["first_skipped"] += c.get("first_skipped", [])[: max(0, 5 - len(merged["first_skipped"]))]
    out = {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in merged.items()}
    out["skipped"] = sum(out["skipped_by_reason"].values())
    out["shards_without_counts"] = uncounted
    return out


def record_store_outcome(directory: str, counts: dict, failed=None) -> dict:
    """Add the run's ``counts`` (and, when labelling failed, ``failed``: the reason; ``complete`` becomes
    false so that no later stage trains on it) to the store's ``manifest.json``, atomically."""
    path = os.path.join(directory, "manifest.json")
    manifest = read_json(path)
    manifest["counts"] = counts
    if failed:
        manifest["failed"] = failed
        manifest["complete"] = False
    else:
        manifest.pop("failed", None)
    atomic_write_json(path, manifest)
    return manifest
