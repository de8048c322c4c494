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
from ..data.pseudo_labels import PseudoLabelWriter, make_object, make_part

__all__ = ["PseudoLabelWriterEvaluator", "outputs_to_record"]

logger = logging.getLogger(__name__)


def outputs_to_record(inp: dict, out: dict) -> dict:
    """One image's model outputs (objects in ``instances``, parts in ``part_instances``) → a store record."""
    objects = out["instances"].to("cpu")
    parts = out["part_instances"].to("cpu")
    owner = parts.object_index.numpy() if len(parts) else np.zeros(0, dtype=np.int64)
    part_masks = parts.pred_masks.numpy() if len(parts) else None
    part_scores = parts.scores.numpy() if len(parts) else None
    obj_masks, obj_scores, obj_classes = objects.pred_masks.numpy(), objects.scores.numpy(), objects.pred_classes.numpy()
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
            else make_part(part_masks[p], score=float(part_scores[p]), part_class=int(part_classes[p]), soft_scores=part_soft[p])
            for p in mine
        ]
        records.append(make_object(obj_masks[j], obj_parts, score=float(obj_scores[j]), category_id=int(obj_classes[j])))
    h, w = objects.image_size
    record = {"image_id": inp["image_id"], "file_name": inp["file_name"], "height": h, "width": w, "objects": records}
    if "class_code" in inp:
        record["class_code"] = inp["class_code"]
    return record


class PseudoLabelWriterEvaluator(DatasetEvaluator):
    """Writes every processed image to a :class:`PseudoLabelWriter`; ``evaluate`` returns a summary.

    Images the loader could not read arrive as inputs with ``skipped`` (a reason) and are stored as
    "no label", counted by reason and named in the log, so one bad JPEG never stops a 14M-image run.
    """

    def __init__(self, writer: PseudoLabelWriter, class_codes=None):
        """``class_codes``: the synset of each object class id to store with the labels; None = the source
        dataset's when it has image-level labels, else a sibling store's ``object_classes.json``, else none."""
        self.writer = writer
        self.class_codes = class_codes
        self._start = time.perf_counter()

    def reset(self):
        self.counts = Counter()
        self.skipped = []  # (file_name, reason)
        self._start = time.perf_counter()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if inp.get("skipped"):
                self.writer.add(inp["dataset_index"], None)
                self.skipped.append((inp.get("file_name", "?"), inp["skipped"]))
                continue
            record = outputs_to_record(inp, out)
            self.writer.add(inp["dataset_index"], record)
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
        reasons = Counter(reason for _, reason in skipped)
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
        return {"pseudo_labels": summary}


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
