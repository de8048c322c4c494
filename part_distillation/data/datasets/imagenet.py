"""Lazy detectron2 registration of unlabelled ImageNet-style image folders, from a manifest.

Registers ``imagenet_1k_train``, ``imagenet_21k_train`` and ``imagenet_22k_train`` (the reference's name for 21K). Each
reads only its manifest, written
beforehand by ``datasets/prepare_image_list.py`` (listing 14M files at every load would take hours)::

    imagenet_1k/                      (``$DETECTRON2_DATASETS/imagenet_1k``; same for imagenet_21k)
      train/<synset>/<image>.JPEG
      train_manifest.tsv              python datasets/prepare_image_list.py \\
                                          --root imagenet_1k/train --out imagenet_1k/train_manifest.tsv

Records: ``file_name``, ``image_id`` (the manifest path without extension, e.g.
``n01440764/n01440764_10026``: stable when images are added, unlike a line number),
``class_code`` (the synset), ``class_id`` (its index in the sorted synsets: the one synset → class id mapping
every object of the image takes, see :mod:`part_distillation.data.object_classes`) and ``height``/``width``
when the manifest has them (``--with-size``). Metadata ``synsets`` = ``class_codes`` (sorted synsets of the
manifest) is set at load time; ``image_level_labels`` (True) says that the records carry no object
annotations, only the image's class.

Memory: ``DatasetCatalog.get`` returns an :class:`ImageListDataset`, not a list. It keeps the
manifest in a few flat numpy arrays (one byte buffer of paths, offsets, synset indices, sizes:
about 60 bytes per image, ~0.8 GB for ImageNet-21K) and builds each record dict on access.
A list of 14M dicts would take ~10 GB, and detectron2's ``DatasetFromList`` would then pickle it
into one more numpy buffer, holding two copies while it does; detectron2 (≥ 0.6) accepts a
``torch.utils.data.Dataset`` from the catalog and skips that step. The manifest is read once,
streamed. The dataset supports ``len``, integer indexing, iteration, slicing and
:meth:`~ImageListDataset.subset` (e.g. for partitions or synset filters).
"""

import functools
import os
from array import array

import numpy as np
import torch.utils.data as torchdata

from ...utils.errors import DatasetNotFoundError
from .common import dataset_root, readme_hint, replace_registration, require, reset_metadata

__all__ = ["ImageListDataset", "read_manifest", "register_imagenet", "default_imagenet_root"]

_README = "datasets/README.md#imagenet"
# "22k" is the same ImageNet-21K (fall 2011) release under the name PartDistillation uses (imagenet_22k_train).
_VERSIONS = ("1k", "21k", "22k")


def default_imagenet_root(version):
    return dataset_root(f"imagenet_{version}")


class ImageListDataset(torchdata.Dataset):
    """Compact, read-only, list-like view of a manifest; item ``i`` is a fresh record dict."""

    def __init__(self, image_root, paths, offsets, synset_ids, synsets, sizes=None, rows=None):
        self.image_root = image_root
        self.synsets = synsets
        self._paths = paths  # uint8: all relative paths, concatenated (UTF-8)
        self._offsets = offsets  # int64, len N + 1
        self._synset_ids = synset_ids  # int32 indices into synsets
        self._sizes = sizes  # int32 (N, 2) width, height; or None
        self._rows = rows  # None, or int64 indices into the arrays above (a subset view)

    def __len__(self):
        return len(self._offsets) - 1 if self._rows is None else len(self._rows)

    def _row(self, index):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        return index if self._rows is None else int(self._rows[index])

    def relpath(self, index):
        row = self._row(index)
        raw = self._paths[self._offsets[row] : self._offsets[row + 1]].tobytes()
        return raw.decode("utf-8", "surrogateescape")

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(np.arange(len(self))[index])
        row = self._row(int(index))
        rel = self.relpath(index)
        record = {
            "file_name": os.path.join(self.image_root, rel),
            "image_id": os.path.splitext(rel)[0],
            "class_code": self.synsets[self._synset_ids[row]],
            # the image-level class: index of the synset in the sorted synsets (metadata ``class_codes``)
            "class_id": int(self._synset_ids[row]),
        }
        if self._sizes is not None:
            record["width"], record["height"] = int(self._sizes[row, 0]), int(self._sizes[row, 1])
        return record

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def synset_ids(self):
        """Per-image index into :attr:`synsets` (a numpy array; do not modify)."""
        return self._synset_ids if self._rows is None else self._synset_ids[self._rows]

    def subset(self, indices):
        """A view on the images at ``indices`` (positions in this dataset); shares the buffers."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = indices if self._rows is None else self._rows[indices]
        return ImageListDataset(
            self.image_root,
            self._paths,
            self._offsets,
            self._synset_ids,
            self.synsets,
            self._sizes,
            rows,
        )


def read_manifest(manifest, image_root):
    """Stream a manifest of ``prepare_image_list.py`` into an :class:`ImageListDataset` (one pass)."""
    paths = bytearray()
    offsets = array("q", [0])
    synset_ids = array("i")
    sizes = array("i")
    synset_index = {}
    with_size = None
    with open(manifest, "rb") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line or line.startswith(b"#"):
                continue
            fields = line.split(b"\t")
            if with_size is None:
                with_size = len(fields) >= 4
            if len(fields) < (4 if with_size else 2):
                raise ValueError(f"{manifest}:{line_no}: expected path, synset{', width, height' if with_size else ''}")
            paths += fields[0]
            offsets.append(len(paths))
            synset_ids.append(synset_index.setdefault(fields[1], len(synset_index)))
            if with_size:
                sizes.append(int(fields[2]))
                sizes.append(int(fields[3]))
    # Re-number synsets in sorted order (no second pass over the file, one small remap array).
    by_name = sorted(synset_index)
    remap = np.empty(len(by_name), dtype=np.int32)
    for new, name in enumerate(by_name):
        remap[synset_index[name]] = new
    ids = remap[np.frombuffer(synset_ids, dtype=np.int32)] if len(synset_ids) else np.zeros(0, np.int32)
    del synset_ids
    return ImageListDataset(
        image_root,
        np.frombuffer(paths, dtype=np.uint8),
        np.frombuffer(offsets, dtype=np.int64),
        ids,
        [s.decode("utf-8", "surrogateescape") for s in by_name],
        np.frombuffer(sizes, dtype=np.int32).reshape(-1, 2) if with_size else None,
    )


def _paths(root):
    return os.path.join(root, "train"), os.path.join(root, "train_manifest.tsv")


def _metadata(root):
    image_root, manifest = _paths(root)
    return {
        "image_root": image_root,
        "manifest_file": manifest,
        "evaluator_type": "pseudo_label_writer",
        "dataset_root": root,
        "image_level_labels": True,  # no object annotations: OBJECT_MASK_SOURCE "gt" cannot label it
    }


def _load(name, version, root):
    root = root or default_imagenet_root(version)
    image_root, manifest = _paths(root)
    require(image_root, f"ImageNet-{version.upper()} images", readme_hint(_README), os.path.isdir)
    run = f'run "python datasets/prepare_image_list.py --root {image_root} --out {manifest}" (see {_README})'
    require(manifest, f"ImageNet-{version.upper()} manifest", run, os.path.isfile)
    dataset = read_manifest(manifest, image_root)
    if len(dataset) == 0:
        raise DatasetNotFoundError(
            f"ImageNet-{version.upper()} manifest {manifest} lists no images; re-run datasets/prepare_image_list.py "
            f"(see {_README})"
        )
    reset_metadata(name, dict(_metadata(root), synsets=dataset.synsets, class_codes=list(dataset.synsets)))
    return dataset


def register_imagenet(version, root=None):
    """Register ``imagenet_<version>_train``; ``root=None`` is ``$DETECTRON2_DATASETS/imagenet_<version>``
    resolved at load time. Safe to call again (replaces the registration)."""
    name = f"imagenet_{version}_train"
    replace_registration(
        name, functools.partial(_load, name, version, root), _metadata(root or default_imagenet_root(version))
    )


for _version in _VERSIONS:
    register_imagenet(_version)
