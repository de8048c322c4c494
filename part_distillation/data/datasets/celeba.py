"""Lazy detectron2 registration of CelebA faces with 5 landmarks, and its MAFL subsets.

Aligned CelebA (``img_align_celeba``) with the standard MAFL protocol of unsupervised landmark /
part discovery (MAFL = 19,000 train + 1,000 test CelebA images):

* ``celeba_train``: CelebA's official train partition (``list_eval_partition.txt`` value 0) minus the
  MAFL test images, the images the models train on (PartFormer paper §4.1);
* ``celeba_test``: CelebA's official test partition (value 2); not part of the papers' protocol;
* ``mafl_train``: MAFL ``training.txt``, the set the landmark regressor is fitted on (PartFormer code:
  "fitted on the MAFL-train ('val') set");
* ``mafl_test``: MAFL ``testing.txt``, where NME / keypoint NMI-ARI are reported (PartFormer paper Table 1).

The papers B and C themselves use *unaligned* "CelebA-in-the-wild" with lists released in their code
(face > 30 % of the image, MPAE supp. A.1, code lists: 45,609 train / 5,379 MAFL-train / 283 MAFL-test, in original
``img_celeba`` coordinates); those lists are registered as ``celeba_wild_train``,
``mafl_wild_train`` and ``mafl_wild_test`` when present.

Expected layout (``root`` defaults to ``$DETECTRON2_DATASETS/celeba``; each list file may sit at the
top level or, as in the official download, in ``Anno/`` / ``Eval/`` / ``MAFL/``; images may be in
``img_align_celeba/`` or ``Img/img_align_celeba/``)::

    celeba/
      img_align_celeba/000001.jpg ...
      list_landmarks_align_celeba.txt   (count line, header line, "000001.jpg x1 y1 ... x5 y5")
      list_eval_partition.txt           ("000001.jpg 0", 0/1/2 = train/val/test)
      MAFL/training.txt  MAFL/testing.txt   (one CelebA file name per line)
      # unaligned variant (optional):
      img_celeba/000001.jpg ...
      cele_train_lm.txt  MAFL_train_lm.txt  MAFL_test_lm.txt   ("name.jpg,x1,y1,...,x5,y5")

Records: ``file_name``, ``image_id`` (the integer of the file stem), ``keypoints`` (5 ``[x, y, 1]`` in
the order left eye, right eye, nose, left mouth corner, right mouth corner; raw pixel values). No
``height``/``width`` (the mappers' ``check_image_size`` fills them) and no ``annotations``. Nothing
is read at import time.
"""

import functools
import os
import re

from ...utils.errors import DatasetNotFoundError
from .common import dataset_root, first_existing, not_found, readme_hint, replace_registration, sync_metadata

__all__ = [
    "CELEBA_KEYPOINT_NAMES",
    "CELEBA_KEYPOINT_FLIP_MAP",
    "register_celeba",
    "default_celeba_root",
]

_README = "datasets/README.md#celeba-and-mafl"
CELEBA_KEYPOINT_NAMES = ["left eye", "right eye", "nose", "left mouth", "right mouth"]
CELEBA_KEYPOINT_FLIP_MAP = [("left eye", "right eye"), ("left mouth", "right mouth")]

_ALIGNED = ("celeba_train", "celeba_test", "mafl_train", "mafl_test")
# name -> its landmark list (from the B / C code releases), images in img_celeba/
_WILD_LISTS = {
    "celeba_wild_train": "cele_train_lm.txt",
    "mafl_wild_train": "MAFL_train_lm.txt",
    "mafl_wild_test": "MAFL_test_lm.txt",
}


def default_celeba_root():
    return dataset_root("celeba")


def _find(root, name, subdirs):
    """``root/<subdir>/<name>`` for the first subdir where it exists (subdir "" = root itself)."""
    candidates = [os.path.join(root, sub, name) for sub in subdirs]
    path = first_existing(candidates)
    if path is None:
        where = f"{candidates[0]} (nor in {', '.join(s or '.' for s in subdirs[1:])})"
        raise not_found("CelebA path", where, readme_hint(_README))
    return path


def _metadata(root, image_dir=None):
    return {
        "keypoint_names": list(CELEBA_KEYPOINT_NAMES),
        "keypoint_flip_map": list(CELEBA_KEYPOINT_FLIP_MAP),
        "image_root": image_dir or os.path.join(root, "img_align_celeba"),
        "evaluator_type": "part_keypoints",
        "dataset_root": root,
    }


def _image_id(file_name):
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return int(stem) if stem.isdigit() else stem


def _record(image_dir, file_name, coords):
    return {
        "file_name": os.path.join(image_dir, file_name),
        "image_id": _image_id(file_name),
        "keypoints": [[coords[2 * i], coords[2 * i + 1], 1] for i in range(len(CELEBA_KEYPOINT_NAMES))],
    }


def _read_names(path):
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _read_aligned_landmarks(path):
    """file name -> 10 floats; the count and header lines are skipped (they have no file name)."""
    landmarks = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 11 and "." in fields[0]:
                landmarks[fields[0]] = [float(v) for v in fields[1:]]
    return landmarks


def _load_aligned(name, root):
    root = root or default_celeba_root()
    image_dir = _find(root, "img_align_celeba", ["", "Img"])
    landmarks = _read_aligned_landmarks(_find(root, "list_landmarks_align_celeba.txt", ["", "Anno"]))
    mafl_dirs = ["MAFL", ""]
    mafl_test = _read_names(_find(root, "testing.txt", mafl_dirs))
    if name.startswith("mafl_"):
        names = mafl_test if name == "mafl_test" else _read_names(_find(root, "training.txt", mafl_dirs))
    else:
        partition = {}
        with open(_find(root, "list_eval_partition.txt", ["", "Eval"])) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 2:
                    partition[fields[0]] = int(fields[1])
        wanted = 0 if name == "celeba_train" else 2
        excluded = set(mafl_test) if name == "celeba_train" else set()
        names = sorted(n for n, p in partition.items() if p == wanted and n not in excluded)
    missing = [n for n in names if n not in landmarks]
    if missing:
        raise DatasetNotFoundError(
            f"CelebA landmarks of {missing[0]} ({len(missing)} images of {name}) missing from "
            f"list_landmarks_align_celeba.txt under {root}; see {_README}"
        )
    sync_metadata(name, _metadata(root, image_dir))
    return [_record(image_dir, n, landmarks[n]) for n in names]


def _load_wild(name, root):
    root = root or default_celeba_root()
    image_dir = _find(root, "img_celeba", ["", "Img"])
    records = []
    with open(_find(root, _WILD_LISTS[name], [""])) as f:
        for line in f:
            fields = [v for v in re.split(r"[,\s]+", line.strip()) if v]
            if len(fields) != 11:
                continue
            try:
                coords = [float(v) for v in fields[1:]]
            except ValueError:  # a header line
                continue
            records.append(_record(image_dir, fields[0], coords))
    sync_metadata(name, _metadata(root, image_dir))
    return records


def register_celeba(root=None):
    """Register the aligned and in-the-wild CelebA / MAFL names; ``root=None`` resolves at load time."""
    loaders = [(n, _load_aligned) for n in _ALIGNED] + [(n, _load_wild) for n in _WILD_LISTS]
    for name, loader in loaders:
        image_dir = None if loader is _load_aligned else os.path.join(root or default_celeba_root(), "img_celeba")
        replace_registration(
            name, functools.partial(loader, name, root), _metadata(root or default_celeba_root(), image_dir)
        )


register_celeba()
