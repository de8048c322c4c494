"""Stores as detectron2 datasets: ``<source>_pseudo_<stage>``, registered lazily (the store is read when
``DatasetCatalog.get`` runs, never at import)."""

import functools
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...utils.errors import ConfigError
from .reader import PseudoLabelReader
from .records import record_to_dataset_dict
from .shards import is_plain_name, store_dir

__all__ = [
    "pseudo_label_dataset_name",
    "load_pseudo_label_dicts",
    "register_pseudo_label_dataset",
    "register_all_pseudo_label_datasets",
]

logger = logging.getLogger(__name__)


def pseudo_label_dataset_name(source: str, stage: str) -> str:
    return f"{source}_pseudo_{stage}"


def load_pseudo_label_dicts(root: str, source: str, stage: str, verify: bool = True) -> list:
    """All records of a store as detectron2 dataset dicts, in dataset order."""
    reader = PseudoLabelReader(root, source, stage, verify=verify)
    dicts = [record_to_dataset_dict(r) for r in reader]
    logger.info("Loaded %d pseudo-labelled images from %s", len(dicts), reader.dir)
    return dicts


def register_pseudo_label_dataset(
    name, root, source, stage, metadata_from=None, thing_classes=("part",), loader: str = "store"
):
    """Register store ``<root>/<source>/<stage>`` as detectron2 dataset ``name`` (lazily: the store
    is read when ``DatasetCatalog.get(name)`` runs). Replaces an existing registration.

    ``loader``: "store" (default) makes ``DatasetCatalog.get(name)`` return a
    :class:`~part_distillation.data.store_dataset.PseudoLabelStoreDataset`, a list-like view that decodes
    records on access (memory independent of the store's size); "list" returns every record as a dict
    (:func:`load_pseudo_label_dicts`; config key ``DATASETS.PSEUDO_LABEL_LOADER``).

    Metadata: ``thing_classes`` (class-agnostic ``["part"]`` by default), ``evaluator_type``
    copied from dataset ``metadata_from`` when given, and ``pseudo_label_root/source/stage``.
    """
    store_dir(root, source, stage)  # validates the names
    if loader not in ("store", "list"):
        raise ConfigError(f"DATASETS.PSEUDO_LABEL_LOADER={loader!r}: use 'store' (decode on access) or 'list'")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if loader == "store":
        from ..store_dataset import PseudoLabelStoreDataset

        DatasetCatalog.register(name, functools.partial(PseudoLabelStoreDataset, root, source, stage))
    else:
        DatasetCatalog.register(name, functools.partial(load_pseudo_label_dicts, root, source, stage))
    meta = {
        "thing_classes": list(thing_classes),
        "pseudo_label_root": root,
        "pseudo_label_source": source,
        "pseudo_label_stage": stage,
    }
    if metadata_from is not None:
        evaluator_type = MetadataCatalog.get(metadata_from).get("evaluator_type")
        if evaluator_type is not None:
            meta["evaluator_type"] = evaluator_type
        meta["metadata_from"] = metadata_from
    MetadataCatalog.get(name).set(**meta)
    return name


def register_all_pseudo_label_datasets(root: str, thing_classes=("part",), loader: str = "store") -> list:
    """Register every store under ``root`` as ``<source>_pseudo_<stage>``; returns the names.

    Scans ``root`` when called (never at import). A source that is itself a registered dataset
    lends its ``evaluator_type``. ``thing_classes`` names the label space the stores are trained
    with (class-agnostic ``["part"]``, or P part classes when training on ranked stores). ``loader``: see
    :func:`register_pseudo_label_dataset`.
    """
    names = []
    if not os.path.isdir(root):
        return names
    registered = set(DatasetCatalog.list())
    for source in sorted(os.listdir(root)):
        if not is_plain_name(source) or not os.path.isdir(os.path.join(root, source)):
            continue
        for stage in sorted(os.listdir(os.path.join(root, source))):
            directory = os.path.join(root, source, stage)
            if not is_plain_name(stage):
                continue
            if not any(os.path.isfile(os.path.join(directory, f)) for f in ("manifest.json", "store.json")):
                continue
            name = pseudo_label_dataset_name(source, stage)
            register_pseudo_label_dataset(
                name,
                root,
                source,
                stage,
                metadata_from=source if source in registered else None,
                thing_classes=thing_classes,
                loader=loader,
            )
            names.append(name)
    return names
