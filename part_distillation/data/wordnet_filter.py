"""ImageNet-21K class subsets by WordNet, as PartDistillation (Cho et al. 2023) supp. "Manual evaluation" builds them.

1. Remove "non-object" and "object without parts" classes: every synset in the WordNet subtree (hyponym closure,
   inclusive) of the paper's list :data:`PAPER_REMOVED_SUBTREES`. The paper lists words, not senses; we remove the
   subtrees of *every* noun sense of each word (our reading, see docs/differences.md).
2. Sample ``num_classes`` (paper: 10K) of the remaining classes at random; smaller sets (100 ... 5K) are random
   subsets of those.
3. Optionally a balanced set: ``balanced`` classes inside and as many outside "the PartImageNet subtree" (paper:
   300/300). PartImageNet's classes are ImageNet-1K synsets of 11 super-categories; "inside" here is the union of the
   subtrees of :data:`PARTIMAGENET_ROOTS`, WordNet synsets covering those super-categories (our choice).

The result is a manifest subset (the lines of ``datasets/prepare_image_list.py``'s manifest whose synset was kept),
written atomically, so ``imagenet_21k_train`` reads it as its ``train_manifest.tsv``. WordNet comes from nltk, offline
(``make setup`` installs WordNet 3.0 into the venv).
"""

import logging
import os
import random

from ..utils.errors import ConfigError
from ..utils.io import atomic_file
from .object_classes import load_wordnet, synset_of_wnid, wnid_of

__all__ = ["PAPER_REMOVED_SUBTREES", "PARTIMAGENET_ROOTS", "removed_synsets", "select_classes", "filter_manifest"]

logger = logging.getLogger(__name__)

# PartDistillation supp. "Manual evaluation": "we remove all subtrees of the following classes".
PAPER_REMOVED_SUBTREES = (
    "food", "foodstuff", "room", "herb", "tree", "fungus", "event", "act", "area", "grass", "geological formation",
    "sauce", "woody plant", "structure", "abstraction", "casting", "plant organ", "mixed drink", "plant part",
    "body part", "part", "region", "mechanism", "fabric", "material", "vine", "substance", "beverage", "attribute",
    "natural phenomenon", "meal", "cosmetic", "weed",
)  # fmt: skip
# The PartImageNet super-categories (Quadruped, Biped, Fish, Bird, Snake, Reptile, Car, Bicycle, Boat, Aeroplane,
# Bottle) as WordNet subtrees (our choice: quadrupeds and bipeds are mammals; snakes are reptiles).
PARTIMAGENET_ROOTS = (
    "mammal.n.01", "fish.n.01", "bird.n.01", "reptile.n.01", "car.n.01", "bicycle.n.01", "boat.n.01",
    "airplane.n.01", "bottle.n.01",
)  # fmt: skip


def _closure(roots, wn):
    out = set()
    for root in roots:
        out.add(wnid_of(root))
        for s in root.closure(lambda s: s.hyponyms() + s.instance_hyponyms()):
            out.add(wnid_of(s))
    return out


def removed_synsets(words=PAPER_REMOVED_SUBTREES, wn=None) -> set:
    """wnids in the subtrees of every noun sense of ``words``."""
    wn = wn or load_wordnet()
    roots = []
    for word in words:
        senses = [
            s
            for s in wn.synsets(word.replace(" ", "_"), pos="n")
            if word.replace(" ", "_") in [n.lower() for n in s.lemma_names()]
        ]
        if not senses:
            raise ConfigError(f"{word!r} has no WordNet noun sense; fix the subtree list.")
        roots += senses
    return _closure(roots, wn)


def inside_synsets(roots=PARTIMAGENET_ROOTS, wn=None) -> set:
    wn = wn or load_wordnet()
    try:
        return _closure([wn.synset(r) for r in roots], wn)
    except Exception as e:  # noqa: BLE001  (nltk's WordNetError)
        raise ConfigError(f"inside roots {roots}: {e}; give WordNet synset names such as dog.n.01.")


def select_classes(
    synsets,
    num_classes: int = 10000,
    balanced: int = 0,
    seed: int = 0,
    removed=PAPER_REMOVED_SUBTREES,
    inside_roots=PARTIMAGENET_ROOTS,
) -> dict:
    """Filter and sample the wnids ``synsets``.

    Returns ``{"kept": [...] (after the subtree removal), "sampled": [...] (num_classes of them, or all),
    "inside": [...], "outside": [...] (the balanced halves; empty when balanced is 0), "selected": [...]}``,
    each sorted. ``selected`` is the balanced set when ``balanced`` > 0, else ``sampled``.
    """
    wn = load_wordnet()
    gone = removed_synsets(removed, wn)
    unknown = [s for s in synsets if synset_of_wnid(s, wn) is None]
    if unknown:
        logger.warning("%d synsets are not WordNet 3.0 nouns (e.g. %s); they are dropped.", len(unknown), unknown[:5])
    kept = sorted(s for s in set(synsets) if s not in gone and s not in unknown)
    rng = random.Random(seed)
    sampled = sorted(rng.sample(kept, num_classes)) if 0 < num_classes < len(kept) else list(kept)
    out = {"kept": kept, "sampled": sampled, "inside": [], "outside": [], "selected": sampled}
    if balanced > 0:
        inside_all = inside_synsets(inside_roots, wn)
        inside = [s for s in sampled if s in inside_all]
        outside = [s for s in sampled if s not in inside_all]
        if len(inside) < balanced or len(outside) < balanced:
            raise ConfigError(
                f"--balanced {balanced}: only {len(inside)} classes inside and {len(outside)} outside the PartImageNet "
                "subtree remain; lower it."
            )
        out["inside"] = sorted(rng.sample(inside, balanced))
        out["outside"] = sorted(rng.sample(outside, balanced))
        out["selected"] = sorted(out["inside"] + out["outside"])
    return out


def manifest_synsets(manifest: str) -> list:
    """Sorted distinct synsets of a manifest (second column)."""
    found = set()
    with open(manifest, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise ConfigError(
                    f"{manifest}: a line without a synset column; rewrite it with datasets/prepare_image_list.py."
                )
            found.add(fields[1])
    return sorted(found)


def filter_manifest(manifest: str, out: str, keep) -> int:
    """Write the lines of ``manifest`` whose synset is in ``keep`` (and its header) to ``out`` atomically."""
    keep = set(keep)
    if os.path.abspath(manifest) == os.path.abspath(out):
        raise ConfigError("--out must differ from --manifest (the full manifest is the input of later subsets).")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    with atomic_file(out) as dst, open(manifest, encoding="utf-8", errors="surrogateescape") as src:
        for line in src:
            header = line.startswith("#")
            fields = line.split("\t", 2)
            if header or (len(fields) >= 2 and fields[1].rstrip("\n") in keep):
                dst.write(line.encode("utf-8", "surrogateescape"))
                written += 0 if header else 1
    return written
