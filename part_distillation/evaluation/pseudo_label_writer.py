"""The evaluator that turns inference into pseudo-labels: it writes the sharded store.

Running a grouping (or ranking) model through detectron2's ``inference_on_dataset`` with this
"evaluator" labels a dataset, so labelling is distributed like evaluation: each rank writes its own
shards (see :class:`~part_distillation.data.pseudo_labels.PseudoLabelWriter`), rank 0 merges the
manifest. Inputs must carry ``dataset_index`` (the image's position in the dataset list).

Object classes: a store written from an image-level-labelled dataset (ImageNet folders) gets
``object_classes.json`` (:mod:`part_distillation.data.object_classes`): the synset of every object class id, so
that later stages (and zero-shot evaluation) know which synset each class id (``category_id``) stands for. A
store written from another store of the same source (stage 3 from stage 1) copies that store's list.
"""

import os
import logging
import time
from collections import Counter

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.object_classes import read_store_classes, write_store_classes
from ..data.pseudo_labels import (
    PseudoLabelWriter,
    make_object,
    make_part,
    merge_shard_counts,
    record_store_outcome,
    shard_index_range,
    shard_of,
    write_shard_counts,
)
from ..data.skips import reason_key
from ..utils.errors import UserError

__all__ = ["PseudoLabelWriterEvaluator", "LabellingFailedError", "outputs_to_record", "check_labelling_outcome"]

# Fail a labelling run when more than this fraction of its images were skipped (and always when it labelled
# nothing); DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION sets it.
DEFAULT_MAX_SKIPPED_FRACTION = 0.5


class LabellingFailedError(UserError):
    """A labelling run produced a store no later stage should use (nothing labelled, or too much skipped)."""


logger = logging.getLogger(__name__)


def outputs_to_record(inp: dict, out: dict) -> dict:
    """One image's model outputs (objects in ``instances``, parts in ``part_instances``) → a store record."""
    objects = out["instances"].to("cpu")
    parts = out["part_instances"].to("cpu")
    owner = parts.object_index.numpy() if len(parts) else np.zeros(0, dtype=np.int64)
    part_masks = parts.pred_masks.numpy() if len(parts) else None
    part_scores = parts.scores.numpy() if len(parts) else None
    obj_masks, obj_scores, obj_classes = (
        objects.pred_masks.numpy(),
        objects.scores.numpy(),
        objects.pred_classes.numpy(),
    )
    # Ranked parts (stage 3) carry soft_scores; only then are pred_classes their part classes (stage-1
    # part_instances have pred_classes 0 and no part_class).
    ranked = len(parts) > 0 and parts.has("soft_scores")
    part_classes = parts.pred_classes.numpy() if ranked else None
    part_soft = parts.soft_scores.numpy() if ranked else None
    records = []
    for j in range(len(objects)):
        mine = np.nonzero(owner == j)[0]
        obj_parts = [
            make_part(part_masks[p], score=float(part_scores[p]))
            if not ranked
            else make_part(
                part_masks[p], score=float(part_scores[p]), part_class=int(part_classes[p]), soft_scores=part_soft[p]
            )
            for p in mine
        ]
        records.append(
            make_object(obj_masks[j], obj_parts, score=float(obj_scores[j]), category_id=int(obj_classes[j]))
        )
    h, w = objects.image_size
    record = {"image_id": inp["image_id"], "file_name": inp["file_name"], "height": h, "width": w, "objects": records}
    if "class_code" in inp:
        record["class_code"] = inp["class_code"]
    return record


class PseudoLabelWriterEvaluator(DatasetEvaluator):
    """Writes every processed image to a :class:`PseudoLabelWriter`; ``evaluate`` returns a summary.

    Images the loader could not read arrive as inputs with ``skipped`` (a reason) and are stored as
    "no label", counted by reason and named in the log, so one bad JPEG never stops a 14M-image run.
    Objects the mapper reports as ``dropped`` (by reason) are counted too; counts are written per shard
    (``shards/shard-K.counts.json``) and merged into the manifest's ``counts``. A store that labelled nothing,
    or skipped more than ``max_skipped_fraction`` of its images, fails (:func:`check_labelling_outcome`).
    """

    def __init__(
        self, writer: PseudoLabelWriter, class_codes=None, max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION
    ):
        """``class_codes``: the synset of each object class id to store with the labels; None = the source
        dataset's when it has image-level labels, else a sibling store's ``object_classes.json``, else none.
        ``max_skipped_fraction``: see :func:`check_labelling_outcome`."""
        self.writer = writer
        self.class_codes = class_codes
        self.max_skipped_fraction = max_skipped_fraction
        self._start = time.perf_counter()

    def reset(self):
        self.counts = Counter()
        self.skipped = []  # (file_name, reason)
        self.shard_counts = {}  # shard -> {"skipped_by_reason", "dropped_by_reason", "first_skipped"}
        self._start = time.perf_counter()

    def _shard(self, index):
        k = shard_of(int(index), self.writer.shard_size)
        return k, self.shard_counts.setdefault(
            k, {"skipped_by_reason": Counter(), "dropped_by_reason": Counter(), "first_skipped": [], "seen": 0}
        )

    def _add(self, k, counts, index, record):
        """Add to the writer; the shard's counts file is written just *before* the add that completes the
        shard, so a kept (complete) shard always has its counts, also after a kill and ``--resume``."""
        counts["seen"] += 1
        if counts["seen"] == len(shard_index_range(k, self.writer.shard_size, self.writer.num_images)):
            write_shard_counts(
                self.writer.shard_dir,
                k,
                {key: dict(v) if isinstance(v, Counter) else v for key, v in counts.items() if key != "seen"},
            )
        self.writer.add(index, record)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            k, shard = self._shard(inp["dataset_index"])
            shard["dropped_by_reason"].update(inp.get("dropped", {}))
            if inp.get("skipped"):
                self.skipped.append((inp.get("file_name", "?"), inp["skipped"]))
                shard["skipped_by_reason"][reason_key(inp["skipped"])] += 1
                if len(shard["first_skipped"]) < 5:
                    shard["first_skipped"].append([inp.get("file_name", "?"), inp["skipped"]])
                self._add(k, shard, inp["dataset_index"], None)
                continue
            record = outputs_to_record(inp, out)
            self._add(k, shard, inp["dataset_index"], record)
            self.counts["images"] += 1
            self.counts["objects"] += len(record["objects"])
            self.counts["parts"] += sum(len(o["parts"]) for o in record["objects"])
            if not record["objects"]:
                self.counts["images_without_objects"] += 1

    def evaluate(self):
        self.writer.close()  # raises if a shard was left half-written
        comm.synchronize()
        counts = comm.gather(self.counts, dst=0)
        skipped = comm.gather(self.skipped, dst=0)
        if not comm.is_main_process():
            return {}
        manifest = self.writer.finalize()
        codes = self.class_codes if self.class_codes is not None else store_class_codes(self.writer)
        if codes:
            write_store_classes(self.writer.dir, codes)
        total = sum(counts, Counter())
        skipped = [s for part in skipped for s in part]
        reasons = Counter(reason_key(reason) for _, reason in skipped)
        summary = {
            "images": total["images"],
            "objects": total["objects"],
            "parts": total["parts"],
            "images_without_objects": total["images_without_objects"],
            "skipped": len(skipped),
            "skipped_by_reason": dict(reasons),
            "skipped_files": [f for f, _ in skipped[:20]],
            "seconds": time.perf_counter() - self._start,
            "store": self.writer.dir,
            "object_classes": len(codes) if codes else 0,
            "complete": not manifest["missing_shards"],
        }
        for name, reason in skipped[:20]:
            logger.warning("Skipped %s: %s", name, reason)
        check_labelling_outcome(self.writer, manifest, summary, self.max_skipped_fraction)
        return {"pseudo_labels": summary}


def check_labelling_outcome(writer: PseudoLabelWriter, manifest: dict, summary: dict, max_skipped_fraction: float):
    """Record the store's skip/drop counts (all its shards, resumed ones too) in its manifest, and fail
    (:class:`LabellingFailedError`, manifest ``complete: false`` + ``failed``) when the store labelled no
    image with an object, or skipped more than ``max_skipped_fraction`` of its images."""
    from detectron2.data import MetadataCatalog

    counts = merge_shard_counts(writer.dir, [s["shard"] for s in manifest["shards"]])
    load_drops = (
        MetadataCatalog.get(writer.source).get("load_drops", None) if writer.source in MetadataCatalog else None
    )
    counts["dropped_at_load"] = dict(load_drops or {})
    n = manifest["num_images_expected"] or 0
    labelled = manifest["num_images"]
    num_objects = manifest["num_objects"]
    failed = None
    if n and manifest["complete"] and (labelled == 0 or num_objects == 0):
        failed = f"no image of {n} was labelled with an object"
    elif n and manifest["complete"] and manifest["num_parts"] == 0:
        failed = f"no part was labelled in the {num_objects} objects of {labelled} images (check the part filters)"
    elif n and manifest["complete"] and counts["skipped"] > max_skipped_fraction * n:
        failed = f"{counts['skipped']} of {n} images were skipped (more than {max_skipped_fraction:g})"
    if failed:
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(counts["skipped_by_reason"].items(), key=lambda x: -x[1]))
        dropped = ", ".join(f"{r}: {c}" for r, c in sorted(counts["dropped_by_reason"].items(), key=lambda x: -x[1]))
        first = "; ".join(f"{f}: {r}" for f, r in counts["first_skipped"][:3])
        failed += (
            (f"; skipped by reason: {reasons}" if reasons else "")
            + (f"; objects dropped: {dropped}" if dropped else "")
            + (f"; first: {first}" if first else "")
        )
    record_store_outcome(writer.dir, counts, failed)
    summary["store_counts"] = counts
    if failed:
        summary["complete"] = False
        raise LabellingFailedError(
            f"labelling {writer.source} into {writer.dir} failed: {failed}. Check the data with "
            f"tools/validate_dataset.py --dataset {writer.source}, or raise DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION"
        )


def store_class_codes(writer: PseudoLabelWriter):
    """The class list a new store inherits: its source's image-level synsets, else a sibling store's list."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(writer.source)
    if meta.get("image_level_labels", False) and meta.get("class_codes", None):
        return list(meta.class_codes)
    source_dir = os.path.dirname(writer.dir)
    for stage in sorted(os.listdir(source_dir)):
        if stage == writer.stage:
            continue
        data = read_store_classes(os.path.join(source_dir, stage))
        if data:
            return list(data["class_codes"])
    return None
