"""Object class identities: image-level ImageNet labels, the class list a store carries, zero-shot maps.

On an image-level-labelled dataset (an ImageNet-1K/21K folder, ``imagenet_*_train``) every object of an image
takes the image's synset as its class, whatever found the object (a stage-0 Mask2Former, Detic or a JSON):
PartDistillation (Cho et al. 2023) indexes the stage-3 prototypes and the stage-4 part classifiers by the ImageNet
class of the image. The one mapping synset → contiguous class id is the position of the synset in the dataset's
sorted synset list (metadata ``class_codes``); every pseudo-label store written from such a dataset keeps that list
next to its shards (``object_classes.json``), and later stages read it from there, so a stage-4 model's
classifier ``c`` is the synset ``class_codes[c]`` of the store it was trained on.

Zero-shot evaluation (paper Tab. 3) feeds a *target* dataset's objects to a model trained on that label space:
:func:`synset_class_map` maps each target synset (PartImageNet's ImageNet-1K synsets, Pascal-Part's object classes
through :data:`PASCAL_SYNSETS`) to the model's class id: the same synset when the model has it, else its nearest
WordNet hypernym that the model has (ImageNet-21K contains ImageNet-1K, so 1K → 21K is the identity on synsets when
the model was trained on all 21K classes).
"""

import json
import logging
import os

from ..utils.errors import ConfigError

__all__ = [
    "CLASSES_FILE",
    "load_wordnet",
    "PASCAL_SYNSETS",
    "write_store_classes",
    "read_store_classes",
    "store_classes_of_dataset",
    "synset_class_map",
    "model_class_codes",
    "synset_of_name",
]

logger = logging.getLogger(__name__)

CLASSES_FILE = "object_classes.json"

# Pascal-Part (VOC) object classes → WordNet synsets (the VOC class definitions; our choice of sense).
PASCAL_SYNSETS = {
    "aeroplane": "airplane.n.01",
    "bicycle": "bicycle.n.01",
    "bird": "bird.n.01",
    "boat": "boat.n.01",
    "bottle": "bottle.n.01",
    "bus": "bus.n.01",
    "car": "car.n.01",
    "cat": "domestic_cat.n.01",
    "chair": "chair.n.01",
    "cow": "cattle.n.01",
    "diningtable": "dining_table.n.01",
    "dog": "dog.n.01",
    "horse": "horse.n.01",
    "motorbike": "motorcycle.n.01",
    "person": "person.n.01",
    "pottedplant": "pot_plant.n.01",
    "sheep": "sheep.n.01",
    "sofa": "sofa.n.01",
    "train": "train.n.01",
    "tvmonitor": "television_receiver.n.01",
}


def load_wordnet():
    """nltk's WordNet reader (offline: the corpus is installed in the venv by ``make setup``)."""
    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
    except (ImportError, LookupError) as e:
        raise ConfigError(
            f"WordNet is not available to nltk ({type(e).__name__}); run `make setup` (it installs WordNet 3.0 into "
            "the venv's share/nltk_data)."
        )
    return wn


def wnid_of(synset) -> str:
    """``n02084071`` for nltk's Synset('dog.n.01')."""
    return f"{synset.pos()}{synset.offset():08d}"


def synset_of_wnid(wnid: str, wn=None):
    wn = wn or load_wordnet()
    try:
        return wn.synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
    except Exception:  # noqa: BLE001  (nltk raises WordNetError / ValueError for unknown offsets)
        return None


def synset_of_name(name: str, wn=None) -> str:
    """The wnid of a synset name (``dog.n.01``), of a Pascal class (``aeroplane``) or a wnid itself."""
    if len(name) == 9 and name[0] == "n" and name[1:].isdigit():
        return name
    wn = wn or load_wordnet()
    name = PASCAL_SYNSETS.get(name, name)
    try:
        return wnid_of(wn.synset(name))
    except Exception:  # noqa: BLE001
        raise ConfigError(f"{name!r} is neither a wnid (n01234567) nor a WordNet synset name (e.g. dog.n.01).")


def write_store_classes(directory: str, class_codes, names=None) -> str:
    """Write ``<directory>/object_classes.json`` atomically: the synset of every contiguous class id."""
    from ..utils.io import atomic_write_bytes

    payload = {"class_codes": list(class_codes)}
    if names is not None:
        payload["names"] = list(names)
    path = os.path.join(directory, CLASSES_FILE)
    atomic_write_bytes(path, json.dumps(payload, indent=0).encode("utf-8"))
    return path


def read_store_classes(directory: str):
    """The ``{"class_codes": [...], ...}`` of a store directory, or None when it has none."""
    path = os.path.join(directory, CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); delete it and rerun the stage that wrote the store.")
    if not isinstance(data, dict) or not isinstance(data.get("class_codes"), list):
        raise ConfigError(f'{path}: expected {{"class_codes": [...]}}; rerun the stage that wrote the store.')
    return data


def store_classes_of_dataset(dataset_name: str):
    """Class codes of a dataset: its metadata ``class_codes`` (image-level datasets once loaded, pseudo-label
    stores that carry ``object_classes.json``), else None."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    codes = meta.get("class_codes", None)
    if codes:
        return list(codes)
    root, source, stage = (
        meta.get(k, None) for k in ("pseudo_label_root", "pseudo_label_source", "pseudo_label_stage")
    )
    if root and source and stage:
        data = read_store_classes(os.path.join(root, source, stage))
        return list(data["class_codes"]) if data else None
    return None


def model_class_codes(path: str, train_dataset: str = ""):
    """The synset of each of a model's classifiers: ``path`` (an ``object_classes.json`` or a store folder holding
    one), else the store of ``train_dataset``."""
    if path:
        if os.path.isdir(path):
            data = read_store_classes(path)
        elif os.path.isfile(path):
            data = read_store_classes(os.path.dirname(path) or ".") if os.path.basename(path) == CLASSES_FILE else None
            if data is None:
                from ..utils.io import read_user_json

                data = read_user_json(path, "TEST.MODEL_CLASS_CODES")
        else:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("class_codes"), list):
            raise ConfigError(
                f"TEST.MODEL_CLASS_CODES={path!r} is not an object_classes.json (or a store folder with "
                "one); give the one of the store the model was trained on."
            )
        return list(data["class_codes"])
    codes = store_classes_of_dataset(train_dataset) if train_dataset else None
    if not codes:
        raise ConfigError(
            "TEST.OBJECT_CLASS_MAP 'synset' needs the model's class list: set TEST.MODEL_CLASS_CODES to the "
            f"object_classes.json of its training store (DATASETS.TRAIN={train_dataset!r} has none)."
        )
    return codes


def synset_class_map(model_codes, target_codes, use_hypernyms: bool = True) -> list:
    """Model class id for every target synset (-1 when the model has neither it nor one of its hypernyms).

    ``target_codes`` are wnids or synset names (Pascal-Part class names through :data:`PASCAL_SYNSETS`).
    """
    index = {code: i for i, code in enumerate(model_codes)}
    wn = None
    out = []
    for name in target_codes:
        code = name if name in index else None
        if code is None:
            wn = wn or load_wordnet()
            code = synset_of_name(name, wn)
        if code in index:
            out.append(index[code])
            continue
        found = -1
        if use_hypernyms:
            wn = wn or load_wordnet()
            synset = synset_of_wnid(code, wn)
            # breadth-first over hypernyms: the nearest ancestor the model has
            frontier, seen = [synset] if synset is not None else [], set()
            while frontier and found < 0:
                nxt = []
                for s in frontier:
                    for h in s.hypernyms() + s.instance_hypernyms():
                        if h in seen:
                            continue
                        seen.add(h)
                        if wnid_of(h) in index:
                            found = index[wnid_of(h)]
                            break
                        nxt.append(h)
                    if found >= 0:
                        break
                frontier = nxt
        out.append(found)
    missing = [t for t, c in zip(target_codes, out) if c < 0]
    if missing:
        logger.warning(
            "%d of %d target classes have no class in the model's label space (e.g. %s); their objects "
            "are not evaluated.",
            len(missing),
            len(out),
            missing[:5],
        )
    return out
