"""Lazy detectron2 registration of PartImageNet-Seg (per-image semantic part masks).

Registers ``partimagenet_seg_{train,val,test}`` with records in detectron2's semantic-segmentation
format (``file_name``, ``sem_seg_file_name``) plus ``image_id`` (the file stem, e.g.
``n01440764_10029``), ``class_code`` (the wnid) and, when the release's ``<split>_whole`` folder exists,
``object_sem_seg_file_name`` (the object-class mask of the same image).

Expected layout (``root`` defaults to ``$DETECTRON2_DATASETS/PartImageNet_Seg``; the release zip
``PartImageNet_Seg.zip`` extracts to a ``PartImageNet/`` folder, which may sit inside ``root``)::

    PartImageNet_Seg/                          (or PartImageNet_Seg/PartImageNet/)
      images/{train,val,test}/<wnid>_<n>.JPEG  (or images/<split>/<wnid>/<wnid>_<n>.JPEG)
      annotations/{train,val,test}/<wnid>_<n>.png        part labels, one uint8 PNG per image
      annotations/{train,val,test}_whole/<wnid>_<n>.png  optional: object labels 0..157, 158 = bg

Part PNG encoding (as released): pixel value = official PartImageNet part id 0..39 (the order of
``PART_IMAGENET_PART_CLASSES``), **40 = background**, 255 = ignore. The metadata says so:
``stuff_classes`` = the 40 part names + ``"background"`` (index 40), ``background_label`` = 40,
``ignore_label`` = 255. Other files in the annotation folders (the release's per-image and per-split
``.json`` files, which hold only image sizes) are not read.

The set of images of a split is the set of PNGs in ``annotations/<split>/`` (sorted). Whether images
sit directly in the split folder or in per-wnid sub-folders, and whether they end in ``.JPEG`` or
``.jpg``, is decided once per split from the first PNG. Nothing is read at import time.
"""

import functools
import os

from .common import dataset_root, not_found, readme_hint, register_splits, require, sync_metadata
from .part_imagenet import (
    PART_IMAGENET_OBJECT_CLASSES,
    PART_IMAGENET_PART_CLASSES,
    PART_IMAGENET_PART_TO_OBJECT,
)

__all__ = ["register_partimagenet_seg", "default_partimagenet_seg_root"]

_SPLITS = ("train", "val", "test")
_README = "datasets/README.md#partimagenet-seg"
_HINT = readme_hint(_README)
BACKGROUND_LABEL = len(PART_IMAGENET_PART_CLASSES)  # 40
OBJECT_BACKGROUND_LABEL = 158
IGNORE_LABEL = 255
_IMAGE_EXTS = (".JPEG", ".jpg")


def default_partimagenet_seg_root():
    return dataset_root("PartImageNet_Seg")


def _base(root):
    """``root`` itself, or the ``PartImageNet/`` folder the release zip extracts into it."""
    nested = os.path.join(root, "PartImageNet")
    if not os.path.isdir(os.path.join(root, "annotations")) and os.path.isdir(os.path.join(nested, "annotations")):
        return nested
    return root


def _metadata(root, split, base=None):
    """``base`` (the folder holding ``images/`` and ``annotations/``) is found at load time only."""
    base = base or root
    return {
        "stuff_classes": list(PART_IMAGENET_PART_CLASSES) + ["background"],
        "background_label": BACKGROUND_LABEL,
        "ignore_label": IGNORE_LABEL,
        "object_background_label": OBJECT_BACKGROUND_LABEL,
        "object_classes": list(PART_IMAGENET_OBJECT_CLASSES),
        "part_classes": list(PART_IMAGENET_PART_CLASSES),
        "part_to_object": list(PART_IMAGENET_PART_TO_OBJECT),
        "image_root": os.path.join(base, "images", split),
        "sem_seg_root": os.path.join(base, "annotations", split),
        "evaluator_type": "part_nmi_ari",
        "dataset_root": root,
    }


def _list_pngs(top):
    """Relative paths (without extension) of the PNGs under ``top``, sorted, depth-first."""
    stems = []

    def walk(rel):
        with os.scandir(os.path.join(top, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir():
                walk(os.path.join(rel, entry.name))
            elif entry.name.lower().endswith(".png"):
                stems.append(os.path.join(rel, entry.name[:-4]))

    walk("")
    return stems


def _image_resolver(image_dir, stem):
    """A function stem → image path, chosen by which candidate exists for ``stem``."""
    name = os.path.basename(stem)
    layouts = (
        lambda s, ext: os.path.join(image_dir, s + ext),
        lambda s, ext: os.path.join(image_dir, os.path.basename(s).split("_")[0], os.path.basename(s) + ext),
        lambda s, ext: os.path.join(image_dir, os.path.basename(s) + ext),
    )
    tried = []
    for layout in layouts:
        for ext in _IMAGE_EXTS:
            path = layout(stem, ext)
            if os.path.isfile(path):
                return functools.partial(layout, ext=ext)
            tried.append(path)
    where = f"{tried[0]} (nor {len(tried) - 1} other candidates)"
    raise not_found(f"PartImageNet-Seg image of {name}.png", where, _HINT)


def _load(name, split, root):
    root = root or default_partimagenet_seg_root()
    meta = _metadata(root, split, _base(root))
    sem_dir, image_dir = meta["sem_seg_root"], meta["image_root"]
    for path in (sem_dir, image_dir):
        require(path, "PartImageNet-Seg folder", _HINT, os.path.isdir)
    sync_metadata(name, meta)
    stems = _list_pngs(sem_dir)
    if not stems:
        return []
    image_path = _image_resolver(image_dir, stems[0])
    whole_dir = sem_dir.rstrip(os.sep) + "_whole"
    has_whole = os.path.isdir(whole_dir)
    records = []
    for stem in stems:
        base = os.path.basename(stem)
        record = {
            "file_name": image_path(stem),
            "image_id": base,
            "sem_seg_file_name": os.path.join(sem_dir, stem + ".png"),
            "class_code": base.split("_")[0],
        }
        if has_whole:
            record["object_sem_seg_file_name"] = os.path.join(whole_dir, stem + ".png")
        records.append(record)
    return records


def register_partimagenet_seg(root=None):
    """Register ``partimagenet_seg_{train,val,test}``; ``root=None`` resolves the root at load time."""
    register_splits("partimagenet_seg", _SPLITS, root, default_partimagenet_seg_root, _load, _metadata)


register_partimagenet_seg()
