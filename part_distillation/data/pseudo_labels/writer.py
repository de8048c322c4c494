"""Writing a store: any number of processes, each owning disjoint shards, then one :meth:`finalize`
(the package docstring describes the layout)."""

import glob
import gzip
import hashlib
import logging
import numbers
import os

from ...utils.errors import ConfigError
from ...utils.io import (
    HashingFile,
    atomic_file,
    atomic_write_json,
    canonical_json,
    read_json,
    remove_quietly,
)
from .records import validate_record
from .shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    check_format,
    complete_sidecar,
    config_value,
    list_sidecars,
    merge_sidecars,
    num_shards_for,
    shard_index_range,
    shard_of,
    shard_stem,
    shards_for_rank,
    store_dir,
    without_eval_only_keys,
)

__all__ = ["PseudoLabelWriter"]

logger = logging.getLogger(__name__)

_GZIP_LEVEL = 6  # level 9: ~2x slower for ~2% smaller shards (RLE counts are near-incompressible)


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
        config = without_eval_only_keys(config_value(config))
        self.meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": source,
            "stage": stage,
            "shard_size": self.shard_size,
            "num_images": self.num_images,
            "config": config,
            "config_sha256": hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest(),
        }
        os.makedirs(self.shard_dir, exist_ok=True)
        store_path = os.path.join(self.dir, "store.json")
        if os.path.isfile(store_path):
            self._check_compatible(read_json(store_path), store_path)
        # Every rank writes the same bytes, so concurrent replaces are harmless.
        atomic_write_json(store_path, self.meta)
        remove_quietly(os.path.join(self.dir, "manifest.json"))  # stale from now on; finalize() rewrites it
        self._complete = {}  # shard -> bool, memoised is_complete()
        self._written = set()
        self._buffer_shard, self._buffer = None, []

    def _check_compatible(self, old, path):
        check_format(old, path)
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
        return os.path.join(self.shard_dir, shard_stem(k) + ".jsonl.gz")

    def sidecar_path(self, k: int) -> str:
        return os.path.join(self.shard_dir, shard_stem(k) + ".json")

    def is_complete(self, k: int) -> bool:
        """Whether shard ``k`` can be kept: written by this writer, or (with resume) by a previous
        run with the same shard size and config, with a matching sha256."""
        if k in self._written:
            return True
        if not self.resume:
            return False
        if k not in self._complete:
            self._complete[k] = complete_sidecar(self.dir, k, self.meta, verify=True) is not None
        return self._complete[k]

    def completed_shards(self, verify: bool = True) -> list:
        """Shards whose file and sidecar exist and (with ``verify``) whose sha256 matches."""
        ks = sorted(list_sidecars(self.shard_dir))
        return [k for k in ks if complete_sidecar(self.dir, k, self.meta, verify) is not None]

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
        stem = "*" if k is None else shard_stem(k)
        for tmp in glob.glob(os.path.join(self.shard_dir, f".{stem}.*.tmp")):
            remove_quietly(tmp)

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
        with atomic_file(path) as f:
            hashing = HashingFile(f)
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
                    gz.write((canonical_json(rec) + "\n").encode("utf-8"))
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
        atomic_write_json(self.sidecar_path(k), sidecar, compact=True)  # the shard is complete from here on
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
                remove_quietly(os.path.join(self.dir, name))
        meta = dict(self.meta, num_images=n)
        if self.num_images != n:
            self.num_images = n
            self.meta = meta
            atomic_write_json(os.path.join(self.dir, "store.json"), meta)
        manifest = merge_sidecars(self.dir, meta, n, verify=verify)
        atomic_write_json(os.path.join(self.dir, "manifest.json"), manifest)
        if manifest["missing_shards"]:
            logger.warning(
                "Pseudo-label store %s is missing %d of %d shards (%s...); rerun with --resume",
                self.dir,
                len(manifest["missing_shards"]),
                manifest["num_shards"],
                manifest["missing_shards"][:5],
            )
        return manifest
