"""Reading a store: shard by shard in dataset order, or one image by id or dataset index, each shard's
sha256 checked before use."""

import collections
import copy
import gzip
import hashlib
import json
import os

from ...utils.errors import UserError
from ...utils.io import read_json
from .shards import CorruptShardError, read_manifest, shard_of, shard_stem, store_dir

__all__ = ["require_complete", "read_shard_text", "PseudoLabelReader"]

_FIX_CORRUPT = "delete it and rerun make_pseudo_labels.py with --resume"


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
            side = read_json(os.path.join(self.dir, "shards", shard_stem(k) + ".json"))
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
