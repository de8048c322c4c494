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

Modules: ``records`` (the record schema, its builders and checker, record → dataset dict), ``shards``
(paths, shard arithmetic, sidecars and the manifest, the store's identity, labelling counts), ``writer``,
``reader`` and ``registration`` (detectron2 datasets). Atomic file output lives in ``utils/io.py``. The
names in ``__all__`` below are importable from this package, as before the split.
"""

from ...utils.io import atomic_write_bytes
from .reader import PseudoLabelReader, read_shard_text, require_complete
from .records import (
    decode_mask,
    encode_mask,
    make_object,
    make_part,
    mask_area,
    record_to_dataset_dict,
    validate_record,
)
from .registration import (
    load_pseudo_label_dicts,
    pseudo_label_dataset_name,
    register_all_pseudo_label_datasets,
    register_pseudo_label_dataset,
)
from .shards import (
    EVAL_ONLY_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    CorruptShardError,
    merge_shard_counts,
    num_shards_for,
    read_manifest,
    record_store_outcome,
    shard_index_range,
    shard_of,
    shards_for_rank,
    store_dir,
    write_shard_counts,
)
from .writer import PseudoLabelWriter

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
