"""Pascal-Part, Cityscapes-Panoptic-Parts and PASCAL-Panoptic-Parts registrations on tiny fixtures.

The fixtures are written in the datasets' own formats: a Pascal-Part ``.mat`` with the original
``anno`` struct layout (scipy.io.savemat), and panoptic-parts label TIFFs encoded with the official
``panoptic_parts.encode_ids`` and saved as 32-bit integer images with PIL (what the package's
readers, ``np.array(Image.open(path), dtype=np.int32)``, expect).
"""

import logging
import os
import platform

import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.data.detection_utils import annotations_to_instances
from PIL import Image
from pycocotools import mask as mask_util

from part_distillation.data.datasets import panoptic_parts as ppd
from part_distillation.data.datasets import pascal_part as pascal
from part_distillation.data.validation import validate_dataset_dicts
from part_distillation.utils.compat import import_panoptic_parts
from part_distillation.utils.errors import DatasetNotFoundError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 20, 30

# The 50 merged part classes, as the reference code registers them.
SPEC_PASCAL_PARTS = (
    "body stern wing tail engine wheel seat handlebar chainwheel headlight head eye beak torso neck leg foot "
    "cap front side back roof mirror license_plate door window ear nose paw muzzle horn hoof eyebrow mouth hair "
    "arm hand pot plant locomotive locomotive_front locomotive_side locomotive_backside locomotive_roof "
    "coach_car coach_front coach_side coach_backside coach_roof screen"
).split()
SPEC_PASCAL_PARTS[SPEC_PASCAL_PARTS.index("license_plate")] = "license plate"


class CaptureLogs(logging.Handler):
    """Collect one logger's records directly (detectron2's setup_logger may stop propagation to root)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.logger, self.lines = logging.getLogger(name), []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self):
        return "\n".join(self.lines)

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def box(y0, y1, x0, x1, shape=(H, W)):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def decode(anno):
    segm = dict(anno["segmentation"])
    segm["counts"] = segm["counts"].encode("ascii")
    return mask_util.decode(segm).astype(bool)


def write_jpeg(path, height, width):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


@pytest.fixture
def d2_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    yield tmp_path
    monkeypatch.undo()
    # drop metadata that points into the temporary directory
    pascal.register_pascal_part()
    ppd.register_cityscapes_panoptic_parts()
    ppd.register_pascal_panoptic_parts()


# --------------------------------------------------------------------------------------------
# Pascal-Part
# --------------------------------------------------------------------------------------------


def _mat_objects(objects):
    """Objects as the original Pascal-Part struct array: class, class_ind, mask, parts(part_name, mask)."""
    arr = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, class_ind, mask, parts) in enumerate(objects):
        arr[0, i]["class"] = name
        arr[0, i]["class_ind"] = class_ind
        arr[0, i]["mask"] = mask.astype(np.uint8)
        if parts:
            p = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (part_name, part_mask) in enumerate(parts):
                p[0, j]["part_name"] = part_name
                p[0, j]["mask"] = part_mask.astype(np.uint8)
            arr[0, i]["parts"] = p
        else:
            arr[0, i]["parts"] = np.zeros((0, 0))  # what MATLAB's empty [] loads as
    return arr


PLANE_PARTS = {
    "body": box(3, 6, 3, 12),
    "lwing": box(1, 3, 4, 8),
    "rwing": box(6, 8, 4, 8),
    "engine_1": box(2, 3, 9, 10),
    "engine_2": box(6, 7, 9, 10),
}
PERSON_PARTS = {
    "head": box(10, 12, 20, 23),
    "hair": box(9, 10, 20, 23),
    "llarm": box(12, 16, 18, 19),
    "ruarm": box(12, 14, 24, 25),
    "zzz": box(18, 19, 20, 21),
}


def make_pascal_part(root):
    base = root / "pascal_part"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations_Part").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n2008_000003\n")
    (base / "ImageSets" / "Main" / "val.txt").write_text("2008_000004\n")
    images = {
        "2008_000001": [
            ("aeroplane", 1, box(1, 9, 2, 13), list(PLANE_PARTS.items())),
            ("boat", 4, box(12, 19, 1, 8), []),  # no parts: dropped
            ("person", 15, box(9, 19, 17, 26), list(PERSON_PARTS.items())),  # "zzz": unknown, dropped
            ("table", 11, box(0, 2, 20, 29), []),  # the .mat name of diningtable; no parts
        ],
        "2008_000002": [("chair", 9, box(2, 8, 2, 8), [])],  # no part-annotated object: image dropped
        # 2008_000003: listed but has no .mat (logged, skipped)
        "2008_000004": [
            (
                "cow",
                10,
                box(2, 18, 2, 28),
                [("lfuleg", box(14, 18, 3, 5)), ("rbuleg", box(14, 18, 20, 22)), ("lhorn", box(2, 3, 3, 4))],
            )
        ],
    }
    for image_id, objects in images.items():
        scipy.io.savemat(
            str(base / "Annotations_Part" / f"{image_id}.mat"),
            {"anno": {"imname": image_id, "objects": _mat_objects(objects)}},
        )
        write_jpeg(str(base / "JPEGImages" / f"{image_id}.jpg"), H, W)
    return base


def test_pascal_part_class_tables():
    assert list(pascal.PASCAL_PART_CLASSES) == SPEC_PASCAL_PARTS
    assert len(pascal.PASCAL_OBJECT_CLASSES) == 20
    wheel = pascal.PASCAL_PART_CLASSES.index("wheel")
    owners = {pascal.PASCAL_OBJECT_CLASSES[o] for o in pascal.PASCAL_PART_TO_OBJECTS[wheel]}
    assert owners == {"aeroplane", "bicycle", "bus", "car", "motorbike"}
    for o, parts in enumerate(pascal.PASCAL_OBJECT_TO_PARTS):
        for p in parts:
            assert o in pascal.PASCAL_PART_TO_OBJECTS[p]
    assert pascal.PASCAL_OBJECT_TO_PARTS[pascal.PASCAL_OBJECT_CLASSES.index("boat")] == []
    horse = pascal.PASCAL_PART_MERGE["horse"]
    assert horse["lfho"] == pascal.PASCAL_PART_CLASSES.index("hoof") and horse[
        "muzzle"
    ] == pascal.PASCAL_PART_CLASSES.index("muzzle")
    assert pascal.PASCAL_PART_MERGE["dog"]["muzzle"] == pascal.PASCAL_PART_CLASSES.index("muzzle")
    assert pascal.PASCAL_PART_MERGE["train"]["head"] == pascal.PASCAL_PART_CLASSES.index("locomotive")


def test_pascal_part_mat_reader(tmp_path):
    base = make_pascal_part(tmp_path)
    anno = pascal.read_pascal_part_mat(str(base / "Annotations_Part" / "2008_000001.mat"))
    assert anno["imname"] == "2008_000001"
    assert [o["class"] for o in anno["objects"]] == ["aeroplane", "boat", "person", "table"]
    assert [n for n, _ in anno["objects"][0]["parts"]] == list(PLANE_PARTS)
    assert anno["objects"][1]["parts"] == []
    np.testing.assert_array_equal(anno["objects"][0]["parts"][1][1], PLANE_PARTS["lwing"])


def test_pascal_part_registration(d2_root):
    make_pascal_part(d2_root)
    cls = pascal.PASCAL_PART_CLASSES.index
    with CaptureLogs("part_distillation.data.datasets.pascal_part") as logs:
        records = DatasetCatalog.get("pascal_part_train")
    assert "1 images without part-annotated objects" in logs.text
    assert "1 images without a .mat file" in logs.text and "2008_000003.mat" in logs.text
    assert "3 objects without parts" in logs.text and "1 parts with unknown names" in logs.text
    assert len(records) == 1
    r = records[0]
    assert r["file_name"] == os.path.join(str(d2_root), "pascal_part", "JPEGImages", "2008_000001.jpg")
    assert (r["image_id"], r["height"], r["width"]) == ("2008_000001", H, W)
    objects, parts = r["annotations"], r["part_annotations"]
    assert [o["category_id"] for o in objects] == [0, 14]  # aeroplane, person (VOC order)
    np.testing.assert_array_equal(decode(objects[0]), box(1, 9, 2, 13))
    assert objects[0]["bbox"] == [2.0, 1.0, 11.0, 8.0]
    by_obj = {}
    for p in parts:
        assert p["object_id"] == objects[p["object_index"]]["id"]
        by_obj.setdefault(p["object_index"], {})[p["category_id"]] = decode(p)
    assert sorted(by_obj[0]) == sorted([cls("body"), cls("wing"), cls("engine")])
    np.testing.assert_array_equal(by_obj[0][cls("wing")], PLANE_PARTS["lwing"] | PLANE_PARTS["rwing"])
    np.testing.assert_array_equal(by_obj[0][cls("engine")], PLANE_PARTS["engine_1"] | PLANE_PARTS["engine_2"])
    assert sorted(by_obj[1]) == sorted([cls("head"), cls("hair"), cls("arm")])
    np.testing.assert_array_equal(by_obj[1][cls("arm")], PERSON_PARTS["llarm"] | PERSON_PARTS["ruarm"])
    assert len({a["id"] for a in objects + parts}) == len(objects) + len(parts)

    meta = MetadataCatalog.get("pascal_part_train")
    assert meta.thing_classes == list(pascal.PASCAL_OBJECT_CLASSES) and meta.evaluator_type == "coco"
    assert meta.part_classes == SPEC_PASCAL_PARTS and meta.dataset_root == str(d2_root / "pascal_part")
    assert meta.object_to_parts[0] == sorted(cls(n) for n in ("body", "stern", "wing", "tail", "engine", "wheel"))

    # parts view: same parts as annotations, objects beside them
    part_records = DatasetCatalog.get("pascal_part_parts_train")
    pr = part_records[0]
    assert [a["category_id"] for a in pr["annotations"]] == [p["category_id"] for p in parts]
    assert [o["category_id"] for o in pr["object_annotations"]] == [0, 14]
    pmeta = MetadataCatalog.get("pascal_part_parts_train")
    assert pmeta.thing_classes == SPEC_PASCAL_PARTS and pmeta.is_part_dataset

    val = DatasetCatalog.get("pascal_part_val")
    assert [o["category_id"] for o in val[0]["annotations"]] == [9]  # cow
    assert sorted(p["category_id"] for p in val[0]["part_annotations"]) == sorted([cls("leg"), cls("horn")])

    # the records pass the validator (images included) and what detectron2 does with them
    for name, recs in (("pascal_part_train", records), ("pascal_part_parts_train", part_records)):
        assert validate_dataset_dicts(recs, MetadataCatalog.get(name)) == []
        coco = convert_to_coco_dict(name)  # what COCOEvaluator builds when there is no json_file
        assert len(coco["annotations"]) == len(recs[0]["annotations"]) and coco["annotations"][0]["area"] > 0
        instances = annotations_to_instances(recs[0]["annotations"], (H, W), mask_format="bitmask")
        assert instances.gt_masks.tensor.shape == (len(recs[0]["annotations"]), H, W)


def test_pascal_part_unmerged(d2_root):
    make_pascal_part(d2_root)
    pascal.register_pascal_part(merge_parts=False)
    parts = DatasetCatalog.get("pascal_part_train")[0]["part_annotations"]
    wing = pascal.PASCAL_PART_CLASSES.index("wing")
    assert sum(p["category_id"] == wing and p["object_index"] == 0 for p in parts) == 2
    assert MetadataCatalog.get("pascal_part_train").merged_parts is False


def test_pascal_part_missing_files(d2_root):
    with pytest.raises(DatasetNotFoundError, match="pascal_part.*README.md#pascal-part"):
        DatasetCatalog.get("pascal_part_val")
    base = make_pascal_part(d2_root)
    os.remove(base / "ImageSets" / "Main" / "val.txt")
    with pytest.raises(DatasetNotFoundError, match="val.txt"):
        DatasetCatalog.get("pascal_part_val")


# --------------------------------------------------------------------------------------------
# Panoptic parts
# --------------------------------------------------------------------------------------------


def test_import_panoptic_parts_restores_platform():
    real = platform.python_version()
    pp = import_panoptic_parts()
    assert platform.python_version() == real
    assert hasattr(pp, "decode_uids") and hasattr(pp, "encode_ids")


def write_label(path, sids, iids, pids):
    """Encode with the official encode_ids; save as PIL writes int32 arrays (mode "I" TIFF)."""
    pp = import_panoptic_parts()
    uids = pp.encode_ids(sids.astype(np.int32), iids.astype(np.int32), pids.astype(np.int32))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(uids.astype(np.int32)).save(path)
    # check the round trip through the file with the package's own reader convention
    back = np.array(Image.open(path), dtype=np.int32)
    np.testing.assert_array_equal(back, uids)
    decoded = pp.decode_uids(back)
    np.testing.assert_array_equal(decoded[0], sids)
    return uids


class Canvas:
    """sids / iids / pids layers, filled region by region (everything else: `background` sid)."""

    def __init__(self, background):
        self.sids = np.full((H, W), background, np.int32)
        self.iids = np.full((H, W), -1, np.int32)
        self.pids = np.full((H, W), -1, np.int32)

    def put(self, mask, sid, iid=-1, pid=-1):
        self.sids[mask], self.iids[mask], self.pids[mask] = sid, iid, pid
        return mask


def make_cityscapes(root):
    spec = ppd.dataset_spec("cityscapes")
    sid = spec.sid_from_scene_class
    base = root / "cityscapes"
    truth = {}
    c = Canvas(sid("road"))
    person = c.put(box(2, 12, 2, 8), sid("person"), 1, 1)  # torso ...
    head = c.put(box(2, 4, 3, 7), sid("person"), 1, 2)
    c.put(box(11, 12, 2, 8), sid("person"), 1, 0)  # void part pixels: object, but no part
    car = c.put(box(4, 14, 12, 26), sid("car"), 2, 5)  # chassis ...
    wheel = c.put(box(12, 14, 13, 16), sid("car"), 2, 2) | c.put(box(12, 14, 22, 25), sid("car"), 2, 2)
    c.put(box(15, 19, 2, 6), sid("rider"), 3, -1)  # rider without part labels: dropped
    c.put(box(15, 19, 8, 12), sid("bicycle"), 1, -1)  # not a part-annotated class
    c.put(box(15, 19, 14, 18), sid("truck"), -1, -1)  # crowd (no instance id): not an object
    truth["person"], truth["head"], truth["car"], truth["wheel"] = person, head, car, wheel
    write_label(
        str(base / "gtFinePanopticParts/train/aachen/aachen_000000_000019_gtFinePanopticParts.tif"),
        c.sids,
        c.iids,
        c.pids,
    )
    write_jpeg(str(base / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"), H, W)
    c2 = Canvas(sid("road"))
    write_label(
        str(base / "gtFinePanopticParts/train/bonn/bonn_000000_000001_gtFinePanopticParts.tif"),
        c2.sids,
        c2.iids,
        c2.pids,
    )
    c3 = Canvas(sid("sky"))
    truth["bus_window"] = c3.put(box(5, 8, 5, 10), sid("bus"), 1, 1)
    c3.put(box(8, 15, 5, 25), sid("bus"), 1, 5)
    write_label(
        str(base / "gtFinePanopticParts/val/lindau/lindau_000000_000019_gtFinePanopticParts.tif"),
        c3.sids,
        c3.iids,
        c3.pids,
    )
    write_jpeg(str(base / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"), H, W)
    (base / "leftImg8bit/train/bonn").mkdir(parents=True, exist_ok=True)
    return truth


def test_cityscapes_part_classes_match_package_spec():
    spec = ppd.dataset_spec("cityscapes")
    names = [
        f"{o}-{p}"
        for o in ppd.CITYSCAPES_OBJECT_CLASSES
        for p in spec.part_classes_from_scene_class(o)
        if p != "UNLABELED"
    ]
    assert names == list(ppd.CITYSCAPES_PART_CLASSES) and len(names) == 23
    assert [
        ppd.CITYSCAPES_PART_CLASSES.index(n)
        for n in ("person-torso", "rider-torso", "car-window", "truck-window", "bus-window")
    ] == list(ppd.CITYSCAPES_PART_BASE_ID)
    assert ppd.CITYSCAPES_PART_TO_OBJECT[:9] == [0, 0, 0, 0, 1, 1, 1, 1, 2]


def test_cityscapes_panoptic_parts_registration(d2_root):
    truth = make_cityscapes(d2_root)
    with CaptureLogs("part_distillation.data.datasets.panoptic_parts") as logs:
        records = DatasetCatalog.get("cityscapes_panoptic_parts_train")
    assert "1 images without part-annotated objects" in logs.text and "1 objects without parts" in logs.text
    assert len(records) == 1
    r = records[0]
    assert r["file_name"].endswith(
        os.path.join("leftImg8bit", "train", "aachen", "aachen_000000_000019_leftImg8bit.png")
    )
    assert (r["image_id"], r["height"], r["width"]) == ("aachen_000000_000019", H, W)
    objects, parts = r["annotations"], r["part_annotations"]
    assert [o["category_id"] for o in objects] == [0, 2]  # person, car
    np.testing.assert_array_equal(decode(objects[0]), truth["person"])
    np.testing.assert_array_equal(decode(objects[1]), truth["car"])
    got = {(p["object_index"], ppd.CITYSCAPES_PART_CLASSES[p["category_id"]]): decode(p) for p in parts}
    assert sorted(got) == [(0, "person-head"), (0, "person-torso"), (1, "car-chassis"), (1, "car-wheel")]
    np.testing.assert_array_equal(got[(0, "person-head")], truth["head"])
    np.testing.assert_array_equal(got[(1, "car-wheel")], truth["wheel"])
    torso = truth["person"] & ~truth["head"] & ~box(11, 12, 2, 8)  # void part pixels excluded
    np.testing.assert_array_equal(got[(0, "person-torso")], torso)
    meta = MetadataCatalog.get("cityscapes_panoptic_parts_train")
    assert meta.thing_classes == list(ppd.CITYSCAPES_OBJECT_CLASSES) and meta.evaluator_type == "coco"
    assert meta.part_classes == list(ppd.CITYSCAPES_PART_CLASSES)

    val_parts = DatasetCatalog.get("cityscapes_panoptic_parts_parts_val")
    assert [ppd.CITYSCAPES_PART_CLASSES[a["category_id"]] for a in val_parts[0]["annotations"]] == [
        "bus-window",
        "bus-chassis",
    ]
    np.testing.assert_array_equal(decode(val_parts[0]["annotations"][0]), truth["bus_window"])
    assert [o["category_id"] for o in val_parts[0]["object_annotations"]] == [4]
    assert MetadataCatalog.get("cityscapes_panoptic_parts_parts_val").thing_classes == list(ppd.CITYSCAPES_PART_CLASSES)
    assert validate_dataset_dicts(records, MetadataCatalog.get("cityscapes_panoptic_parts_train")) == []


def make_pascal_panoptic(root):
    spec = ppd.dataset_spec("pascal")
    sid = spec.sid_from_scene_class
    base = root / "pascal_panoptic_parts"
    truth = {}
    c = Canvas(0)
    c.put(box(0, 3, 0, W), sid("sky"))
    plane = c.put(box(3, 10, 2, 14), sid("aeroplane"), 1, 1)  # body
    lwing = c.put(box(3, 5, 4, 8), sid("aeroplane"), 1, 3)
    rwing = c.put(box(8, 10, 4, 8), sid("aeroplane"), 1, 4)
    engines = c.put(box(5, 6, 10, 11), sid("aeroplane"), 1, 6) | c.put(
        box(7, 8, 10, 11), sid("aeroplane"), 1, 7
    )  # 2 engine instances
    tv = c.put(box(12, 19, 2, 10), sid("tvmonitor"), 1, 2)  # frame: no merged class
    screen = c.put(box(13, 18, 3, 9), sid("tvmonitor"), 1, 1)
    bus = c.put(box(4, 16, 16, 29), sid("bus"), 2, 2)  # leftside
    windows = c.put(box(5, 7, 17, 20), sid("bus"), 2, 40) | c.put(box(5, 7, 22, 25), sid("bus"), 2, 41)
    plate = c.put(box(14, 15, 20, 23), sid("bus"), 2, 8)  # fliplate
    c.put(box(17, 20, 16, 20), sid("person"), 1, -1)  # person without part labels: dropped
    truth.update(
        plane=plane, wing=lwing | rwing, engine=engines, tv=tv, screen=screen, bus=bus, window=windows, plate=plate
    )
    write_label(str(base / "labels/training/2008_000010.tif"), c.sids, c.iids, c.pids)
    write_jpeg(str(base / "images/2008_000010.jpg"), H, W)
    v = Canvas(0)
    truth["cat"] = v.put(box(2, 18, 2, 20), sid("cat"), 1, 7)  # torso
    truth["paws"] = v.put(box(16, 18, 3, 5), sid("cat"), 1, 10) | v.put(
        box(16, 18, 12, 14), sid("cat"), 1, 16
    )  # lfpa, rbpa
    write_label(str(base / "labels/validation/2009_000020.tif"), v.sids, v.iids, v.pids)
    write_jpeg(str(base / "images/2009_000020.jpg"), H, W)
    return truth


def test_pascal_panoptic_parts_registration(d2_root):
    truth = make_pascal_panoptic(d2_root)
    cls = pascal.PASCAL_PART_CLASSES.index
    with CaptureLogs("part_distillation.data.datasets.panoptic_parts") as logs:
        records = DatasetCatalog.get("pascal_panoptic_parts_train")
    assert "1 objects without parts" in logs.text and "1 part segments without a merged class" in logs.text
    assert len(records) == 1
    r = records[0]
    assert r["file_name"] == os.path.join(str(d2_root), "pascal_panoptic_parts", "images", "2008_000010.jpg")
    objects, parts = r["annotations"], r["part_annotations"]
    voc = pascal.PASCAL_OBJECT_CLASSES.index
    assert [o["category_id"] for o in objects] == [voc("aeroplane"), voc("bus"), voc("tvmonitor")]  # sid order
    np.testing.assert_array_equal(decode(objects[2]), truth["tv"])
    got = {(p["object_index"], p["category_id"]): decode(p) for p in parts}
    assert sorted(got) == sorted(
        [
            (0, cls("body")),
            (0, cls("wing")),
            (0, cls("engine")),
            (1, cls("side")),
            (1, cls("window")),
            (1, cls("license plate")),
            (2, cls("screen")),
        ]
    )
    np.testing.assert_array_equal(got[(0, cls("wing"))], truth["wing"])
    np.testing.assert_array_equal(got[(0, cls("engine"))], truth["engine"])  # part instances folded by the spec
    np.testing.assert_array_equal(got[(1, cls("window"))], truth["window"])
    np.testing.assert_array_equal(got[(1, cls("license plate"))], truth["plate"])
    np.testing.assert_array_equal(got[(2, cls("screen"))], truth["screen"])
    meta = MetadataCatalog.get("pascal_panoptic_parts_train")
    assert meta.part_classes == SPEC_PASCAL_PARTS and meta.thing_classes == list(pascal.PASCAL_OBJECT_CLASSES)
    assert meta.label_root == str(d2_root / "pascal_panoptic_parts" / "labels" / "training")

    val = DatasetCatalog.get("pascal_panoptic_parts_parts_val")
    assert sorted(a["category_id"] for a in val[0]["annotations"]) == sorted([cls("torso"), cls("paw")])
    paw = next(a for a in val[0]["annotations"] if a["category_id"] == cls("paw"))
    np.testing.assert_array_equal(decode(paw), truth["paws"])
    assert validate_dataset_dicts(records, meta) == []


def test_panoptic_parts_missing_files(d2_root):
    with pytest.raises(DatasetNotFoundError, match="cityscapes.*README.md#cityscapes-panoptic-parts"):
        DatasetCatalog.get("cityscapes_panoptic_parts_val")
    (d2_root / "pascal_panoptic_parts" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="labels/validation.*README.md#pascal-panoptic-parts"):
        DatasetCatalog.get("pascal_panoptic_parts_val")
