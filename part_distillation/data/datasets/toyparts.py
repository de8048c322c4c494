"""Lazy detectron2 registration of the embedded "toyparts" dataset.

Registers four views of the same images (see toyparts_generator for the layout):

* ``toyparts_{train,val}``: object instances, from ``annotations/{split}_whole.json``;
* ``toyparts_parts_{train,val}``: parts, from ``annotations/{split}.json``.

Annotations of both views carry ``object_id`` (the id of the object annotation a part
belongs to; an object's own id), and every record carries ``class_code`` (its image
directory), as PartImageNet-style pipelines expect.

Nothing is read at import time: the root is resolved and the JSON loaded only when
``DatasetCatalog.get`` runs, so ``$DETECTRON2_DATASETS`` may be set after import.
"""

import os

from detectron2.data.datasets import load_coco_json

from .common import dataset_root, register_views, require, sync_metadata
from .toyparts_meta import TOYPARTS_OBJECT_CLASSES, TOYPARTS_PART_CLASSES, TOYPARTS_PART_TO_OBJECT

__all__ = ["register_toyparts", "ensure_toyparts", "default_toyparts_root"]

_SPLITS = ("train", "val")


def default_toyparts_root():
    return dataset_root("toyparts")


def _paths(root, split, parts):
    json_name = f"{split}.json" if parts else f"{split}_whole.json"
    return os.path.join(root, "annotations", json_name), os.path.join(root, "images", split)


def _metadata(root, split, parts):
    """Metadata consistent with what load_coco_json sets later (it refuses changes)."""
    json_file, image_root = _paths(root, split, parts)
    classes = TOYPARTS_PART_CLASSES if parts else TOYPARTS_OBJECT_CLASSES
    meta = {
        "thing_classes": list(classes),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(classes))},
        "object_classes": list(TOYPARTS_OBJECT_CLASSES),
        "part_classes": list(TOYPARTS_PART_CLASSES),
        "part_to_object": list(TOYPARTS_PART_TO_OBJECT),
        "json_file": json_file,
        "image_root": image_root,
        "evaluator_type": "coco",
        "dataset_root": root,
    }
    if parts:
        meta["is_part_dataset"] = True
    return meta


def _load(name, split, parts, root):
    root = root or default_toyparts_root()
    json_file, image_root = _paths(root, split, parts)
    require(
        json_file,
        "toyparts annotations",
        f'run "python datasets/prepare_toyparts.py --out {root}" (or "make demo") or set $DETECTRON2_DATASETS',
        os.path.isfile,
    )
    sync_metadata(name, _metadata(root, split, parts))
    records = load_coco_json(json_file, image_root, name, extra_annotation_keys=["object_id"])
    for record in records:
        record["class_code"] = os.path.basename(os.path.dirname(record["file_name"]))
    return records


def register_toyparts(root=None):
    """Register the toyparts views; ``root=None`` resolves the root at load time.

    Safe to call again (e.g. with an explicit root): existing registrations are replaced.
    """
    register_views("toyparts", _SPLITS, root, default_toyparts_root, _load, _metadata)


def ensure_toyparts(root=None, num_train=200, num_val=50, seed=0, image_size=256, progress=True):
    """Generate toyparts under ``root`` unless all its annotation files already exist.

    Annotation files are written last, so their presence means a complete dataset. An
    existing dataset is kept as is, whatever arguments it was generated with.

    Returns:
        str: the dataset root.
    """
    root = root or default_toyparts_root()
    json_files = [_paths(root, s, p)[0] for s in _SPLITS for p in (False, True)]
    if not all(os.path.isfile(f) for f in json_files):
        from .toyparts_generator import generate_toyparts

        generate_toyparts(root, num_train, num_val, seed, image_size=image_size, progress=progress)
    return root


register_toyparts()
