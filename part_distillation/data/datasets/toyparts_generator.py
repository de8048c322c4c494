"""Procedural generator of the "toyparts" dataset (PartImageNet layout, COCO json).

Toyparts is a tiny stand-in for PartImageNet that can be generated in seconds, so that the
whole pipeline (object proposals -> part pseudo-labels -> distillation -> evaluation) can be
run and tested without downloading anything. Images contain 1-3 objects, each an
assembly of parts with a consistent layout. Colour is deliberately uninformative about
the part class (all parts of an instance draw their colours from the same distribution);
parts differ by texture and shape, which is what learned dense features should capture.

Every image is rendered from its own random stream derived from (seed, split, index), so an
image does not change when the number of other images changes.
"""

import colorsys
import json
import math
import os
import time

import cv2
import numpy as np
from pycocotools import mask as mask_util
from tqdm import tqdm

from ...utils.io import atomic_write_bytes
from .toyparts_meta import (
    TOYPARTS_CLASS_CODES,
    TOYPARTS_OBJECT_CLASSES,
    TOYPARTS_OBJECT_PARTS,
    TOYPARTS_PART_CLASSES,
    TOYPARTS_PART_TO_OBJECT,
)

__all__ = ["generate_toyparts", "render_image", "MIN_PART_AREA", "MIN_OBJECT_AREA"]

# Parts/objects with fewer visible pixels are dropped: they are unlearnable slivers.
MIN_PART_AREA = 20
MIN_OBJECT_AREA = 20
JPEG_QUALITY = 90
_SPLIT_IDS = {"train": 0, "val": 1}
# Labels in the per-image instance/part map are inst * _PART_SLOTS + local_part + 1.
_PART_SLOTS = 8


# ------------------------------------------------------------------------------------------
# Shape primitives, in an object-centred canonical frame: x points the way the object
# faces, y points down, and the object roughly fits in [-1, 1]^2.
# ------------------------------------------------------------------------------------------
def _rotate(pts, angle_deg):
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _ellipse(cx, cy, rx, ry, angle=0.0, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    return _rotate(pts, angle) + (cx, cy)


def _rect(cx, cy, w, h, angle=0.0):
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
    return _rotate(pts, angle) + (cx, cy)


def _poly(*pts):
    return np.array(pts, dtype=np.float64)


# Per object class: (part name, polygon) in drawing order. Later polygons cover earlier
# ones, which both makes the parts of an object disjoint and defines the layout.
_TEMPLATES = {
    "Quadruped": [
        *[("Leg", _rect(x, 0.45, 0.13, 0.6)) for x in (-0.55, -0.35, 0.35, 0.55)],
        ("Tail", _rect(-0.82, -0.22, 0.36, 0.09, angle=35)),
        ("Body", _ellipse(0.0, 0.0, 0.72, 0.32)),
        ("Head", _ellipse(0.7, -0.3, 0.24, 0.2)),
        ("Head", _poly((0.58, -0.42), (0.66, -0.62), (0.74, -0.44))),
    ],
    "Car": [
        ("Body", _rect(0.0, 0.15, 2.0, 0.5)),
        ("Body", _poly((-0.55, -0.1), (-0.35, -0.55), (0.3, -0.55), (0.6, -0.1))),
        ("Window", _poly((-0.45, -0.15), (-0.3, -0.47), (-0.05, -0.47), (-0.05, -0.15))),
        ("Window", _poly((0.05, -0.15), (0.05, -0.47), (0.25, -0.47), (0.48, -0.15))),
        *[("Wheel", _ellipse(x, 0.42, 0.22, 0.22)) for x in (-0.55, 0.55)],
    ],
    "Bird": [
        ("Tail", _poly((-0.45, 0.0), (-1.0, -0.3), (-1.0, 0.25))),
        ("Body", _ellipse(0.0, 0.05, 0.58, 0.34, angle=-10)),
        ("Wing", _ellipse(-0.12, -0.1, 0.45, 0.17, angle=-15)),
        ("Head", _ellipse(0.56, -0.28, 0.22, 0.22)),
        ("Head", _poly((0.74, -0.34), (0.94, -0.26), (0.74, -0.21))),
    ],
    "Bottle": [
        ("Body", _rect(0.0, 0.4, 0.9, 1.2)),
        ("Body", _ellipse(0.0, -0.2, 0.45, 0.2)),
        ("Neck", _rect(0.0, -0.5, 0.32, 0.5)),
        ("Cap", _rect(0.0, -0.86, 0.4, 0.22)),
        ("Label", _rect(0.0, 0.4, 0.9, 0.5)),
    ],
    "Fish": [
        ("Tail", _poly((-0.55, 0.0), (-1.0, -0.42), (-0.9, 0.0), (-1.0, 0.42))),
        ("Fin", _poly((-0.25, -0.25), (0.2, -0.3), (-0.35, -0.62))),
        ("Fin", _poly((-0.1, 0.25), (0.15, 0.28), (-0.2, 0.5))),
        ("Body", _ellipse(0.0, 0.0, 0.65, 0.33)),
        ("Head", _ellipse(0.42, 0.0, 0.24, 0.29)),
    ],
}

# Per part: (texture kind, period in pixels, orientation in the object frame, degrees).
# Within one object every part has a different kind, so texture identifies the part.
_PART_TEXTURES = {
    "Quadruped": {
        "Head": ("dots", 6, 0),
        "Body": ("stripes", 8, 0),
        "Leg": ("noise", 2, 0),
        "Tail": ("smooth", 0, 0),
    },
    "Car": {"Body": ("smooth", 0, 0), "Window": ("stripes", 4, 45), "Wheel": ("checker", 4, 0)},
    "Bird": {
        "Head": ("smooth", 0, 0),
        "Body": ("dots", 5, 0),
        "Wing": ("stripes", 5, 60),
        "Tail": ("noise", 2, 0),
    },
    "Bottle": {
        "Cap": ("checker", 3, 0),
        "Neck": ("smooth", 0, 0),
        "Body": ("noise", 2, 0),
        "Label": ("stripes", 5, 90),
    },
    "Fish": {
        "Head": ("smooth", 0, 0),
        "Body": ("checker", 4, 0),
        "Fin": ("stripes", 4, 0),
        "Tail": ("noise", 2, 0),
    },
}
_TEXTURE_KINDS = ("stripes", "dots", "checker", "smooth", "noise")


# ------------------------------------------------------------------------------------------
# Textures: functions of pixel coordinates (u, v) in a frame that rotates with the shape,
# returning a mixing weight in [0, 1] between the two colours of a part.
# ------------------------------------------------------------------------------------------
def _texture(kind, period, angle, u, v, rng):
    if kind == "smooth":  # low-frequency shading only
        return 0.1 * (1.0 + np.sin((u + v) / 20.0 + rng.uniform(0, 2 * np.pi)))
    if kind == "noise":  # random value per period x period cell
        iu = np.floor(u / period).astype(np.int64)
        iv = np.floor(v / period).astype(np.int64)
        iu -= iu.min()
        iv -= iv.min()
        return rng.random((iu.max() + 1, iv.max() + 1))[iu, iv]
    pu, pv = u + rng.uniform(0, period), v + rng.uniform(0, period)
    if kind == "stripes":  # soft square wave
        a = math.radians(angle)
        w = pu * math.cos(a) + pv * math.sin(a)
        return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * w / period), 0.0, 1.0)
    if kind == "checker":
        return ((np.floor(pu / period) + np.floor(pv / period)) % 2).astype(np.float64)
    if kind == "dots":
        du = np.mod(pu, period) - period / 2
        dv = np.mod(pv, period) - period / 2
        return np.clip(0.3 * period - np.sqrt(du * du + dv * dv) + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture kind {kind!r}")


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _part_colours(rng, hue):
    """Two colours of one part: shared hue, value contrast of random sign.

    Every part of an instance samples from this same distribution, so neither the mean
    colour nor the colour pair reveals which part it is.
    """
    h = hue + rng.normal(0, 0.03)
    s = rng.uniform(0.35, 0.9)
    va = rng.uniform(0.3, 0.95)
    dv = rng.uniform(0.3, 0.5)
    vb = va - dv if va - dv >= 0.1 else va + dv
    cols = [_hsv(h, s, va), _hsv(h, s * rng.uniform(0.7, 1.0), min(vb, 1.0))]
    if rng.random() < 0.5:
        cols.reverse()
    return cols


def _paint(img, ys, xs, u, v, texture, colours, rng):
    kind, period, angle = texture
    t = _texture(kind, period, angle, u, v, rng)[:, None]
    img[ys, xs] = colours[0] * (1.0 - t) + colours[1] * t


# ------------------------------------------------------------------------------------------
# Scene composition
# ------------------------------------------------------------------------------------------
def _background(rng, size):
    """Textured background: gradient plus broad stripes or blobby noise, random hues."""
    c0 = _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9))
    c1 = _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * xx + np.sin(a) * yy) * 0.5 + 0.25
    if rng.random() < 0.5:
        b = rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.2)
        w = np.cos(b) * xx + np.sin(b) * yy
        t = t + 0.3 * np.sin(2 * np.pi * w / period)
    else:
        cells = int(rng.integers(4, 16))
        blobs = cv2.resize(rng.random((cells, cells)), (size, size), interpolation=cv2.INTER_CUBIC)
        t = t + 0.5 * (blobs - 0.5)
    t = np.clip(t, 0.0, 1.0)[..., None]
    return c0 * (1.0 - t) + c1 * t


def _fill_mask(polys, shape, offset=(0, 0)):
    """Rasterise float polygons (sub-pixel precise) into a uint8 mask."""
    mask = np.zeros(shape, dtype=np.uint8)
    pts = [np.round((p - offset) * 16).astype(np.int32) for p in polys]
    cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    return mask


def _draw_distractor(img, label, rng):
    """An unannotated textured shape; it hides whatever it is drawn over."""
    size = img.shape[0]
    r = size * rng.uniform(0.05, 0.14)
    centre = rng.uniform(0, size, 2)
    shape = ("circle", "rect", "triangle", "blob")[rng.integers(4)]
    if shape == "circle":
        pts = _ellipse(0, 0, r, r * rng.uniform(0.5, 1.0))
    elif shape == "rect":
        pts = _rect(0, 0, 2 * r, 2 * r * rng.uniform(0.3, 1.0))
    elif shape == "triangle":
        pts = _ellipse(0, 0, r, r, n=3)
    else:
        t = np.linspace(0, 2 * np.pi, 9, endpoint=False)
        rad = r * rng.uniform(0.5, 1.0, t.size)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    angle = rng.uniform(0, 360)
    ys, xs = np.nonzero(_fill_mask([_rotate(pts, angle) + centre], (size, size)))
    if ys.size == 0:
        return
    kind = _TEXTURE_KINDS[rng.integers(len(_TEXTURE_KINDS))]
    texture = (kind, int(rng.integers(2, 9)), rng.uniform(0, 180))
    colours = [_hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.95)) for _ in range(2)]
    _paint(img, ys, xs, xs.astype(np.float64), ys.astype(np.float64), texture, colours, rng)
    label[ys, xs] = 0


def _draw_object(img, label, inst, obj_idx, num_objects, rng):
    """Draw one object instance with a random similarity transform and flip.

    Writes `inst * _PART_SLOTS + local_part + 1` into `label` for the pixels it covers, so
    that objects drawn later occlude earlier ones in the annotations as in the image.
    """
    size = img.shape[0]
    name = TOYPARTS_OBJECT_CLASSES[obj_idx]
    part_names = TOYPARTS_OBJECT_PARTS[obj_idx]
    scale = size * rng.uniform(0.22, 0.38) / (1.0 + 0.2 * (num_objects - 1))
    angle = rng.uniform(-25, 25)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    centre = rng.uniform(0.6 * scale, size - 0.6 * scale, 2)

    polys = [(_rotate(pts * (flip, 1.0), angle) * scale + centre) for _, pts in _TEMPLATES[name]]
    allpts = np.concatenate(polys)
    x0, y0 = np.clip(np.floor(allpts.min(0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(allpts.max(0)).astype(int) + 1, 0, size)
    if x1 <= x0 or y1 <= y0:
        return
    local = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    for (part, _), pts in zip(_TEMPLATES[name], polys):
        mask = _fill_mask([pts], local.shape, offset=(x0, y0))
        local[mask > 0] = part_names.index(part) + 1

    # Pixel coordinates in the object's frame, so textures rotate and flip with it.
    ys, xs = np.nonzero(local)
    dx, dy = xs + x0 - centre[0], ys + y0 - centre[1]
    a = math.radians(angle)
    u = (math.cos(a) * dx + math.sin(a) * dy) * flip
    v = -math.sin(a) * dx + math.cos(a) * dy

    hue = rng.random()
    parts_at = local[ys, xs]
    for p, part in enumerate(part_names):
        sel = parts_at == p + 1
        if not sel.any():
            continue
        kind, period, tex_angle = _PART_TEXTURES[name][part]
        texture = (kind, period * rng.uniform(0.85, 1.2), tex_angle)
        _paint(img, ys[sel] + y0, xs[sel] + x0, u[sel], v[sel], texture, _part_colours(rng, hue), rng)
    label[ys + y0, xs + x0] = inst * _PART_SLOTS + parts_at


def _visible_objects(label, classes):
    """Per instance, the visible masks of its parts; tiny parts and objects are dropped."""
    objects = []
    for inst, obj_idx in enumerate(classes):
        first_part = TOYPARTS_PART_TO_OBJECT.index(obj_idx)
        parts = []
        for p in range(len(TOYPARTS_OBJECT_PARTS[obj_idx])):
            mask = label == inst * _PART_SLOTS + p + 1
            if mask.sum() >= MIN_PART_AREA:
                parts.append((first_part + p, mask))
        if not parts:
            continue
        obj_mask = np.logical_or.reduce([m for _, m in parts])
        if obj_mask.sum() >= MIN_OBJECT_AREA:
            objects.append({"category": obj_idx, "mask": obj_mask, "parts": parts})
    return objects


def render_image(rng, size, primary_class):
    """Render one scene.

    Returns:
        image (H, W, 3) uint8 RGB, and a list of visible objects, each a dict with
        "category" (object index), "mask" (bool HxW) and "parts" [(part index, mask)].
    """
    img = _background(rng, size)
    label = np.zeros((size, size), dtype=np.int32)
    num_objects = int(rng.integers(1, 4))
    num_objects_cls = len(TOYPARTS_OBJECT_CLASSES)
    classes = [
        primary_class if i == 0 or rng.random() < 0.6 else int(rng.integers(num_objects_cls))
        for i in range(num_objects)
    ]
    # Most distractors lie behind the objects; some occlude them.
    num_distractors = int(rng.integers(1, 5))
    in_front = rng.random(num_distractors) < 0.25
    for _ in range(int((~in_front).sum())):
        _draw_distractor(img, label, rng)
    for inst, obj_idx in enumerate(classes):
        _draw_object(img, label, inst, obj_idx, num_objects, rng)
    for _ in range(int(in_front.sum())):
        _draw_distractor(img, label, rng)

    img += rng.normal(0.0, 3.0, img.shape)  # sensor noise
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return image, _visible_objects(label, classes)


# ------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------
def _encode_mask(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_util.area(rle))
    bbox = [float(x) for x in mask_util.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle, area, bbox


def _image_rng(seed, split, index):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_IDS[split], index])))


def _categories():
    objects = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(TOYPARTS_OBJECT_CLASSES)]
    parts = [
        {"id": i + 1, "name": n, "supercategory": TOYPARTS_OBJECT_CLASSES[o]}
        for i, (n, o) in enumerate(zip(TOYPARTS_PART_CLASSES, TOYPARTS_PART_TO_OBJECT))
    ]
    return objects, parts


def _append_annotations(objects_json, parts_json, image_id, objects):
    for obj in objects:
        obj_id = len(objects_json["annotations"]) + 1
        rle, area, bbox = _encode_mask(obj["mask"])
        objects_json["annotations"].append(
            {
                "id": obj_id,
                "image_id": image_id,
                "category_id": obj["category"] + 1,
                "segmentation": rle,
                "area": area,
                "bbox": bbox,
                "iscrowd": 0,
                "object_id": obj_id,  # itself, so both views link parts and objects alike
            }
        )
        for part_idx, mask in obj["parts"]:
            rle, area, bbox = _encode_mask(mask)
            parts_json["annotations"].append(
                {
                    "id": len(parts_json["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": part_idx + 1,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                    "object_id": obj_id,
                }
            )


def _generate_split(out_dir, split, num_images, seed, image_size, progress):
    """Render and write the images of one split; return its (parts, objects) COCO dicts."""
    image_dir = os.path.join(out_dir, "images", split)
    for code in TOYPARTS_CLASS_CODES:
        os.makedirs(os.path.join(image_dir, code), exist_ok=True)
    info = {
        "description": "toyparts: synthetic part segmentation",
        "seed": seed,
        "image_size": image_size,
    }
    object_cats, part_cats = _categories()
    objects_json = {"info": info, "images": [], "annotations": [], "categories": object_cats}
    parts_json = {"info": info, "images": [], "annotations": [], "categories": part_cats}

    for index in tqdm(range(num_images), desc=f"toyparts {split}", disable=not progress):
        # Round-robin primary class: every class appears even in tiny splits.
        primary = index % len(TOYPARTS_OBJECT_CLASSES)
        code = TOYPARTS_CLASS_CODES[primary]
        image, objects = render_image(_image_rng(seed, split, index), image_size, primary)
        file_name = f"{code}/{code}_{index:05d}.JPEG"
        ok, jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok, file_name
        # no fsync per image (it doubled the generation time): one os.sync() before the split's annotations
        atomic_write_bytes(os.path.join(image_dir, file_name), jpeg.tobytes(), durable=False)

        entry = {"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size}
        objects_json["images"].append(entry)
        parts_json["images"].append(dict(entry))
        _append_annotations(objects_json, parts_json, index + 1, objects)
    return parts_json, objects_json


def generate_toyparts(out_dir, num_train, num_val, seed, image_size=256, progress=True):
    """Generate the toyparts dataset under `out_dir` in the PartImageNet layout.

    Writes images/{train,val}/<code>/<code>_<index>.JPEG, annotations/{split}.json (parts,
    with "object_id") and annotations/{split}_whole.json (objects). A split's annotation
    files are written after its images, so their presence marks a complete split. Output is
    byte-identical for identical arguments.

    Returns:
        dict: summary with per-split image/object/part counts and the elapsed seconds.
    """
    start = time.perf_counter()
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    summary = {"out_dir": out_dir, "seed": seed, "image_size": image_size}
    for split, num in (("train", num_train), ("val", num_val)):
        parts_json, objects_json = _generate_split(out_dir, split, num, seed, image_size, progress)
        os.sync()  # the images are on disk before the annotations that list them
        for suffix, content in (("", parts_json), ("_whole", objects_json)):
            path = os.path.join(ann_dir, f"{split}{suffix}.json")
            atomic_write_bytes(path, json.dumps(content).encode("utf-8"))
        summary[split] = {
            "images": num,
            "objects": len(objects_json["annotations"]),
            "parts": len(parts_json["annotations"]),
        }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
