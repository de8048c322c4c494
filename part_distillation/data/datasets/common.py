"""Helpers shared by the lazy dataset registrations of this package.

Every registration follows the same contract: registering reads no file (names and metadata only),
the dataset root is resolved from ``$DETECTRON2_DATASETS`` when ``DatasetCatalog.get`` runs, a missing
file is a one-line :class:`DatasetNotFoundError` that names the path and how to fix it, and calling
``register_*`` again replaces the earlier registration. The helpers below are that contract written
once, so that the dataset modules only say what differs: their layout, records and metadata.
"""

import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...utils.errors import DatasetNotFoundError

__all__ = [
    "dataset_root",
    "view_name",
    "replace_registration",
    "reset_metadata",
    "sync_metadata",
    "readme_hint",
    "not_found",
    "require",
    "first_existing",
    "register_splits",
    "register_views",
    "register_part_views",
]


def dataset_root(folder):
    """``$DETECTRON2_DATASETS/<folder>`` (``datasets/<folder>`` when unset), read at call time so that
    the variable may be set after import."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), folder)


def view_name(prefix, split, parts_view):
    """``<prefix>_<split>`` (objects view) or ``<prefix>_parts_<split>`` (parts view): the naming every
    object/part dataset uses, so that configs can switch views by name."""
    return f"{prefix}_parts_{split}" if parts_view else f"{prefix}_{split}"


def replace_registration(name, loader, metadata):
    """Register ``loader`` and ``metadata`` under ``name``, dropping an earlier registration first.

    detectron2 refuses to register a name twice and to change a metadata value in place, but
    ``register_*(root=...)`` must be callable again (tests, another root), hence remove-then-set.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def reset_metadata(name, values):
    """Replace the whole metadata of ``name`` with ``values`` (metadata values cannot be changed in
    place, so the entry is removed and set again)."""
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**values)


def sync_metadata(name, values):
    """Reset the metadata of ``name`` to ``values`` when any of them differs from what is set.

    Registration fills the metadata from the root it can resolve without reading files; load time may
    resolve another one ($DETECTRON2_DATASETS set after import, a folder found by probing). Evaluators
    read paths such as ``json_file`` from the metadata, so stale values must be replaced, while
    unchanged ones are left alone (load_coco_json and the like add keys that must survive).
    """
    current = MetadataCatalog.get(name)
    if any(current.get(key, None) != value for key, value in values.items()):
        reset_metadata(name, values)


def readme_hint(section, layout=False):
    """The usual end of a not-found message: where the layout is documented, or the env variable."""
    if layout:
        return f"see {section} for the expected layout (or set $DETECTRON2_DATASETS)"
    return f"see {section} or set $DETECTRON2_DATASETS"


def not_found(what, where, hint):
    """``DatasetNotFoundError("<what> not found: <where>; <hint>")``: one line, the path, the fix (the
    CLI prints the message alone, so it must be enough to act on)."""
    return DatasetNotFoundError(f"{what} not found: {where}; {hint}")


def require(path, what, hint, exists=os.path.exists):
    """``path`` if ``exists(path)``, else raise :func:`not_found` for it."""
    if not exists(path):
        raise not_found(what, path, hint)
    return path


def first_existing(candidates, exists=os.path.exists):
    """The first of ``candidates`` for which ``exists`` holds, else None: datasets whose releases
    extract into several layouts are probed in order, once, at load time."""
    return next((path for path in candidates if exists(path)), None)


def register_splits(prefix, splits, root, default_root, load, metadata):
    """Register ``<prefix>_<split>`` for each of ``splits`` (datasets with one view per split).

    Args:
        root: the dataset root, or None to resolve ``default_root()`` when the dataset is loaded.
        load: ``load(name, split, root)`` -> records, called by ``DatasetCatalog.get`` only.
        metadata: ``metadata(root, split)``, set now: it must read no file.
    """
    for split in splits:
        name = f"{prefix}_{split}"
        replace_registration(name, functools.partial(load, name, split, root), metadata(root or default_root(), split))


def register_views(prefix, splits, root, default_root, load, metadata):
    """Register both views (see :func:`view_name`) of each of ``splits``.

    Args:
        root: the dataset root, or None to resolve ``default_root()`` when the dataset is loaded.
        load: ``load(name, split, parts_view, root)`` -> records, called by ``DatasetCatalog.get`` only.
        metadata: ``metadata(root, split, parts_view)``, set now: it must read no file.
    """
    for split in splits:
        for parts_view in (False, True):
            name = view_name(prefix, split, parts_view)
            replace_registration(
                name,
                functools.partial(load, name, split, parts_view, root),
                metadata(root or default_root(), split, parts_view),
            )


def _load_then_sync(name, split, parts_view, root, *, default_root, load, metadata):
    root = root or default_root()
    records = load(root, split, parts_view, dataset_name=name)
    sync_metadata(name, metadata(root, split, parts_view))
    return records


def register_part_views(prefix, splits, root, default_root, load, metadata, registration_metadata=None):
    """:func:`register_views` for loaders that take a resolved root and whose metadata depends on what
    loading found (probed folders): the metadata is synced after a successful load.

    Args:
        load: ``load(root, split, parts_view, dataset_name=name)`` -> records.
        metadata: ``metadata(root, split, parts_view)``, synced after loading.
        registration_metadata: the same without file access, if ``metadata`` probes the file system;
            defaults to ``metadata``.
    """
    loader = functools.partial(_load_then_sync, default_root=default_root, load=load, metadata=metadata)
    register_views(prefix, splits, root, default_root, loader, registration_metadata or metadata)
