"""The bad-input corpus: a tiny COCO-style part dataset, generated, and one corruption per case.

Every case is a folder ``<root>/<case>/`` with ``images/`` and ``parts.json`` (4 images of 48×48 px, one
object per image made of two parts) in which one thing is broken. Nothing here is committed as a binary:
the tests build the corpus in a temporary folder.
"""

import copy
import io
import json
import os

import numpy as np
from PIL import Image

SIZE = 48
NUM_IMAGES = 4
CATEGORIES = [{"id": 1, "name": "block left"}, {"id": 2, "name": "block right"}]


def _image(i, size=(SIZE, SIZE)):
    """A textured background with a coloured block (the object) whose halves differ (the parts)."""
    h, w = size
    rng = np.random.RandomState(i)
    arr = rng.randint(0, 60, (h, w, 3)).astype(np.uint8)
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 4, 3 * w // 4
    xm = (x0 + x1) // 2
    arr[y0:y1, x0:xm] = (200, 40 + 30 * i, 40)
    arr[y0:y1, xm:x1] = (40, 40 + 30 * i, 200)
    return arr


def _box_polygon(x0, y0, x1, y1):
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


def _annotations(image_id, ann_id, size=(SIZE, SIZE)):
    h, w = size
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 4, 3 * w // 4
    xm = (x0 + x1) // 2
    out = []
    for k, (a, b) in enumerate(((x0, xm), (xm, x1))):
        out.append(
            {
                "id": ann_id + k,
                "image_id": image_id,
                "category_id": k + 1,
                "iscrowd": 0,
                "segmentation": _box_polygon(a, y0, b, y1),
                "bbox": [float(a), float(y0), float(b - a), float(y1 - y0)],
                "area": float((b - a) * (y1 - y0)),
                "object_id": image_id,
            }
        )
    return out


def base_case(folder):
    """The clean dataset: returns its COCO dict (also written to ``folder/parts.json``)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": copy.deepcopy(CATEGORIES)}
    for i in range(NUM_IMAGES):
        name = f"img{i}.jpg"
        Image.fromarray(_image(i)).save(os.path.join(folder, "images", name), quality=95)
        coco["images"].append({"id": i + 1, "file_name": name, "height": SIZE, "width": SIZE})
        coco["annotations"] += _annotations(i + 1, 10 * (i + 1))
    write_json(folder, coco)
    return coco


def write_json(folder, coco):
    with open(os.path.join(folder, "parts.json"), "w") as f:
        json.dump(coco, f)


def _img(folder, i=1):
    return os.path.join(folder, "images", f"img{i}.jpg")


def _set_image(coco, i, name, height, width):
    rec = coco["images"][i]
    rec.update(file_name=name, height=height, width=width)


def _rle_of_size(h, w):
    from pycocotools import mask as mask_util

    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[h // 4 : h // 2, w // 4 : w // 2] = 1
    rle = mask_util.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------------
# Cases: name -> (description, mutate(folder, coco) -> None). ``coco`` is written after mutate.
# ---------------------------------------------------------------------------------------------------
def _truncated_jpeg(folder, coco):
    data = open(_img(folder), "rb").read()
    open(_img(folder), "wb").write(data[: len(data) // 2])


def _zero_bytes(folder, coco):
    open(_img(folder), "wb").close()


def _text_as_jpg(folder, coco):
    open(_img(folder), "w").write("this is not an image\n")


def _cmyk(folder, coco):
    Image.fromarray(_image(1)).convert("CMYK").save(_img(folder), quality=95)


def _gray16(folder, coco):
    arr = (_image(1).mean(axis=2) * 257).astype(np.uint16)  # the 8-bit picture, stretched to 16 bits
    Image.fromarray(arr).save(os.path.join(folder, "images", "img1.png"))
    _set_image(coco, 1, "img1.png", SIZE, SIZE)


def _rgba(folder, coco):
    arr = np.dstack([_image(1), np.full((SIZE, SIZE), 128, np.uint8)])
    Image.fromarray(arr, "RGBA").save(os.path.join(folder, "images", "img1.png"))
    _set_image(coco, 1, "img1.png", SIZE, SIZE)


def _exif_stored_rotated(h, w):
    """A JPEG stored as w×h (H×W) with EXIF orientation 6: it displays (and loads) as h×w."""
    arr = np.ascontiguousarray(np.rot90(_image(1, (h, w)), k=1))  # stored = displayed rotated 90° counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _exif_rotated_view(folder, coco):
    h, w = SIZE, SIZE * 3 // 2  # displayed 48x72; annotations drawn on the displayed view
    open(_img(folder), "wb").write(_exif_stored_rotated(h, w))
    _set_image(coco, 1, "img1.jpg", h, w)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2] + _annotations(2, 20, (h, w))


def _exif_stored_size_recorded(folder, coco):
    h, w = SIZE, SIZE * 3 // 2
    open(_img(folder), "wb").write(_exif_stored_rotated(h, w))
    _set_image(coco, 1, "img1.jpg", w, h)  # the stored (unrotated) size
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2] + _annotations(2, 20, (w, h))


def _one_pixel(folder, coco):
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(os.path.join(folder, "images", "img1.png"))
    _set_image(coco, 1, "img1.png", 1, 1)
    for a in coco["annotations"]:
        if a["image_id"] == 2:
            a["segmentation"], a["bbox"] = _box_polygon(0, 0, 1, 1), [0.0, 0.0, 1.0, 1.0]


def _extreme_aspect(folder, coco):
    h, w = 8, 400  # 50:1 (the probe used 4000x20)
    Image.fromarray(_image(1, (h, w))).save(os.path.join(folder, "images", "img1.png"))
    _set_image(coco, 1, "img1.png", h, w)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2] + _annotations(2, 20, (h, w))


def _missing_image(folder, coco):
    os.remove(_img(folder))


def _missing_image_folder(folder, coco):
    import shutil

    shutil.rmtree(os.path.join(folder, "images"))


def _size_mismatch(folder, coco):
    _set_image(coco, 1, "img1.jpg", SIZE * 2, SIZE * 2)


def _mask_size_mismatch(folder, coco):
    for a in coco["annotations"]:
        if a["image_id"] == 2:
            a["segmentation"] = _rle_of_size(SIZE * 2, SIZE * 2)  # RLE 96² on a 48² image


def _empty_masks(folder, coco):
    for a in coco["annotations"]:
        if a["image_id"] == 2:
            a["segmentation"] = {"size": [SIZE, SIZE], "counts": [SIZE * SIZE]}  # uncompressed RLE, all zero


def _masks_outside(folder, coco):
    for a in coco["annotations"]:
        if a["image_id"] == 2:
            a["segmentation"] = _box_polygon(SIZE + 10, SIZE + 10, SIZE + 20, SIZE + 20)


def _tiny_object(folder, coco):
    for a in coco["annotations"]:
        if a["image_id"] == 2:
            x = 10 + a["category_id"]
            a["segmentation"], a["bbox"] = _box_polygon(x, 10, x + 1, 11), [float(x), 10.0, 1.0, 1.0]


def _truncated_json(folder, coco):
    pass  # handled after writing (see make_case)


def _duplicate_ann_ids(folder, coco):
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]


def _unknown_category(folder, coco):
    coco["annotations"][2]["category_id"] = 7


def _no_segmentation(folder, coco):
    del coco["annotations"][3]["segmentation"]


def _annotation_without_image(folder, coco):
    extra = _annotations(99, 990)[0]
    coco["annotations"].append(extra)


def _nan_bbox(folder, coco):
    coco["annotations"][0]["bbox"] = [float("nan"), 1.0, 2.0, 3.0]


def _negative_bbox(folder, coco):
    coco["annotations"][0]["bbox"] = [1.0, 1.0, -5.0, 3.0]


DATA_CASES = {
    "clean": ("the clean dataset", None),
    "truncated_jpeg": ("JPEG cut in half", _truncated_jpeg),
    "zero_byte_file": ("0-byte .jpg", _zero_bytes),
    "text_named_jpg": ("a text file named .jpg", _text_as_jpg),
    "cmyk_jpeg": ("CMYK JPEG", _cmyk),
    "gray16_png": ("16-bit grayscale PNG", _gray16),
    "rgba_png": ("RGBA PNG (alpha 50 %)", _rgba),
    "exif6_rotated_view": ("EXIF orientation 6, size and annotations in the rotated view", _exif_rotated_view),
    "exif6_stored_view": ("EXIF orientation 6, size and annotations in the stored view", _exif_stored_size_recorded),
    "one_pixel_image": ("1×1 image", _one_pixel),
    "extreme_aspect": ("400×8 image (50:1)", _extreme_aspect),
    "missing_image": ("an image file missing", _missing_image),
    "missing_image_folder": ("the image folder missing", _missing_image_folder),
    "size_mismatch": ("recorded height/width ≠ image", _size_mismatch),
    "mask_size_mismatch": ("RLE 96² on a 48² image", _mask_size_mismatch),
    "empty_masks": ("an object whose part masks are empty", _empty_masks),
    "masks_outside_image": ("an object whose polygons lie outside the image", _masks_outside),
    "tiny_object": ("an object of 2 pixels (< K and < OBJECT_MIN_AREA_RATIO)", _tiny_object),
    "truncated_json": ("annotation JSON cut in half", _truncated_json),
    "duplicate_ann_ids": ("two annotations with one id", _duplicate_ann_ids),
    "unknown_category": ("category_id not in categories", _unknown_category),
    "no_segmentation": ("an annotation without segmentation", _no_segmentation),
    "annotation_without_image": ("an annotation whose image_id is no image", _annotation_without_image),
    "nan_bbox": ("NaN bbox", _nan_bbox),
    "negative_bbox": ("negative bbox width", _negative_bbox),
}


def make_case(root, case):
    """Build ``<root>/<case>`` and return ``(json_file, image_root)``."""
    folder = os.path.join(root, case)
    coco = base_case(folder)
    mutate = DATA_CASES[case][1]
    if mutate is not None:
        mutate(folder, coco)
    write_json(folder, coco)
    json_file = os.path.join(folder, "parts.json")
    if case == "truncated_json":
        data = open(json_file).read()
        open(json_file, "w").write(data[: len(data) // 2])
    return json_file, os.path.join(folder, "images")
