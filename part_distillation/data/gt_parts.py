"""Ground-truth parts as within-object part classes, and as pseudo-label store records.

:class:`~part_distillation.modeling.meta_arch.distillation.PartDistillationModel` classifies a part *within
its object's class*: one classifier of N_c^p outputs per object class (stage 4). A GT part dataset numbers its
parts globally instead (toyparts: 21 part categories; PartImageNet: 40; Pascal-Part: 50, some shared by
several object classes). The metadata's ``part_to_object`` links the two numberings:

* :func:`object_part_lists` — object class o → the dataset part categories of o, ascending;
* :func:`within_object_part_index` — dataset part category p → ``{o: k}``: p is the k-th part of object
  class o (one entry per owner; Pascal-Part's "wheel" has several).

So (o, k) ↔ p is a bijection per object class, used both ways: GT parts → training targets
(:func:`gt_part_records`, :class:`~part_distillation.data.dataset_mappers.part_supervised.PartSupervisedDatasetMapper`)
and predicted within-object indices → dataset part ids (``part_miou`` mode "within_object").

:func:`gt_part_records` turns part-dataset records into pseudo-label store records (``data/pseudo_labels/``
schema): one store object per GT object
(:func:`~part_distillation.data.dataset_mappers.part_eval.group_parts_by_object`),
``category_id`` = its object class, its mask = the dataset's object mask or else the union of its parts; one
store part per part category present in the object (instances of the same category OR-ed, the reference's
``USE_MERGED_GT``), ``part_class`` = the within-object index k (omitted with ``part_classes=False``: a
class-agnostic store, as stage 2 trains on). :func:`write_gt_part_store` writes them as a store.
"""

import logging
from collections import OrderedDict

import numpy as np

from ..utils.errors import ConfigError
from .dataset_mappers.part_eval import decode_segmentation, group_parts_by_object
from .pseudo_labels import PseudoLabelWriter, make_object, make_part, register_pseudo_label_dataset

__all__ = [
    "part_to_object_table",
    "object_part_lists",
    "within_object_part_index",
    "max_parts_per_object",
    "gt_part_records",
    "write_gt_part_store",
]

logger = logging.getLogger(__name__)


def _owners(entry) -> tuple:
    """The object classes of one ``part_to_object`` entry (an int, or a list for a shared part)."""
    if isinstance(entry, (list, tuple)):
        return tuple(int(o) for o in entry)
    return (int(entry),)


def part_to_object_table(metadata) -> list:
    """``part_to_object`` of ``metadata`` (a detectron2 ``Metadata``, a dict, or the table itself).

    Raises:
        ConfigError: the metadata has no ``part_to_object`` (the dataset is not a part dataset with objects).
    """
    if isinstance(metadata, (list, tuple)):
        return list(metadata)
    table = metadata.get("part_to_object", None)
    if table is None:
        name = metadata.get("name", None) if isinstance(metadata, dict) else getattr(metadata, "name", None)
        raise ConfigError(
            f"dataset {name!r} has no 'part_to_object' metadata: within-object part classes need the table "
            "part category -> object class (register the dataset as a part dataset with object classes, as "
            "toyparts_parts_* / part_imagenet_parts_* / pascal_part_parts_* are)."
        )
    return list(table)


def _num_object_classes(metadata, table) -> int:
    names = None if isinstance(metadata, (list, tuple)) else metadata.get("object_classes", None)
    largest = max((o for entry in table for o in _owners(entry)), default=-1)
    return max(len(names) if names is not None else 0, largest + 1)


def object_part_lists(metadata) -> list:
    """``lists[o]`` = the dataset part categories of object class o, ascending (k-th = within-object index k)."""
    table = part_to_object_table(metadata)
    lists = [[] for _ in range(_num_object_classes(metadata, table))]
    for part, entry in enumerate(table):
        for owner in _owners(entry):
            lists[owner].append(part)
    return lists


def within_object_part_index(metadata) -> list:
    """``index[p]`` = ``{object class o: within-object index k}`` for every dataset part category p.

    One entry per owner of p: a single ``{o: k}`` where every part belongs to one object class (toyparts,
    PartImageNet), several for parts shared by object classes (Pascal-Part). E.g. toyparts' "Car Window"
    (part 5; Quadruped has parts 0-3, Car 4-6) → ``{1: 1}``.
    """
    table = part_to_object_table(metadata)
    index = [dict() for _ in table]
    for o, parts in enumerate(object_part_lists(metadata)):
        for k, p in enumerate(parts):
            index[p][o] = k
    return index


def max_parts_per_object(metadata) -> int:
    """The largest number of part categories of one object class (the N_c^p a model needs at least)."""
    return max((len(parts) for parts in object_part_lists(metadata)), default=0)


def _object_class(obj, members, index) -> int:
    """The object's class: its annotation's ``category_id``, else the owner its parts agree on (-1 if none)."""
    if obj is not None and "category_id" in obj:
        return int(obj["category_id"])
    if index is None or not members:
        return -1
    owners = [set(index[int(p["category_id"])]) for p in members]
    common = set.intersection(*owners)
    if len(common) == 1:
        return common.pop()
    # parts of several object classes under one object id (rare PartImageNet images): the most frequent
    # owner, lowest id on ties, as the PartImageNet objects view decides
    counts = {}
    for owner_set in owners:
        for o in owner_set:
            counts[o] = counts.get(o, 0) + 1
    return min(counts, key=lambda o: (-counts[o], o)) if counts else -1


def gt_part_records(dataset_dicts, metadata, part_classes: bool = True) -> list:
    """Store records of the GT parts of ``dataset_dicts``, grouped by object (module docstring).

    Args:
        dataset_dicts: part-dataset records (``*_parts_*`` views: part ``annotations`` with ``object_id``,
            optional ``object_annotations``).
        metadata: the dataset's metadata (or its ``part_to_object`` list).
        part_classes: give every part its within-object index as ``part_class``; False = class-agnostic parts.
    Returns:
        One record per input record, None for a record without any (non-empty) part.
    Raises:
        ConfigError: ``part_classes`` and the metadata has no ``part_to_object``.
    """
    index = None
    if part_classes:
        index = within_object_part_index(metadata)
    elif isinstance(metadata, (list, tuple)) or metadata.get("part_to_object", None) is not None:
        index = within_object_part_index(metadata)
    dropped = 0
    records = []
    for record in dataset_dicts:
        h, w = int(record["height"]), int(record["width"])
        objects = []
        if index is not None:
            unknown = sorted({int(a["category_id"]) for a in record.get("annotations", [])} - set(range(len(index))))
            if unknown:
                raise ConfigError(
                    f"{record.get('file_name')}: part categories {unknown} are outside the metadata's part_to_object "
                    f"table ({len(index)} parts); the annotations and the registered metadata disagree."
                )
        for _, obj, members in group_parts_by_object(record):
            object_class = _object_class(obj, members, index)
            merged = OrderedDict()  # part category -> OR of its instances in this object
            for part in members:
                category = int(part["category_id"])
                if part_classes and object_class not in index[category]:
                    dropped += 1  # a part of another object class than its object's: no within-object index
                    continue
                mask = decode_segmentation(part["segmentation"], h, w)
                merged[category] = merged[category] | mask if category in merged else mask
            parts = [
                make_part(mask, part_class=index[category][object_class] if part_classes else None)
                for category, mask in merged.items()
                if mask.any()
            ]
            if not parts:
                continue
            if obj is not None and obj.get("segmentation"):
                object_mask = decode_segmentation(obj["segmentation"], h, w)
            else:
                object_mask = np.any(list(merged.values()), axis=0)
            objects.append(make_object(object_mask, parts, category_id=object_class))
        if not objects:
            records.append(None)
            continue
        out = {"image_id": record["image_id"], "file_name": record["file_name"], "height": h, "width": w}
        if isinstance(record.get("class_code"), str):
            out["class_code"] = record["class_code"]
        out["objects"] = objects
        records.append(out)
    if dropped:
        logger.warning(
            "gt_part_records: dropped %d parts whose category does not belong to their object's class.", dropped
        )
    return records


def write_gt_part_store(
    dataset_name: str,
    root: str,
    source: str,
    stage: str,
    *,
    part_classes: bool = True,
    shard_size: int = 1000,
    config: str = "GT parts",
    register_as: str = None,
    thing_classes=("part",),
) -> int:
    """Write the GT parts of registered dataset ``dataset_name`` as store ``<root>/<source>/<stage>``.

    ``register_as``: also register the store under that dataset name with ``thing_classes``. Returns the
    number of records (images, including those without parts, stored as "no label").
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get(dataset_name)
    records = gt_part_records(dicts, MetadataCatalog.get(dataset_name), part_classes=part_classes)
    writer = PseudoLabelWriter(root, source, stage, shard_size=shard_size, config=config, num_images=len(records))
    for i, record in enumerate(records):
        writer.add(i, record)
    writer.close()
    writer.finalize()
    if register_as:
        register_pseudo_label_dataset(register_as, root, source, stage, thing_classes=list(thing_classes))
    return len(records)
