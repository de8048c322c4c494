"""The pseudo-label store: sharded, checksummed, resumable, one format for every stage.

Stage 1 (pixel grouping), stage 3 (ranking) and later self-training rounds write part
pseudo-labels here; stages 2 and 4 train on them through a registered detectron2 dataset.

Record (one per image; a plain JSON-serialisable dict)::

    {"image_id": str | int,           # unique within the source dataset
     "file_name": str,                # full image path
     "height": int, "width": int,     # size of the image the masks refer to
     "class_code": str | None,        # optional (e.g. the ImageNet wnid)
     "objects": [{"category_id": int (-1 = unknown), "score": float,
                  "bbox": [x0, y0, x1, y1] (XYXY_ABS),
                  "segmentation": {"size": [H, W], "counts": str},   # compressed COCO RLE
                  "parts": [{"segmentation": RLE, "score": float,
                             "part_class": int (optional), "soft_scores": [float] (optional)}]}]}

The store adds ``"index"``: the record's position in the source dataset's ordered list.

Layout under ``<root>/<source>/<stage>/``::

    store.json                      format version, source, stage, shard_size, num_images, config
    shards/shard-00000.jsonl.gz     gzip (mtime 0, no file name) of one canonical JSON record per
                                    line, sorted by dataset index: byte-identical on every rerun
    shards/shard-00000.json         sidecar: index range, counts, sha256 of the shard, image ids
    manifest.json                   merged sidecars, written by finalize() once all writers are done

Why this format: RLE counts are already compressed, so JSON + gzip is compact (see
benchmarks/pseudo_label_store.py), readable by anything (``zcat | head``), deterministic, and loading
it executes no code (unlike the reference's one ``torch.save`` pickle per image, reference code).

Sharding: shard ``k`` holds the records of dataset indices ``[k*shard_size, (k+1)*shard_size)``, so
writer processes (distributed ranks) that own disjoint shards (rank ``r`` takes ``r, r+W, ...``;
:meth:`PseudoLabelWriter.pending_indices`) never touch the same file. Each shard gets its own sidecar
instead of a shared manifest that every rank would rewrite; :meth:`PseudoLabelWriter.finalize`
(one process, after all ranks finished) merges the sidecars into ``manifest.json``. Every file is
written to a temporary file in its directory, fsynced and renamed, and a shard counts as complete
only once its sidecar exists and the shard's sha256 matches it: a shard is complete or absent.

Image ids: the manifest keeps, per shard, the first/last image id and the count (≈250 bytes a shard,
≈3.5 MB for 14M images in 1000-image shards) rather than every id (≈300 MB at that scale). The full
id list of a shard lives in its sidecar; the reader builds the id→shard map from the sidecars only
when asked for an image by id. Lookup by dataset index needs no map: the shard is ``index // shard_size``.
"""

import collections
import contextlib
import copy
import functools
import glob
import gzip
import hashlib
import io
import json
import logging
import numbers
import os
import re
import tempfile

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from ...structures.masks import decode_rle as decode_mask  # noqa: F401  (re-exported)
from ...structures.masks import encode_mask  # noqa: F401  (re-exported)
from ...utils.errors import ConfigError, DatasetNotFoundError, UserError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CorruptShardError",
    "atomic_write_bytes",
    "encode_mask",
    "decode_mask",
    "mask_area",
    "make_part",
    "make_object",
    "validate_record",
    "store_dir",
    "shard_of",
    "num_shards_for",
    "shard_index_range",
    "shards_for_rank",
    "read_manifest",
    "EVAL_ONLY_KEYS",
    "write_shard_counts",
    "merge_shard_counts",
    "record_store_outcome",
    "PseudoLabelWriter",
    "PseudoLabelReader",
    "record_to_dataset_dict",
    "require_complete",
    "read_shard_text",
    "load_pseudo_label_dicts",
    "pseudo_label_dataset_name",
    "register_pseudo_label_dataset",
    "register_all_pseudo_label_datasets",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "part_distillation.pseudo_labels"
FORMAT_VERSION = 1
_GZIP_LEVEL = 6  # level 9: ~2x slower for ~2% smaller shards (RLE counts are near-incompressible)
_SHARD_DIGITS = 5
_SHARD_RE = re.compile(r"^shard-(\d+)\.json$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FIX_CORRUPT = "delete it and rerun make_pseudo_labels.py with --resume"


class CorruptShardError(UserError):
    """A shard file does not match the checksum its sidecar/manifest recorded (or cannot be decoded)."""


# ------------------------------------------------------------------------------------------
# Masks and records
# ------------------------------------------------------------------------------------------
def mask_area(rle: dict) -> int:
    """Pixel count of an RLE mask, without decoding it."""
    return int(mask_util.area({"size": rle["size"], "counts": _counts_bytes(rle)}))


def _rle_bbox_xywh(rle: dict) -> list:
    box = mask_util.toBbox({"size": rle["size"], "counts": _counts_bytes(rle)})
    return [float(v) for v in box]


def _counts_bytes(rle):
    counts = rle["counts"]
    return counts.encode("ascii") if isinstance(counts, str) else counts


def _as_rle(mask_or_rle) -> dict:
    if isinstance(mask_or_rle, dict):
        return {"size": [int(s) for s in mask_or_rle["size"]], "counts": _counts_bytes(mask_or_rle).decode("ascii")}
    return encode_mask(mask_or_rle)


def make_part(mask_or_rle, score: float = 1.0, part_class=None, soft_scores=None) -> dict:
    """A part entry from a boolean mask (or an RLE); optional fields are left out when None."""
    part = {"segmentation": _as_rle(mask_or_rle), "score": float(score)}
    if part_class is not None:
        part["part_class"] = int(part_class)
    if soft_scores is not None:
        part["soft_scores"] = [float(s) for s in np.asarray(soft_scores, dtype=np.float64).ravel()]
    return part


def make_object(mask_or_rle, parts, score: float = 1.0, category_id: int = -1) -> dict:
    """An object entry; its XYXY_ABS box is computed from the mask ([0, 0, 0, 0] when empty)."""
    rle = _as_rle(mask_or_rle)
    x, y, w, h = _rle_bbox_xywh(rle)
    return {
        "category_id": int(category_id),
        "score": float(score),
        "bbox": [x, y, x + w, y + h],
        "segmentation": rle,
        "parts": list(parts),
    }


def _where(record, what):
    image_id = record.get("image_id", "?") if isinstance(record, dict) else "?"
    return f"pseudo-label record (image_id={image_id!r}): {what}"


def _as_int(value, record, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(_where(record, f"{what} must be an int, got {value!r}"))
    return int(value)


def _as_float(value, record, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(_where(record, f"{what} must be a finite float, got {value!r}"))
    return float(value)


def _check_rle(rle, size, record, what):
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        raise ValueError(_where(record, f"{what} must be a COCO RLE dict {{size, counts}}; use encode_mask()"))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise ValueError(_where(record, f"{what}.counts must be a compressed RLE string; use encode_mask()"))
    rle_size = [int(s) for s in rle["size"]]
    if rle_size != size:
        raise ValueError(_where(record, f"{what} has size {rle_size}, but the record's height/width is {size}"))
    return {"size": rle_size, "counts": counts}


def _jsonable(value, record, what):
    """Extra (non-schema) values: plain JSON types only; numpy scalars/arrays are converted."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _as_float(value, record, what)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, record, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, record, f"{what}.{k}") for k, v in value.items()}
    raise ValueError(_where(record, f"{what} is a {type(value).__name__}, which JSON cannot hold"))


def validate_record(record: dict) -> dict:
    """Check ``record`` against the schema (module docstring) and return a canonical copy.

    numpy scalars become Python numbers, RLE counts become str, a missing object ``bbox`` is
    computed from its mask. Keys outside the schema are kept if JSON can hold them.
    """
    if not isinstance(record, dict):
        raise ValueError(f"pseudo-label records are dicts, got {type(record).__name__}")
    for key in ("image_id", "file_name", "height", "width", "objects"):
        if key not in record:
            raise ValueError(_where(record, f"missing key {key!r}"))
    out = {}
    for key, value in record.items():
        if key in ("image_id", "file_name", "height", "width", "class_code", "objects", "index"):
            continue
        out[key] = _jsonable(value, record, key)
    image_id = record["image_id"]
    if isinstance(image_id, np.generic):
        image_id = image_id.item()
    if isinstance(image_id, bool) or not isinstance(image_id, (str, numbers.Integral)):
        raise ValueError(_where(record, "image_id must be a str or an int"))
    out["image_id"] = image_id if isinstance(image_id, str) else int(image_id)
    if not isinstance(record["file_name"], str) or not record["file_name"]:
        raise ValueError(_where(record, "file_name must be the image's full path"))
    out["file_name"] = record["file_name"]
    out["height"] = _as_int(record["height"], record, "height")
    out["width"] = _as_int(record["width"], record, "width")
    if out["height"] <= 0 or out["width"] <= 0:
        raise ValueError(_where(record, "height and width must be positive"))
    class_code = record.get("class_code")
    if class_code is not None and not isinstance(class_code, str):
        raise ValueError(_where(record, "class_code must be a str or None"))
    out["class_code"] = class_code
    size = [out["height"], out["width"]]
    objects = []
    for j, obj in enumerate(record["objects"]):
        where = f"objects[{j}]"
        if not isinstance(obj, dict) or "segmentation" not in obj or "parts" not in obj:
            raise ValueError(_where(record, f"{where} needs 'segmentation' and 'parts'; use make_object()"))
        o = {
            k: _jsonable(v, record, f"{where}.{k}")
            for k, v in obj.items()
            if k not in ("category_id", "score", "bbox", "segmentation", "parts")
        }
        o["category_id"] = _as_int(obj.get("category_id", -1), record, f"{where}.category_id")
        o["score"] = _as_float(obj.get("score", 1.0), record, f"{where}.score")
        o["segmentation"] = _check_rle(obj["segmentation"], size, record, f"{where}.segmentation")
        if obj.get("bbox") is None:
            x, y, w, h = _rle_bbox_xywh(o["segmentation"])
            o["bbox"] = [x, y, x + w, y + h]
        else:
            box = list(obj["bbox"])
            if len(box) != 4:
                raise ValueError(_where(record, f"{where}.bbox must be [x0, y0, x1, y1]"))
            o["bbox"] = [_as_float(v, record, f"{where}.bbox") for v in box]
        parts = []
        for i, part in enumerate(obj["parts"]):
            pwhere = f"{where}.parts[{i}]"
            if not isinstance(part, dict) or "segmentation" not in part:
                raise ValueError(_where(record, f"{pwhere} needs 'segmentation'; use make_part()"))
            p = {
                k: _jsonable(v, record, f"{pwhere}.{k}")
                for k, v in part.items()
                if k not in ("segmentation", "score", "part_class", "soft_scores")
            }
            p["segmentation"] = _check_rle(part["segmentation"], size, record, f"{pwhere}.segmentation")
            p["score"] = _as_float(part.get("score", 1.0), record, f"{pwhere}.score")
            if part.get("part_class") is not None:
                p["part_class"] = _as_int(part["part_class"], record, f"{pwhere}.part_class")
            if part.get("soft_scores") is not None:
                p["soft_scores"] = [
                    _as_float(s, record, f"{pwhere}.soft_scores") for s in np.asarray(part["soft_scores"]).ravel()
                ]
            parts.append(p)
        o["parts"] = parts
        objects.append(o)
    out["objects"] = objects
    return out


def _dumps(value) -> str:
    """Canonical JSON: sorted keys, no spaces, no NaN; identical input gives identical text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ------------------------------------------------------------------------------------------
# Paths and shard arithmetic
# ------------------------------------------------------------------------------------------
def _check_name(value, what):
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"pseudo-label {what} {value!r} must be a plain name (letters, digits, '_', '-', '.'); "
            "it becomes a directory and part of the dataset name"
        )
    return value


def store_dir(root: str, source: str, stage: str) -> str:
    """``<root>/<source>/<stage>``: where one stage's labels of one source dataset live."""
    return os.path.join(root, _check_name(source, "source"), _check_name(stage, "stage"))


def _shard_stem(k: int) -> str:
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


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _file_mode() -> int:
    """rw for everyone the umask allows (mkstemp's 0600 would hide a shared store from other users)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(final_path: str):
    """An open temporary file beside ``final_path``, named ``.<name>.<random>.tmp``."""
    directory, name = os.path.split(final_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _file_mode())
    except (AttributeError, OSError):  # platforms without fchmod
        pass
    return os.fdopen(fd, "wb"), tmp


def _publish(tmp: str, final_path: str) -> None:
    os.replace(tmp, final_path)
    _fsync_dir(os.path.dirname(final_path))


@contextlib.contextmanager
def _atomic_file(path: str):
    """Yield a binary file that replaces ``path`` when the block completes (fsynced, then renamed
    into place, so readers see the old file or the complete new one, never a partial one); on any
    error, including KeyboardInterrupt, the temporary file is removed and ``path`` is left as it was."""
    f, tmp = _temp_file(path)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def _atomic_write_json(path: str, value, compact: bool = False) -> None:
    """Sorted keys; ``compact`` on one line, else one top-level key per line with each list item
    (a manifest's shard entries) compact on its own line: readable, and small at 14k shards."""
    if compact:
        text = _dumps(value)
    else:
        lines = []
        for key in sorted(value):
            item = value[key]
            if isinstance(item, list) and item and isinstance(item[0], dict):
                body = ",\n".join("  " + _dumps(v) for v in item)
                lines.append(f" {json.dumps(key)}: [\n{body}\n ]")
            else:
                lines.append(f" {json.dumps(key)}: {_dumps(item)}")
        text = "{\n" + ",\n".join(lines) + "\n}"
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that hashes and counts the bytes written."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self):
        return True

    def write(self, data):
        self._f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


def _config_value(config):
    """The producing config as JSON: a CfgNode becomes its YAML dump, a dict stays a dict."""
    if config is None or isinstance(config, str):
        return config
    if hasattr(config, "dump"):  # detectron2/yacs CfgNode
        return config.dump()
    return _jsonable(config, {}, "config")


# ------------------------------------------------------------------------------------------
# Manifest: merged sidecars
# ------------------------------------------------------------------------------------------
def _check_format(meta: dict, path: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a pseudo-label store file (format {meta.get('format')!r}); check --root")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path} has store format version {meta['version']}, newer than this code's {FORMAT_VERSION}; "
            "update part_distillation"
        )


def _list_sidecars(shard_dir: str) -> dict:
    found = {}
    if os.path.isdir(shard_dir):
        for name in os.listdir(shard_dir):
            m = _SHARD_RE.match(name)
            if m:
                found[int(m.group(1))] = os.path.join(shard_dir, name)
    return found


def _sidecar_ok(directory, k, store_meta, verify):
    """The sidecar of shard ``k`` if the shard is complete (and, with ``verify``, its sha256 matches)."""
    shard_dir = os.path.join(directory, "shards")
    try:
        side = _read_json(os.path.join(shard_dir, _shard_stem(k) + ".json"))
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
    if verify and _sha256_file(path) != side["sha256"]:
        return None
    return side


def _merge_sidecars(directory: str, store_meta: dict, num_images=None, verify=False) -> dict:
    num_images = store_meta.get("num_images") if num_images is None else num_images
    sidecars = _list_sidecars(os.path.join(directory, "shards"))
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
        side = _sidecar_ok(directory, k, store_meta, verify) if k in sidecars else None
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
        manifest = _read_json(manifest_path)
        _check_format(manifest, manifest_path)
        return manifest
    store_path = os.path.join(directory, "store.json")
    if not os.path.isfile(store_path):
        raise DatasetNotFoundError(
            f"pseudo-label store not found: {directory} has no manifest.json or store.json; run "
            f"tools/make_pseudo_labels.py for source {source!r} and stage {stage!r}, or fix the root/source/stage"
        )
    store_meta = _read_json(store_path)
    _check_format(store_meta, store_path)
    logger.info(
        "%s has no manifest.json (writers still running, or finalize() not called): merging sidecars", directory
    )
    return _merge_sidecars(directory, store_meta)


# ------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------
class PseudoLabelWriter:
    """Writes one stage's pseudo-labels of one source dataset, a shard at a time.

    Any number of processes may write the same store at once if they own disjoint shards; drive
    each with :meth:`pending_indices` (rank ``r`` of ``W`` owns shards ``r, r+W, ...``) and feed its
    results in dataset order with :meth:`add`, or hand whole shards to :meth:`write_shard`. Then
    one process calls :meth:`finalize`.

    Example (one rank)::

        writer = PseudoLabelWriter(root, "toyparts_train", "grouping", num_images=len(dicts),
                                   config=cfg, resume=args.resume)
        for index in writer.pending_indices(rank=comm.get_rank(), world_size=comm.get_world_size()):
            writer.add(index, label(dicts[index]))    # a record, or None: no label for this image
        writer.close()
        comm.synchronize()
        if comm.is_main_process():
            writer.finalize()

    ``pending_indices`` is also a valid DataLoader sampler. Do not use detectron2's
    ``InferenceSampler``: it splits the dataset into contiguous per-rank chunks that do not align
    with shards.

    Args:
        root, source, stage: the store lives in ``<root>/<source>/<stage>``; ``source`` is the name
            of the labelled dataset, ``stage`` e.g. "grouping" or "ranking".
        shard_size: images (dataset indices) per shard. Fixed for the life of a store.
        config: the producing config (CfgNode, dict or str); recorded in store.json/manifest.
        num_images: size of the source dataset (needed by :meth:`add`, :meth:`pending_indices`
            and :meth:`finalize` unless given to them).
        resume: keep the shards a previous run completed with the same shard_size and config
            (:meth:`is_complete`); otherwise every shard is recomputed and overwritten.
    """

    def __init__(self, root, source, stage, shard_size=1000, config=None, *, num_images=None, resume=False):
        if not isinstance(shard_size, numbers.Integral) or shard_size < 1:
            raise ConfigError(f"pseudo-label shard_size must be a positive int, got {shard_size!r}")
        self.root, self.source, self.stage = root, source, stage
        self.dir = store_dir(root, source, stage)
        self.shard_dir = os.path.join(self.dir, "shards")
        self.shard_size = int(shard_size)
        self.num_images = None if num_images is None else int(num_images)
        self.resume = resume
        config = _without_eval_only_keys(_config_value(config))
        self.meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": source,
            "stage": stage,
            "shard_size": self.shard_size,
            "num_images": self.num_images,
            "config": config,
            "config_sha256": hashlib.sha256(_dumps(config).encode("utf-8")).hexdigest(),
        }
        os.makedirs(self.shard_dir, exist_ok=True)
        store_path = os.path.join(self.dir, "store.json")
        if os.path.isfile(store_path):
            self._check_compatible(_read_json(store_path), store_path)
        # Every rank writes the same bytes, so concurrent replaces are harmless.
        _atomic_write_json(store_path, self.meta)
        _remove_quietly(os.path.join(self.dir, "manifest.json"))  # stale from now on; finalize() rewrites it
        self._complete = {}  # shard -> bool, memoised is_complete()
        self._written = set()
        self._buffer_shard, self._buffer = None, []

    def _check_compatible(self, old, path):
        _check_format(old, path)
        if old.get("shard_size") != self.shard_size:
            raise ConfigError(
                f"{path} was written with shard_size={old.get('shard_size')}, not {self.shard_size}; use the "
                "same shard size, or delete the store directory to start over"
            )
        if self.resume and old.get("config_sha256") != self.meta["config_sha256"]:
            raise ConfigError(
                f"{path} was written by a different config, so --resume would mix labels of two configs; "
                "rerun without --resume to overwrite it, or write to another root/stage"
            )
        if self.resume and self.num_images is not None and old.get("num_images") not in (None, self.num_images):
            raise ConfigError(
                f"{path} was written for {old['num_images']} images, the dataset now has {self.num_images}; "
                "shards hold dataset indices, so rerun without --resume (or restore the dataset)"
            )

    # -- planning ------------------------------------------------------------------------
    def _n(self, num_images):
        n = self.num_images if num_images is None else int(num_images)
        if n is None:
            raise ValueError("num_images is unknown: pass it to PseudoLabelWriter(...) or to this call")
        return n

    def shard_path(self, k: int) -> str:
        return os.path.join(self.shard_dir, _shard_stem(k) + ".jsonl.gz")

    def sidecar_path(self, k: int) -> str:
        return os.path.join(self.shard_dir, _shard_stem(k) + ".json")

    def is_complete(self, k: int) -> bool:
        """Whether shard ``k`` can be kept: written by this writer, or (with resume) by a previous
        run with the same shard size and config, with a matching sha256."""
        if k in self._written:
            return True
        if not self.resume:
            return False
        if k not in self._complete:
            self._complete[k] = _sidecar_ok(self.dir, k, self.meta, verify=True) is not None
        return self._complete[k]

    def completed_shards(self, verify: bool = True) -> list:
        """Shards whose file and sidecar exist and (with ``verify``) whose sha256 matches."""
        ks = sorted(_list_sidecars(self.shard_dir))
        return [k for k in ks if _sidecar_ok(self.dir, k, self.meta, verify) is not None]

    def pending_shards(self, num_images=None, rank: int = 0, world_size: int = 1) -> list:
        """Shards of ``rank`` that still need computing (all of them unless resuming)."""
        n = self._n(num_images)
        return [
            k for k in shards_for_rank(num_shards_for(n, self.shard_size), rank, world_size) if not self.is_complete(k)
        ]

    def pending_indices(self, num_images=None, rank: int = 0, world_size: int = 1) -> list:
        """Dataset indices of :meth:`pending_shards`, in order: what ``rank`` must label."""
        n = self._n(num_images)
        return [i for k in self.pending_shards(n, rank, world_size) for i in shard_index_range(k, self.shard_size, n)]

    # -- writing -------------------------------------------------------------------------
    def _remove_temp_files(self, k=None):
        stem = "*" if k is None else _shard_stem(k)
        for tmp in glob.glob(os.path.join(self.shard_dir, f".{stem}.*.tmp")):
            _remove_quietly(tmp)

    def write_shard(self, k: int, records) -> dict:
        """Write shard ``k`` from ``(dataset_index, record or None)`` pairs in increasing index order.

        ``records`` may be a generator: records are encoded as they come, so memory holds one
        line at a time. Indices absent from ``records`` (or paired with None) simply have no label.
        Returns the shard's sidecar.
        """
        n = self.num_images
        allowed = shard_index_range(k, self.shard_size, n)
        self._remove_temp_files(k)  # left by a crashed writer of this shard
        path = self.shard_path(k)
        image_ids, num_objects, num_parts, last = [], 0, 0, None
        with _atomic_file(path) as f:
            hashing = _HashingFile(f)
            with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
                for index, record in records:
                    index = int(index)
                    if index not in allowed:
                        raise ValueError(
                            f"dataset index {index} does not belong to shard {k} ({allowed.start}..{allowed.stop - 1})"
                        )
                    if last is not None and index <= last:
                        raise ValueError(f"shard {k}: dataset indices must increase, got {index} after {last}")
                    last = index
                    if record is None:
                        continue
                    rec = validate_record(record)
                    rec["index"] = index
                    gz.write((_dumps(rec) + "\n").encode("utf-8"))
                    image_ids.append(rec["image_id"])
                    num_objects += len(rec["objects"])
                    num_parts += sum(len(o["parts"]) for o in rec["objects"])
        sidecar = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shard": k,
            "file": os.path.basename(path),
            "shard_size": self.shard_size,
            "index_range": [k * self.shard_size, (k + 1) * self.shard_size],  # nominal; the manifest clips it
            "num_images": len(image_ids),
            "num_objects": num_objects,
            "num_parts": num_parts,
            "bytes": hashing.bytes,
            "sha256": hashing.sha256.hexdigest(),
            "config_sha256": self.meta["config_sha256"],
            "first_image_id": image_ids[0] if image_ids else None,
            "last_image_id": image_ids[-1] if image_ids else None,
            "image_ids": image_ids,
        }
        _atomic_write_json(self.sidecar_path(k), sidecar, compact=True)  # the shard is complete from here on
        self._written.add(k)
        self._complete[k] = True
        return sidecar

    def add(self, index: int, record) -> None:
        """Stream one result (``record`` may be None: no label); a shard is written as soon as all
        its indices have been added. Indices must arrive shard by shard, in increasing order."""
        n = self._n(None)
        index = int(index)
        if not 0 <= index < n:
            raise ValueError(f"dataset index {index} is outside [0, num_images={n})")
        k = shard_of(index, self.shard_size)
        if self._buffer_shard is not None and k != self._buffer_shard:
            raise ValueError(self._incomplete_message())
        if k in self._written:
            raise ValueError(f"shard {k} was already written by this writer (index {index} added twice?)")
        if self._buffer and index <= self._buffer[-1][0]:
            raise ValueError(f"dataset indices must increase within a shard: {index} after {self._buffer[-1][0]}")
        self._buffer_shard = k
        self._buffer.append((index, record))
        if len(self._buffer) == len(shard_index_range(k, self.shard_size, n)):
            buffer, self._buffer, self._buffer_shard = self._buffer, [], None
            self.write_shard(k, buffer)

    def _incomplete_message(self):
        k = self._buffer_shard
        expected = len(shard_index_range(k, self.shard_size, self.num_images))
        return (
            f"shard {k} is incomplete ({len(self._buffer)} of {expected} dataset indices added); add every index "
            "of a shard (None for images without labels) before the next shard, e.g. following pending_indices()"
        )

    def close(self) -> None:
        """Check that no shard is half-added (it would not be written: shards are all or nothing)."""
        if self._buffer:
            message = self._incomplete_message()
            self._buffer, self._buffer_shard = [], None
            raise ValueError(message)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._buffer, self._buffer_shard = [], None  # never publish a shard after a failure

    def finalize(self, num_images=None, verify: bool = False) -> dict:
        """Merge the sidecars into ``manifest.json`` (atomically) and remove crashed writers' temp files.

        Call it from one process after every writer finished. ``verify`` re-hashes each shard
        (readers verify anyway); otherwise completeness is judged by presence and size. An
        incomplete store still gets a manifest (``complete: false``, ``missing_shards``), which
        readers refuse by default.
        """
        n = self._n(num_images)
        self._remove_temp_files()
        for name in os.listdir(self.dir):
            if name.startswith(".") and name.endswith(".tmp"):
                _remove_quietly(os.path.join(self.dir, name))
        meta = dict(self.meta, num_images=n)
        if self.num_images != n:
            self.num_images = n
            self.meta = meta
            _atomic_write_json(os.path.join(self.dir, "store.json"), meta)
        manifest = _merge_sidecars(self.dir, meta, n, verify=verify)
        _atomic_write_json(os.path.join(self.dir, "manifest.json"), manifest)
        if manifest["missing_shards"]:
            logger.warning(
                "Pseudo-label store %s is missing %d of %d shards (%s...); rerun with --resume",
                self.dir,
                len(manifest["missing_shards"]),
                manifest["num_shards"],
                manifest["missing_shards"][:5],
            )
        return manifest


# Config keys that do not change the labels (evaluation/reporting only): kept out of a store's identity,
# so changing them never refuses --resume.
EVAL_ONLY_KEYS = ("MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET",)


def _without_eval_only_keys(config):
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


def counts_path(shard_dir: str, k: int) -> str:
    """Per-shard skip/drop counts written by labelling (see :func:`merge_shard_counts`)."""
    return os.path.join(shard_dir, _shard_stem(k) + ".counts.json")


def write_shard_counts(shard_dir: str, k: int, counts: dict) -> None:
    _atomic_write_json(counts_path(shard_dir, k), counts, compact=True)


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
        c = _read_json(path)
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
    manifest = _read_json(path)
    manifest["counts"] = counts
    if failed:
        manifest["failed"] = failed
        manifest["complete"] = False
    else:
        manifest.pop("failed", None)
    _atomic_write_json(path, manifest)
    return manifest


# ------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------
def require_complete(manifest: dict, directory: str) -> None:
    """Raise a one-line UserError when a store's manifest says shards are missing, or that its labelling
    failed (nothing labelled, too many images skipped: ``failed``, see evaluation/pseudo_label_writer.py)."""
    if manifest.get("failed"):
        raise UserError(f"pseudo-label store {directory} is not usable: {manifest['failed']}")
    if manifest["complete"]:
        return
    missing = manifest["missing_shards"]
    what = (
        f"shards {missing[:5]}{'...' if len(missing) > 5 else ''} of {manifest['num_shards']} are missing"
        if missing
        else "the number of images expected is unknown"
    )
    raise UserError(
        f"pseudo-label store {directory} is incomplete: {what}; rerun make_pseudo_labels.py with --resume "
        "(and let it finalize)"
    )


def read_shard_text(path: str, sha256=None) -> bytes:
    """The decompressed JSON-lines bytes of one shard file; checks ``sha256`` (hex) when given.

    Raises:
        CorruptShardError: the file is missing, does not match ``sha256`` or is not valid gzip.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptShardError(
            f"pseudo-label shard {path} listed in the manifest is missing; rerun make_pseudo_labels.py with --resume"
        )
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CorruptShardError(
                f"pseudo-label shard {path} is corrupted (sha256 {actual[:12]}..., expected {sha256[:12]}...); "
                f"{_FIX_CORRUPT}"
            )
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, ValueError) as e:
        raise CorruptShardError(f"pseudo-label shard {path} cannot be decoded ({e}); {_FIX_CORRUPT}")


class PseudoLabelReader:
    """Reads a store in dataset order, shard by shard, verifying each shard's sha256 before use.

    ``len(reader)`` is the number of labelled images; ``reader.get(image_id)`` and
    ``reader.get_by_index(dataset_index)`` load the one shard holding the image (the last
    ``cache_size`` shards are kept). Iterating does not fill the cache.
    """

    def __init__(self, root, source, stage, verify: bool = True, cache_size: int = 2, allow_incomplete: bool = False):
        self.root, self.source, self.stage = root, source, stage
        self.dir = store_dir(root, source, stage)
        self.verify = verify
        self.manifest = read_manifest(root, source, stage)
        if not allow_incomplete:
            require_complete(self.manifest, self.dir)
        self.shard_size = self.manifest["shard_size"]
        self._shards = {s["shard"]: s for s in self.manifest["shards"]}
        self._cache = collections.OrderedDict()
        self._cache_size = max(1, int(cache_size))
        self._id_to_shard = None

    def __len__(self):
        return self.manifest["num_images"]

    def shard_indices(self) -> list:
        return sorted(self._shards)

    def shard_path(self, k: int) -> str:
        return os.path.join(self.dir, self._shards[k]["file"])

    def _read_shard(self, k: int) -> list:
        info = self._shards[k]
        text = read_shard_text(os.path.join(self.dir, info["file"]), info["sha256"] if self.verify else None)
        try:
            records = [json.loads(line) for line in text.decode("utf-8").splitlines() if line]
        except ValueError as e:
            raise CorruptShardError(f"pseudo-label shard {self.shard_path(k)} cannot be decoded ({e}); {_FIX_CORRUPT}")
        if len(records) != info["num_images"]:
            raise CorruptShardError(
                f"pseudo-label shard {self.shard_path(k)} holds {len(records)} records, the manifest says "
                f"{info['num_images']}; {_FIX_CORRUPT}"
            )
        return records

    def iter_shard(self, k: int):
        return iter(self._read_shard(k))

    def __iter__(self):
        """Records in dataset order; one shard in memory at a time."""
        for k in self.shard_indices():
            yield from self._read_shard(k)

    def _cached_shard(self, k: int) -> dict:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        by_index = {r["index"]: r for r in self._read_shard(k)}
        self._cache[k] = by_index
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return by_index

    def get_by_index(self, dataset_index: int):
        """The record of dataset index ``dataset_index``, or None when that image has no label."""
        k = shard_of(int(dataset_index), self.shard_size)
        if k not in self._shards:
            return None
        record = self._cached_shard(k).get(int(dataset_index))
        return copy.deepcopy(record) if record is not None else None

    def _build_id_index(self) -> dict:
        index = {}
        for k, info in self._shards.items():
            side = _read_json(os.path.join(self.dir, "shards", _shard_stem(k) + ".json"))
            for image_id in side["image_ids"]:
                index[image_id] = k
        return index

    def get(self, image_id):
        """The record of ``image_id`` (KeyError if the store has none)."""
        if self._id_to_shard is None:
            self._id_to_shard = self._build_id_index()
        k = self._id_to_shard[image_id]
        for record in self._cached_shard(k).values():
            if record["image_id"] == image_id:
                return copy.deepcopy(record)
        raise KeyError(image_id)  # pragma: no cover  (sidecar and shard disagree)

    def __contains__(self, image_id):
        if self._id_to_shard is None:
            self._id_to_shard = self._build_id_index()
        return image_id in self._id_to_shard


# ------------------------------------------------------------------------------------------
# detectron2 registration
# ------------------------------------------------------------------------------------------
def pseudo_label_dataset_name(source: str, stage: str) -> str:
    return f"{source}_pseudo_{stage}"


def record_to_dataset_dict(record: dict) -> dict:
    """A store record → a detectron2 dataset dict whose annotations are the parts.

    Each part annotation carries ``segmentation`` (RLE), ``bbox`` (XYWH_ABS), ``category_id``
    (``part_class`` when present, else 0), ``object_id`` (index into ``objects``) and ``score``.
    ``objects`` holds the objects in the same annotation format (their ``category_id`` may be -1).
    """
    out = {
        "file_name": record["file_name"],
        "height": record["height"],
        "width": record["width"],
        "image_id": record["image_id"],
        "pseudo_label_index": record["index"],
    }
    if record.get("class_code") is not None:
        out["class_code"] = record["class_code"]
    annotations, objects = [], []
    for j, obj in enumerate(record["objects"]):
        x0, y0, x1, y1 = obj["bbox"]
        objects.append(
            {
                "object_id": j,
                "segmentation": obj["segmentation"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": obj["category_id"],
                "score": obj["score"],
                "iscrowd": 0,
            }
        )
        for part in obj["parts"]:
            ann = {
                "segmentation": part["segmentation"],
                "bbox": _rle_bbox_xywh(part["segmentation"]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": part.get("part_class", 0),
                "object_id": j,
                "score": part["score"],
                "iscrowd": 0,
            }
            if "part_class" in part:
                ann["part_class"] = part["part_class"]
            if "soft_scores" in part:
                ann["soft_scores"] = part["soft_scores"]
            annotations.append(ann)
    out["annotations"] = annotations
    out["objects"] = objects
    return out


def load_pseudo_label_dicts(root: str, source: str, stage: str, verify: bool = True) -> list:
    """All records of a store as detectron2 dataset dicts, in dataset order."""
    reader = PseudoLabelReader(root, source, stage, verify=verify)
    dicts = [record_to_dataset_dict(r) for r in reader]
    logger.info("Loaded %d pseudo-labelled images from %s", len(dicts), reader.dir)
    return dicts


def register_pseudo_label_dataset(
    name, root, source, stage, metadata_from=None, thing_classes=("part",), loader: str = "store"
):
    """Register store ``<root>/<source>/<stage>`` as detectron2 dataset ``name`` (lazily: the store
    is read when ``DatasetCatalog.get(name)`` runs). Replaces an existing registration.

    ``loader``: "store" (default) makes ``DatasetCatalog.get(name)`` return a
    :class:`~part_distillation.data.store_dataset.PseudoLabelStoreDataset`, a list-like view that decodes
    records on access (memory independent of the store's size); "list" returns every record as a dict
    (:func:`load_pseudo_label_dicts`; config key ``DATASETS.PSEUDO_LABEL_LOADER``).

    Metadata: ``thing_classes`` (class-agnostic ``["part"]`` by default), ``evaluator_type``
    copied from dataset ``metadata_from`` when given, and ``pseudo_label_root/source/stage``.
    """
    store_dir(root, source, stage)  # validates the names
    if loader not in ("store", "list"):
        raise ConfigError(f"DATASETS.PSEUDO_LABEL_LOADER={loader!r}: use 'store' (decode on access) or 'list'")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if loader == "store":
        from ..store_dataset import PseudoLabelStoreDataset

        DatasetCatalog.register(name, functools.partial(PseudoLabelStoreDataset, root, source, stage))
    else:
        DatasetCatalog.register(name, functools.partial(load_pseudo_label_dicts, root, source, stage))
    meta = {
        "thing_classes": list(thing_classes),
        "pseudo_label_root": root,
        "pseudo_label_source": source,
        "pseudo_label_stage": stage,
    }
    if metadata_from is not None:
        evaluator_type = MetadataCatalog.get(metadata_from).get("evaluator_type")
        if evaluator_type is not None:
            meta["evaluator_type"] = evaluator_type
        meta["metadata_from"] = metadata_from
    MetadataCatalog.get(name).set(**meta)
    return name


def register_all_pseudo_label_datasets(root: str, thing_classes=("part",), loader: str = "store") -> list:
    """Register every store under ``root`` as ``<source>_pseudo_<stage>``; returns the names.

    Scans ``root`` when called (never at import). A source that is itself a registered dataset
    lends its ``evaluator_type``. ``thing_classes`` names the label space the stores are trained
    with (class-agnostic ``["part"]``, or P part classes when training on ranked stores). ``loader``: see
    :func:`register_pseudo_label_dataset`.
    """
    names = []
    if not os.path.isdir(root):
        return names
    registered = set(DatasetCatalog.list())
    for source in sorted(os.listdir(root)):
        if not _NAME_RE.match(source) or not os.path.isdir(os.path.join(root, source)):
            continue
        for stage in sorted(os.listdir(os.path.join(root, source))):
            directory = os.path.join(root, source, stage)
            if not _NAME_RE.match(stage):
                continue
            if not any(os.path.isfile(os.path.join(directory, f)) for f in ("manifest.json", "store.json")):
                continue
            name = pseudo_label_dataset_name(source, stage)
            register_pseudo_label_dataset(
                name,
                root,
                source,
                stage,
                metadata_from=source if source in registered else None,
                thing_classes=thing_classes,
                loader=loader,
            )
            names.append(name)
    return names
