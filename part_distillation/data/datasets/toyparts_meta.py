"""Class lists of the embedded "toyparts" dataset.

Kept free of I/O and heavy imports so that configs, the registration module and the
generator can all share one source of truth for category ids.
"""

# Object classes and their parts. Order defines the category ids in the JSON files:
# object ids are 1..len(objects); part ids are 1..len(all parts), objects in this order.
_OBJECT_PARTS = (
    ("Quadruped", ("Head", "Body", "Leg", "Tail")),
    ("Car", ("Body", "Window", "Wheel")),
    ("Bird", ("Head", "Body", "Wing", "Tail")),
    ("Bottle", ("Cap", "Neck", "Body", "Label")),
    ("Fish", ("Head", "Body", "Fin", "Tail")),
)

TOYPARTS_OBJECT_CLASSES = [obj for obj, _ in _OBJECT_PARTS]

# Fake WordNet-like ids used as image directory names, as in PartImageNet.
TOYPARTS_CLASS_CODES = ["t{:07d}".format(i + 1) for i in range(len(_OBJECT_PARTS))]

TOYPARTS_PART_CLASSES = [f"{obj} {part}" for obj, parts in _OBJECT_PARTS for part in parts]

# Contiguous part index -> contiguous object index.
TOYPARTS_PART_TO_OBJECT = [i for i, (_, parts) in enumerate(_OBJECT_PARTS) for _ in parts]

# Object index -> its part names (without the object prefix), in part-id order.
TOYPARTS_OBJECT_PARTS = [list(parts) for _, parts in _OBJECT_PARTS]
