"""Lazy detectron2 registration of DeepFashion In-shop clothes parsing, as used for part discovery.

Protocol of Choudhury et al. (Choudhury et al. 2021 appendix §1 "train on the official
train split. For evaluation, we combine query and gallery splits (6922 images)"):

* ``deepfashion_train``: the images of ``DeepFashion_segmentation_train.json``;
* ``deepfashion_test``: ``DeepFashion_segmentation_query.json`` + ``..._gallery.json`` (6,922 images),
  query first.

Expected layout (``root`` defaults to ``$DETECTRON2_DATASETS/deepfashion``; the segmentation folder
may be ``<root>/Anno/segmentation``, ``<root>/In-shop Clothes Retrieval Benchmark/Anno/segmentation``
or ``<root>/In-shop/Anno/segmentation``, decided at load time)::

    deepfashion/
      Anno/segmentation/
        DeepFashion_segmentation_{train,query,gallery}.json   (COCO-style; only images[] is read)
        img_highres/<...>/<name>.jpg           the image (else <root>/Img/<file_name>)
        img_highres/<...>/<name>_segment.png   its colour-coded parsing mask

Records: ``file_name``, ``image_id`` (position in the split: query and gallery ids may collide),
``json_image_id``, ``height``/``width`` (from the JSON when it has them), ``parsing_file_name`` (the
RGB ``_segment.png``). The parsing masks are colour-coded with the 16 colours of
:data:`DEEPFASHION_PARSING_COLORS` (index 0 = background, black); :func:`decode_parsing` turns one
into a uint8 label map (unknown colours → 255 = ignore), and the foreground is ``label != 0``. The
masks are deliberately not exposed as ``sem_seg_file_name``: detectron2 would read the RGB PNG as
grey levels. Class names are not given: which colour is which garment is not documented (the
reference code lists 15 names for 16 colours), and the part NMI/ARI metrics do not need them.
Nothing is read at import time.
"""

import json
import os

import numpy as np
from PIL import Image

from .common import dataset_root, first_existing, not_found, readme_hint, register_splits, require, sync_metadata

__all__ = [
    "DEEPFASHION_PARSING_COLORS",
    "decode_parsing",
    "register_deepfashion",
    "default_deepfashion_root",
]

_README = "datasets/README.md#deepfashion"
_HINT = readme_hint(_README)
_SPLITS = {"train": ("train",), "test": ("query", "gallery")}
_SEG_DIRS = ("", "In-shop Clothes Retrieval Benchmark", "In-shop")
IGNORE_LABEL = 255

# RGB colour of each parsing label (index = label; 0 = background).
DEEPFASHION_PARSING_COLORS = [
    (0, 0, 0), (0, 100, 0), (16, 78, 139), (50, 205, 50), (70, 130, 180), (127, 255, 212),
    (144, 238, 144), (211, 211, 211), (220, 220, 220), (245, 222, 179), (250, 235, 215),
    (255, 0, 0), (255, 140, 0), (255, 250, 205), (255, 250, 250), (255, 255, 0),
]  # fmt: skip


def default_deepfashion_root():
    return dataset_root("deepfashion")


def colors_to_labels(rgb):
    """H×W×3 uint8 colours → H×W uint8 labels (index in the palette; 255 for any other colour)."""
    rgb = np.asarray(rgb)
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in DEEPFASHION_PARSING_COLORS], dtype=np.int64)
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], packed), 0, len(keys) - 1)
    labels = order[pos].astype(np.uint8)
    labels[keys[order][pos] != packed] = IGNORE_LABEL
    return labels


def decode_parsing(path):
    """Read a ``_segment.png`` parsing mask as an H×W uint8 label map (see module docstring)."""
    with Image.open(path) as image:
        return colors_to_labels(np.asarray(image.convert("RGB")))


def _metadata(root, seg_dir=None):
    seg_dir = seg_dir or os.path.join(root, "Anno", "segmentation")
    return {
        "parsing_colors": [list(c) for c in DEEPFASHION_PARSING_COLORS],
        "num_parsing_labels": len(DEEPFASHION_PARSING_COLORS),
        "background_label": 0,
        "ignore_label": IGNORE_LABEL,
        "image_root": seg_dir,
        "evaluator_type": "part_nmi_ari",
        "dataset_root": root,
    }


def _segmentation_dir(root):
    candidates = [os.path.join(root, sub, "Anno", "segmentation") for sub in _SEG_DIRS]
    path = first_existing(candidates, os.path.isdir)
    if path is None:
        where = f"{candidates[0]} (nor under 'In-shop Clothes Retrieval Benchmark/' or 'In-shop/')"
        raise not_found("DeepFashion segmentation folder", where, _HINT)
    return path


def _load(name, split, root):
    root = root or default_deepfashion_root()
    seg_dir = _segmentation_dir(root)
    images = []
    for part in _SPLITS[split]:
        json_file = os.path.join(seg_dir, f"DeepFashion_segmentation_{part}.json")
        require(json_file, "DeepFashion annotations", _HINT, os.path.isfile)
        with open(json_file) as f:
            images.extend(json.load(f)["images"])

    sync_metadata(name, _metadata(root, seg_dir))
    if not images:
        return []

    # Images ship inside Anno/segmentation/ with their masks; else look in the In-shop Img/ folder.
    image_dir = seg_dir
    if not os.path.isfile(os.path.join(seg_dir, images[0]["file_name"])):
        image_dir = os.path.join(os.path.dirname(os.path.dirname(seg_dir)), "Img")
        if not os.path.isfile(os.path.join(image_dir, images[0]["file_name"])):
            where = f"{os.path.join(seg_dir, images[0]['file_name'])} (nor in {image_dir})"
            raise not_found("DeepFashion image", where, _HINT)
    records = []
    for index, image in enumerate(images):
        rel = image["file_name"]
        record = {
            "file_name": os.path.join(image_dir, rel),
            "image_id": index,
            "json_image_id": image.get("id"),
            "parsing_file_name": os.path.join(seg_dir, os.path.splitext(rel)[0] + "_segment.png"),
        }
        if "height" in image and "width" in image:
            record["height"], record["width"] = int(image["height"]), int(image["width"])
        records.append(record)
    return records


def register_deepfashion(root=None):
    """Register ``deepfashion_{train,test}``; ``root=None`` resolves ``$DETECTRON2_DATASETS`` at load time."""
    register_splits("deepfashion", _SPLITS, root, default_deepfashion_root, _load, lambda root, split: _metadata(root))


register_deepfashion()
