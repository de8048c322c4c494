"""Lazy detectron2 registration of Cityscapes-Panoptic-Parts and PASCAL-Panoptic-Parts.

Both datasets store one label file per image: a 32-bit integer TIFF of panoptic-parts *uids*
(semantic id, instance id, part id in one number). They are decoded with the official
``panoptic_parts.decode_uids``; class names and ids come from the package's dataset spec YAMLs
(``panoptic_parts/specs/dataset_specs/{cpp,ppp}_datasetspec.yaml``).

Expected layouts (see datasets/README.md#cityscapes-panoptic-parts and
datasets/README.md#pascal-panoptic-parts)::

    $DETECTRON2_DATASETS/cityscapes/
        leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
        gtFinePanopticParts/<split>/<city>/<name>_gtFinePanopticParts.tif        split: train, val
    $DETECTRON2_DATASETS/pascal_panoptic_parts/
        images/<image_id>.jpg                    VOC2010 JPEGImages (a symlink is fine; "JPEGImages/" also accepted)
        labels/training/<image_id>.tif           train split ("labels/train/" also accepted)
        labels/validation/<image_id>.tif         val split ("labels/val/" also accepted)

Objects are the instances (pixels with an instance id) of the part-annotated *thing* classes:

* Cityscapes: person, rider, car, truck, bus (ids 0..4); the 23 part classes are
  ``<object>-<part>`` in spec order, id = ``CITYSCAPES_PART_BASE_ID[object] + pid - 1``;
* PASCAL: the 20 VOC classes (ids 0..19, as Pascal-Part); spec part names are merged with the
  Pascal-Part tables into the same 50 part classes (``tvmonitor-frame`` has no merged class and is
  dropped, as are part ids 0 (void) and -1 (no part label)). Part-level instance ids of PPP are
  folded by ``decode_uids`` with the PPP dataset spec.

Part masks are per object and per part class (the label format has no separate part instances
once folded). Objects without parts and images without part-annotated objects are dropped and
counted. Records have the layout of ``pascal_part.py`` (objects in ``annotations`` and parts in
``part_annotations``, or swapped into ``annotations``/``object_annotations`` for the ``*_parts_*``
views). Loading decodes every label file once; progress is logged every 10 %.

Registered names: ``cityscapes_panoptic_parts_{train,val}``, ``cityscapes_panoptic_parts_parts_{train,val}``,
``pascal_panoptic_parts_{train,val}``, ``pascal_panoptic_parts_parts_{train,val}``.
"""

import collections
import functools
import glob
import itertools
import logging
import os

import numpy as np

from ...utils.errors import DatasetNotFoundError
from .common import dataset_root, first_existing, not_found, readme_hint, register_part_views, require, view_name
from .pascal_part import (
    PASCAL_OBJECT_CLASSES,
    PASCAL_OBJECT_TO_PARTS,
    PASCAL_PART_CLASSES,
    PASCAL_PART_MERGE,
    PASCAL_PART_TO_OBJECTS,
    build_record,
    log_drop_summary,
    normalize_object_class,
    part_dataset_metadata,
)

__all__ = [
    "CITYSCAPES_OBJECT_CLASSES",
    "CITYSCAPES_PART_CLASSES",
    "CITYSCAPES_PART_BASE_ID",
    "CITYSCAPES_PART_TO_OBJECT",
    "CITYSCAPES_OBJECT_TO_PARTS",
    "register_cityscapes_panoptic_parts",
    "register_pascal_panoptic_parts",
    "load_cityscapes_panoptic_parts",
    "load_pascal_panoptic_parts",
    "read_uids",
    "dataset_spec",
    "default_cityscapes_root",
    "default_pascal_panoptic_parts_root",
]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val")
CPP_README = "datasets/README.md#cityscapes-panoptic-parts"
PPP_README = "datasets/README.md#pascal-panoptic-parts"

CITYSCAPES_OBJECT_CLASSES = ("person", "rider", "car", "truck", "bus")
# First global part id of each object class (PartDistillation's PART_BASE_ID).
CITYSCAPES_PART_BASE_ID = (0, 4, 8, 13, 18)
CITYSCAPES_PART_CLASSES = (
    "person-torso", "person-head", "person-arm", "person-leg",
    "rider-torso", "rider-head", "rider-arm", "rider-leg",
    "car-window", "car-wheel", "car-light", "car-license plate", "car-chassis",
    "truck-window", "truck-wheel", "truck-light", "truck-license plate", "truck-chassis",
    "bus-window", "bus-wheel", "bus-light", "bus-license plate", "bus-chassis",
)  # fmt: skip
CITYSCAPES_PART_TO_OBJECT = [
    max(o for o, base in enumerate(CITYSCAPES_PART_BASE_ID) if base <= p) for p in range(len(CITYSCAPES_PART_CLASSES))
]
CITYSCAPES_OBJECT_TO_PARTS = [
    [p for p, o in enumerate(CITYSCAPES_PART_TO_OBJECT) if o == obj] for obj in range(len(CITYSCAPES_OBJECT_CLASSES))
]

_SPEC_FILES = {"cityscapes": "cpp_datasetspec.yaml", "pascal": "ppp_datasetspec.yaml"}


@functools.lru_cache(maxsize=None)
def dataset_spec(which):
    """The panoptic_parts ``DatasetSpec`` of ``which`` in ("cityscapes", "pascal"), from the installed package."""
    from ...utils.compat import import_panoptic_parts

    pp = import_panoptic_parts()
    from panoptic_parts.specs.dataset_spec import DatasetSpec

    return DatasetSpec(os.path.join(os.path.dirname(pp.__file__), "specs", "dataset_specs", _SPEC_FILES[which]))


def read_uids(path):
    """A panoptic-parts label file -> H×W int32 uids (read as the package's own readers do)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im, dtype=np.int32)


def _decode(uids, spec=None):
    from ...utils.compat import import_panoptic_parts

    pp = import_panoptic_parts()
    if spec is None:
        return pp.decode_uids(uids)
    return pp.decode_uids(uids, experimental_dataset_spec=spec)


def _objects_from_uids(uids, object_sids, part_category, spec=None, counts=None):
    """Object instances with their part masks from one uid map.

    Args:
        object_sids: {semantic id: object category id} of the classes to keep.
        part_category: f(semantic id, part id >= 1) -> global part category id, or None to drop.
        spec: DatasetSpec passed to ``decode_uids`` (folds PPP's part-level instance ids).

    Returns:
        list of (object category id, H×W mask, [(part category id, H×W mask)]) with uint8 0/1 masks,
        ordered by (semantic id, instance id); part lists sorted by part category id.
    """
    counts = counts if counts is not None else collections.Counter()
    sids, iids, pids = _decode(uids, spec)
    instance = np.isin(sids, np.fromiter(object_sids, dtype=np.int32)) & (iids >= 0)
    if not instance.any():
        return []
    ys, xs = np.nonzero(instance)
    keys = sids[ys, xs].astype(np.int64) * 1000 + iids[ys, xs]
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    pixel_pids = pids[ys, xs]
    objects = []
    for k, key in enumerate(unique_keys):
        sid = int(key // 1000)
        sel = inverse == k
        oy, ox, opids = ys[sel], xs[sel], pixel_pids[sel]
        # masks are built column-major (uint8, order F): pycocotools' RLE encoder needs that
        # layout, and converting a 2048×1024 C-order mask costs ~7× the encoding itself
        object_mask = np.zeros(uids.shape, dtype=np.uint8, order="F")
        object_mask[oy, ox] = 1
        parts = {}
        for pid in np.unique(opids[opids >= 1]):
            category = part_category(sid, int(pid))
            if category is None:
                counts["part segments without a merged class"] += 1
                continue
            on = opids == pid
            if category not in parts:
                parts[category] = np.zeros(uids.shape, dtype=np.uint8, order="F")
            parts[category][oy[on], ox[on]] = 1
        if not parts:
            counts["objects without parts"] += 1
            continue
        objects.append((object_sids[sid], object_mask, sorted(parts.items())))
    return objects


def _load_label_files(dataset_name, pairs, object_sids, part_category, parts_view, spec=None):
    """Decode each (image file, label file, image id) of ``pairs`` into records; log progress and drops."""
    ids = itertools.count(1)
    counts = collections.Counter()
    examples = collections.defaultdict(list)
    records = []
    step = max(50, len(pairs) // 10)  # no progress lines for tiny splits
    for i, (image_file, label_file, image_id) in enumerate(pairs):
        if i and i % step == 0:
            logger.info("%s: decoded %d/%d label files", dataset_name, i, len(pairs))
        try:
            uids = read_uids(label_file)
            objects = _objects_from_uids(uids, object_sids, part_category, spec, counts)
        except (OSError, ValueError, AssertionError) as e:  # PIL / decode_uids on a damaged label file
            counts["undecodable label files"] += 1
            examples["undecodable label files"].append(f"{label_file} ({type(e).__name__}: {e})")
            continue
        if not objects:
            counts["images without part-annotated objects"] += 1
            continue
        height, width = uids.shape
        records.append(build_record(image_file, image_id, height, width, objects, ids, parts_view))
    log_drop_summary(dataset_name, {"images kept": len(records), **counts}, examples, log=logger)
    return records


# --------------------------------------------------------------------------------------------
# Cityscapes-Panoptic-Parts
# --------------------------------------------------------------------------------------------


def default_cityscapes_root():
    return dataset_root("cityscapes")


def _cpp_paths(root, split):
    return {
        "image_root": os.path.join(root, "leftImg8bit", split),
        "label_root": os.path.join(root, "gtFinePanopticParts", split),
    }


def _cpp_part_category(spec):
    """f(sid, pid) -> global Cityscapes part id; also checks the spec still has the expected parts."""
    sid_to_object = {}
    for o, name in enumerate(CITYSCAPES_OBJECT_CLASSES):
        spec_parts = [p for p in spec.part_classes_from_scene_class(name) if p != "UNLABELED"]
        expected = [c.split("-", 1)[1] for c in CITYSCAPES_PART_CLASSES if c.startswith(name + "-")]
        if spec_parts != expected:
            raise RuntimeError(f"panoptic_parts spec parts of {name!r} are {spec_parts}, expected {expected}")
        sid_to_object[spec.sid_from_scene_class(name)] = o

    def part_category(sid, pid):
        o = sid_to_object[sid]
        if pid > len(CITYSCAPES_OBJECT_TO_PARTS[o]):
            return None
        return CITYSCAPES_PART_BASE_ID[o] + pid - 1

    return sid_to_object, part_category


def load_cityscapes_panoptic_parts(root, split, parts_view=False, dataset_name=None):
    """Decode ``<root>/gtFinePanopticParts/<split>/*/*.tif`` into detectron2 dataset dicts."""
    dataset_name = dataset_name or view_name("cityscapes_panoptic_parts", split, parts_view)
    paths = _cpp_paths(root, split)
    hint = readme_hint(CPP_README, layout=True)
    require(root, "Cityscapes-Panoptic-Parts root", hint)
    require(paths["label_root"], "Cityscapes-Panoptic-Parts label folder", hint)
    require(paths["image_root"], "Cityscapes-Panoptic-Parts image folder", hint)
    suffix = "_gtFinePanopticParts.tif"
    label_files = sorted(glob.glob(os.path.join(paths["label_root"], "*", "*" + suffix)))
    if not label_files:
        raise DatasetNotFoundError(f"no <city>/*{suffix} label files in {paths['label_root']}; see {CPP_README}")
    pairs = []
    for label_file in label_files:
        city = os.path.basename(os.path.dirname(label_file))
        stem = os.path.basename(label_file)[: -len(suffix)]
        pairs.append((os.path.join(paths["image_root"], city, stem + "_leftImg8bit.png"), label_file, stem))
    sid_to_object, part_category = _cpp_part_category(dataset_spec("cityscapes"))
    return _load_label_files(dataset_name, pairs, sid_to_object, part_category, parts_view)


def _cpp_metadata(root, split, parts_view):
    return part_dataset_metadata(
        root,
        split,
        parts_view,
        CITYSCAPES_OBJECT_CLASSES,
        CITYSCAPES_PART_CLASSES,
        CITYSCAPES_PART_TO_OBJECT,
        CITYSCAPES_OBJECT_TO_PARTS,
        **_cpp_paths(root, split),
    )


def register_cityscapes_panoptic_parts(root=None):
    """Register the four Cityscapes-Panoptic-Parts views; ``root=None`` resolves it at load time."""
    register_part_views(
        "cityscapes_panoptic_parts",
        _SPLITS,
        root,
        default_cityscapes_root,
        load_cityscapes_panoptic_parts,
        _cpp_metadata,
    )


# --------------------------------------------------------------------------------------------
# PASCAL-Panoptic-Parts
# --------------------------------------------------------------------------------------------

# Split name -> label folder names tried in order (the release uses training/validation).
_PPP_LABEL_DIRS = {"train": ("training", "train"), "val": ("validation", "val")}
_PPP_IMAGE_DIRS = ("images", "JPEGImages")


def default_pascal_panoptic_parts_root():
    return dataset_root("pascal_panoptic_parts")


def _first_existing(root, names):
    """(the first existing folder ``root/<name>``, else the first candidate; all candidates)."""
    candidates = [os.path.join(root, n) for n in names]
    return first_existing(candidates, os.path.isdir) or candidates[0], candidates


def _ppp_paths(root, split, probe=True):
    """Image and label folders; without ``probe`` (registration: no file access) the default names."""
    if not probe:
        return {
            "image_root": os.path.join(root, _PPP_IMAGE_DIRS[0]),
            "label_root": os.path.join(root, "labels", _PPP_LABEL_DIRS[split][0]),
        }
    image_root, _ = _first_existing(root, _PPP_IMAGE_DIRS)
    label_root, _ = _first_existing(os.path.join(root, "labels"), _PPP_LABEL_DIRS[split])
    return {"image_root": image_root, "label_root": label_root}


def _ppp_part_category(spec):
    """f(sid, pid) -> merged Pascal-Part class id (None for parts without one, e.g. tvmonitor frame)."""
    sid_to_object, lookup = {}, {}
    for sid, scene_class in spec.sid2scene_class.items():
        if scene_class not in spec.l_things:
            continue
        o = normalize_object_class(scene_class)
        if o is None:
            continue
        sid_to_object[sid] = o
        table = PASCAL_PART_MERGE[PASCAL_OBJECT_CLASSES[o]]
        for pid, part_name in enumerate(spec.part_classes_from_sid(sid)):
            if pid >= 1 and part_name in table:
                lookup[(sid, pid)] = table[part_name]
    return sid_to_object, lambda sid, pid: lookup.get((sid, pid))


def load_pascal_panoptic_parts(root, split, parts_view=False, dataset_name=None):
    """Decode ``<root>/labels/<training|validation>/*.tif`` into detectron2 dataset dicts."""
    dataset_name = dataset_name or view_name("pascal_panoptic_parts", split, parts_view)
    require(root, "PASCAL-Panoptic-Parts root", readme_hint(PPP_README, layout=True))
    image_root, image_candidates = _first_existing(root, _PPP_IMAGE_DIRS)
    label_root, label_candidates = _first_existing(os.path.join(root, "labels"), _PPP_LABEL_DIRS[split])
    if not os.path.isdir(label_root):
        tried = f"tried {', '.join(label_candidates)}"
        raise not_found("PASCAL-Panoptic-Parts label folder", tried, f"see {PPP_README}")
    if not os.path.isdir(image_root):
        raise not_found(
            "PASCAL-Panoptic-Parts image folder",
            f"tried {', '.join(image_candidates)} (link VOC2010 JPEGImages there)",
            f"see {PPP_README}",
        )
    label_files = sorted(glob.glob(os.path.join(label_root, "*.tif")))
    if not label_files:
        raise DatasetNotFoundError(f"no *.tif label files in {label_root}; see {PPP_README}")
    pairs = []
    for label_file in label_files:
        stem = os.path.splitext(os.path.basename(label_file))[0]
        pairs.append((os.path.join(image_root, stem + ".jpg"), label_file, stem))
    spec = dataset_spec("pascal")
    sid_to_object, part_category = _ppp_part_category(spec)
    return _load_label_files(dataset_name, pairs, sid_to_object, part_category, parts_view, spec=spec)


def _ppp_metadata(root, split, parts_view, probe=True):
    return part_dataset_metadata(
        root,
        split,
        parts_view,
        PASCAL_OBJECT_CLASSES,
        PASCAL_PART_CLASSES,
        PASCAL_PART_TO_OBJECTS,
        PASCAL_OBJECT_TO_PARTS,
        **_ppp_paths(root, split, probe),
    )


def register_pascal_panoptic_parts(root=None):
    """Register the four PASCAL-Panoptic-Parts views; ``root=None`` resolves it at load time."""
    register_part_views(
        "pascal_panoptic_parts",
        _SPLITS,
        root,
        default_pascal_panoptic_parts_root,
        load_pascal_panoptic_parts,
        _ppp_metadata,
        registration_metadata=functools.partial(_ppp_metadata, probe=False),
    )


register_cityscapes_panoptic_parts()
register_pascal_panoptic_parts()
