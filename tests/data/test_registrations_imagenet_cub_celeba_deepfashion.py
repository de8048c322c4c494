"""Lazy registrations of PartImageNet (+ Seg), CUB-200-2011, CelebA/MAFL, DeepFashion and ImageNet
folders: each test writes a tiny fixture in the dataset's on-disk format, points
$DETECTRON2_DATASETS at it and loads it through DatasetCatalog; plus the manifest tool."""

import builtins
import inspect
import json
import logging
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image
from pycocotools import mask as mask_util

from part_distillation.data.datasets import (
    celeba,
    cub,
    deepfashion,
    imagenet,
    part_imagenet,
    partimagenet_seg,
)
from part_distillation.utils.errors import DatasetNotFoundError, UserError

PARTS = part_imagenet.PART_IMAGENET_PART_CLASSES
OBJECTS = part_imagenet.PART_IMAGENET_OBJECT_CLASSES

ALL_NAMES = [
    *(f"part_imagenet_parts_{s}" for s in ("train", "val", "test")),
    *(f"part_imagenet_{s}" for s in ("train", "val", "test")),
    *(f"partimagenet_seg_{s}" for s in ("train", "val", "test")),
    "cub_train",
    "cub_test",
    "celeba_train",
    "celeba_test",
    "mafl_train",
    "mafl_test",
    "celeba_wild_train",
    "mafl_wild_train",
    "mafl_wild_test",
    "deepfashion_train",
    "deepfashion_test",
    "imagenet_1k_train",
    "imagenet_21k_train",
]

REGISTER = [
    part_imagenet.register_part_imagenet,
    partimagenet_seg.register_partimagenet_seg,
    cub.register_cub,
    celeba.register_celeba,
    deepfashion.register_deepfashion,
    lambda: [imagenet.register_imagenet(v) for v in ("1k", "21k")],
]


@pytest.fixture
def d2root(tmp_path, monkeypatch):
    """An empty $DETECTRON2_DATASETS; registrations are restored afterwards (metadata synced at load
    time would otherwise keep pointing into tmp_path)."""
    root = tmp_path / "d2"
    root.mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    yield root
    monkeypatch.undo()
    for register in REGISTER:
        register()


def _jpeg(path, size=(32, 32), color=(120, 60, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


# ----------------------------------------------------------------------------- PartImageNet


def _square(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _pin_categories(names=PARTS):
    return [{"id": i, "name": n, "supercategory": n.split(" ")[0]} for i, n in enumerate(names)]


def _write_part_imagenet(root):
    pin = root / "part_imagenet"
    car_tire = np.zeros((32, 32), np.uint8)
    car_tire[20:28, 4:12] = 1
    rle = mask_util.encode(np.asfortranarray(car_tire))
    rle["counts"] = rle["counts"].decode("ascii")
    train = {
        "categories": _pin_categories(),
        "images": [
            {"id": 0, "file_name": "n01440764_1.JPEG", "height": 32, "width": 32},
            {"id": 1, "file_name": "n01440764_2.JPEG", "height": 32, "width": 32},
            {"id": 2, "file_name": "n02814533_3.JPEG", "height": 32, "width": 32},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 0,
                "category_id": 0,
                "iscrowd": 0,
                "bbox": [2, 2, 8, 8],
                "segmentation": [_square(2, 2, 10, 10)],
                "area": 64,
            },
            {
                "id": 11,
                "image_id": 0,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10, 10, 20, 20],
                "segmentation": [_square(10, 10, 30, 30)],
                "area": 400,
            },
            {
                "id": 12,
                "image_id": 2,
                "category_id": 24,
                "iscrowd": 0,
                "bbox": [4, 4, 24, 16],
                "segmentation": [_square(4, 4, 28, 20)],
                "area": 384,
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 25,
                "iscrowd": 0,
                "bbox": [4, 20, 8, 8],
                "segmentation": rle,
                "area": 64,
            },
        ],
    }
    _json(str(pin / "annotations" / "train.json"), train)
    for image in train["images"]:  # train: per-wnid sub-folders
        name = image["file_name"]
        _jpeg(str(pin / "images" / "train" / name.split("_")[0] / name))
    val = {
        "categories": _pin_categories(),
        "images": [{"id": 0, "file_name": "n03000000_5.JPEG", "height": 32, "width": 32}],
        "annotations": [
            {
                "id": 0,
                "image_id": 0,
                "category_id": 39,
                "iscrowd": 0,
                "bbox": [0, 0, 16, 32],
                "segmentation": [_square(0, 0, 16, 32)],
                "area": 512,
            },
        ],
    }
    _json(str(pin / "annotations" / "val" / "val.json"), val)  # the release's nested layout
    _jpeg(str(pin / "images" / "val" / "n03000000_5.JPEG"))  # val: flat
    return pin


def _bitmask(segmentation, h=32, w=32):
    if isinstance(segmentation, list):
        return polygons_to_bitmask(segmentation, h, w)
    return mask_util.decode(segmentation).astype(bool)


def test_part_imagenet_parts_view(d2root):
    pin = _write_part_imagenet(d2root)
    records = DatasetCatalog.get("part_imagenet_parts_train")
    meta = MetadataCatalog.get("part_imagenet_parts_train")
    assert meta.thing_classes == PARTS and len(PARTS) == 40
    assert PARTS[25] == "Car Tier" and PARTS[35] == "Aeroplane Engine" and PARTS[38] == "Bottle Mouth"
    assert meta.part_to_object[25] == OBJECTS.index("Car") and meta.object_classes == OBJECTS
    assert meta.json_file == str(pin / "annotations" / "train.json") and meta.evaluator_type == "coco"
    assert meta.class_codes == ["n01440764", "n02814533"]
    assert [r["image_id"] for r in records] == [0, 1, 2]
    assert records[0]["file_name"] == str(pin / "images" / "train" / "n01440764" / "n01440764_1.JPEG")
    assert all(os.path.isfile(r["file_name"]) for r in records)
    assert [r["class_code"] for r in records] == ["n01440764", "n01440764", "n02814533"]
    annos = records[0]["annotations"]
    assert [a["category_id"] for a in annos] == [0, 1] and [a["part_id"] for a in annos] == [10, 11]
    assert all(a["object_id"] == 0 and a["bbox_mode"] == BoxMode.XYWH_ABS for a in annos)
    assert [a["category_id"] for a in records[2]["annotations"]] == [24, 25]
    assert records[1]["annotations"] == []

    val = DatasetCatalog.get("part_imagenet_parts_val")  # nested JSON, flat image folder
    assert MetadataCatalog.get("part_imagenet_parts_val").json_file == str(pin / "annotations" / "val" / "val.json")
    assert val[0]["file_name"] == str(pin / "images" / "val" / "n03000000_5.JPEG")


def test_part_imagenet_object_view(d2root):
    _write_part_imagenet(d2root)
    records = DatasetCatalog.get("part_imagenet_train")
    meta = MetadataCatalog.get("part_imagenet_train")
    assert meta.thing_classes == OBJECTS and len(OBJECTS) == 11
    assert not hasattr(meta, "json_file") and meta.parts_json_file.endswith("train.json")
    assert meta.class_codes == ["n01440764", "n02814533"]

    (quadruped,) = records[0]["annotations"]
    assert quadruped["category_id"] == OBJECTS.index("Quadruped") and quadruped["object_id"] == 0
    assert quadruped["bbox"] == [2.0, 2.0, 28.0, 28.0] and quadruped["class_code_id"] == 0
    expected = polygons_to_bitmask([_square(2, 2, 10, 10)], 32, 32) | polygons_to_bitmask(
        [_square(10, 10, 30, 30)], 32, 32
    )
    assert (_bitmask(quadruped["segmentation"]) == expected).all()
    assert records[1]["annotations"] == []  # no parts, no object

    (car,) = records[2]["annotations"]  # a polygon part and an RLE part → an RLE union
    assert car["category_id"] == OBJECTS.index("Car") and car["class_code_id"] == 1
    tire = np.zeros((32, 32), bool)
    tire[20:28, 4:12] = True
    union = polygons_to_bitmask([_square(4, 4, 28, 20)], 32, 32) | tire
    assert (_bitmask(car["segmentation"]) == union).all()
    assert car["bbox"] == [4.0, 4.0, 24.0, 24.0]
    # The records feed detectron2's standard instance conversion.
    instances = annotations_to_instances(records[2]["annotations"], (32, 32), mask_format="bitmask")
    assert instances.gt_classes.tolist() == [OBJECTS.index("Car")]
    assert (instances.gt_masks.tensor[0].numpy() == union).all()

    (bottle,) = DatasetCatalog.get("part_imagenet_val")[0]["annotations"]
    assert bottle["category_id"] == OBJECTS.index("Bottle")


def test_part_imagenet_errors(d2root):
    pin = _write_part_imagenet(d2root)
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get("part_imagenet_test")
    assert str(pin / "annotations" / "test.json") in str(e.value) and "datasets/README.md#partimagenet" in str(e.value)

    renamed = json.loads((pin / "annotations" / "train.json").read_text())
    renamed["categories"][3]["name"] = "Quadruped Leg"
    _json(str(pin / "annotations" / "test.json"), renamed)
    with pytest.raises(UserError, match="not the 40 official"):
        DatasetCatalog.get("part_imagenet_parts_test")

    os.remove(pin / "images" / "val" / "n03000000_5.JPEG")
    with pytest.raises(DatasetNotFoundError, match="n03000000_5.JPEG"):
        DatasetCatalog.get("part_imagenet_parts_val")


def test_part_imagenet_explicit_image_root(d2root, tmp_path):
    pin = _write_part_imagenet(d2root)
    part_imagenet.register_part_imagenet(root=str(pin), image_root=str(pin / "images" / "train"))
    records = DatasetCatalog.get("part_imagenet_parts_train")
    assert records[2]["file_name"] == str(pin / "images" / "train" / "n02814533" / "n02814533_3.JPEG")
    assert MetadataCatalog.get("part_imagenet_parts_val").image_root == str(pin / "images" / "train")


# ----------------------------------------------------------------------------- PartImageNet-Seg


def test_partimagenet_seg(d2root):
    base = d2root / "PartImageNet_Seg" / "PartImageNet"  # as the release zip extracts
    labels = np.full((32, 32), 40, np.uint8)
    labels[4:12, 4:20] = 3
    labels[20:30, 0:8] = 0
    labels[0, 0] = 255
    for stem in ("n01440764_7", "n01440764_2"):
        _jpeg(str(base / "images" / "train" / f"{stem}.JPEG"))
        _png(str(base / "annotations" / "train" / f"{stem}.png"), labels)
        _png(
            str(base / "annotations" / "train_whole" / f"{stem}.png"),
            np.full((32, 32), 158, np.uint8),
        )
    _json(str(base / "annotations" / "train" / "train.json"), {"images": []})  # ignored
    _jpeg(str(base / "images" / "val" / "n02000000" / "n02000000_1.jpg"))
    _png(str(base / "annotations" / "val" / "n02000000_1.png"), labels)

    records = DatasetCatalog.get("partimagenet_seg_train")
    meta = MetadataCatalog.get("partimagenet_seg_train")
    assert [r["image_id"] for r in records] == ["n01440764_2", "n01440764_7"]
    assert records[0]["file_name"] == str(base / "images" / "train" / "n01440764_2.JPEG")
    assert records[0]["class_code"] == "n01440764"
    assert os.path.isfile(records[0]["object_sem_seg_file_name"])
    decoded = np.asarray(Image.open(records[1]["sem_seg_file_name"]))
    assert (decoded == labels).all()
    assert meta.stuff_classes[:40] == PARTS and meta.stuff_classes[40] == "background"
    assert meta.background_label == 40 and meta.ignore_label == 255 and meta.evaluator_type == "part_nmi_ari"
    assert meta.sem_seg_root == str(base / "annotations" / "train")

    (val,) = DatasetCatalog.get("partimagenet_seg_val")  # per-wnid image folder, .jpg
    assert val["file_name"] == str(base / "images" / "val" / "n02000000" / "n02000000_1.jpg")
    assert "object_sem_seg_file_name" not in val

    with pytest.raises(DatasetNotFoundError, match="annotations/test"):
        DatasetCatalog.get("partimagenet_seg_test")


# ----------------------------------------------------------------------------- CUB-200-2011


def _write_cub(root):
    cub_root = root / "CUB_200_2011"
    images = {
        1: "001.Black_footed_Albatross/A_1.jpg",
        2: "001.Black_footed_Albatross/A_2.jpg",
        3: "002.Laysan_Albatross/B_3.jpg",
    }
    _text(str(cub_root / "images.txt"), [f"{i} {p}" for i, p in images.items()])
    _text(str(cub_root / "train_test_split.txt"), ["1 1", "2 0", "3 1"])
    _text(
        str(cub_root / "bounding_boxes.txt"),
        ["1 1.0 2.0 20.0 25.0", "2 0.0 0.0 32.0 32.0", "3 3.5 4.0 10.0 12.0"],
    )
    _text(str(cub_root / "image_class_labels.txt"), ["1 1", "2 1", "3 2"])
    _text(str(cub_root / "classes.txt"), ["1 001.Black_footed_Albatross", "2 002.Laysan_Albatross"])
    _text(
        str(cub_root / "parts" / "parts.txt"),
        [f"{i + 1} {n}" for i, n in enumerate(cub.CUB_KEYPOINT_NAMES)],
    )
    locs = []
    for image_id in images:
        for part in range(1, 16):
            visible = (part + image_id) % 3 != 0
            x, y = (float(part + image_id), float(2 * part)) if visible else (0.0, 0.0)
            locs.append(f"{image_id} {part} {x} {y} {int(visible)}")
    _text(str(cub_root / "parts" / "part_locs.txt"), locs)
    for image_id, rel in images.items():
        _jpeg(str(cub_root / "images" / rel))
        mask = np.zeros((32, 32), np.uint8)
        mask[image_id : 20 + image_id, 5:25] = 255
        mask[0, 0] = 128  # soft values are kept as they are
        _png(str(root / "segmentations" / rel.replace(".jpg", ".png")), mask)  # next to CUB_200_2011/
    return cub_root


def test_cub(d2root):
    cub_root = _write_cub(d2root)
    train = DatasetCatalog.get("cub_train")
    meta = MetadataCatalog.get("cub_train")
    assert [r["image_id"] for r in train] == [1, 3]
    assert [r["image_id"] for r in DatasetCatalog.get("cub_test")] == [2]
    assert meta.keypoint_names == cub.CUB_KEYPOINT_NAMES and meta.evaluator_type == "part_keypoints"
    assert ("left wing", "right wing") in meta.keypoint_flip_map and meta.thing_classes == ["bird"]
    assert meta.species == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]

    rec = train[1]
    assert rec["file_name"] == str(cub_root / "images" / "002.Laysan_Albatross" / "B_3.jpg") and os.path.isfile(
        rec["file_name"]
    )
    assert rec["class_id"] == 1 and rec["class_code"] == "002.Laysan_Albatross"
    assert rec["bbox"] == [3.5, 4.0, 10.0, 12.0] and rec["bbox_mode"] == BoxMode.XYWH_ABS
    assert len(rec["keypoints"]) == 15
    assert rec["keypoints"][0] == [4.0, 2.0, 1]  # part 1: (1 + 3) % 3 != 0 → visible at (4, 2)
    assert rec["keypoints"][2] == [0.0, 0.0, 0]  # part 3: (3 + 3) % 3 == 0 → not visible
    (anno,) = rec["annotations"]
    assert anno["keypoints"][:9] == [4.0, 2.0, 2, 5.0, 4.0, 2, 0.0, 0.0, 0] and anno["category_id"] == 0
    mask = np.asarray(Image.open(rec["fg_mask_file"]))
    assert mask[0, 0] == 128 and mask[3:23, 5:25].min() == 255 and mask.sum() == 255 * 400 + 128
    assert "height" not in rec  # filled by the mapper's check_image_size


def test_cub_errors(d2root, caplog):
    cub_root = _write_cub(d2root)
    os.remove(cub_root / "parts" / "part_locs.txt")
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get("cub_train")
    assert str(cub_root / "parts" / "part_locs.txt") in str(e.value) and "#cub-200-2011" in str(e.value)

    cub_root = _write_cub(d2root)
    os.rename(d2root / "segmentations", d2root / "elsewhere")
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get("cub_test")
    assert "fg_mask_file" not in records[0] and "segmentations not found" in caplog.text


# ----------------------------------------------------------------------------- CelebA / MAFL


def test_celeba_aligned_and_mafl(d2root):
    root = d2root / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 6)]
    for name in names:
        _jpeg(str(root / "Img" / "img_align_celeba" / name), size=(178 // 4, 218 // 4))
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    lines = [str(len(names)), header] + [
        f"{n}  " + "  ".join(str(10 * i + k) for k in range(10)) for i, n in enumerate(names, 1)
    ]
    _text(str(root / "Anno" / "list_landmarks_align_celeba.txt"), lines)
    _text(
        str(root / "Eval" / "list_eval_partition.txt"),
        [f"{n} {p}" for n, p in zip(names, (0, 0, 0, 1, 2))],
    )
    _text(str(root / "MAFL" / "training.txt"), ["000001.jpg", "000004.jpg"])
    _text(str(root / "MAFL" / "testing.txt"), ["000002.jpg", "000005.jpg"])

    ids = {
        n: [r["image_id"] for r in DatasetCatalog.get(n)]
        for n in ("celeba_train", "celeba_test", "mafl_train", "mafl_test")
    }
    # CelebA train partition minus the MAFL test images; MAFL lists as given.
    assert ids == {
        "celeba_train": [1, 3],
        "celeba_test": [5],
        "mafl_train": [1, 4],
        "mafl_test": [2, 5],
    }
    rec = DatasetCatalog.get("mafl_test")[0]
    assert rec["file_name"] == str(root / "Img" / "img_align_celeba" / "000002.jpg") and os.path.isfile(
        rec["file_name"]
    )
    assert rec["keypoints"] == [
        [20.0, 21.0, 1],
        [22.0, 23.0, 1],
        [24.0, 25.0, 1],
        [26.0, 27.0, 1],
        [28.0, 29.0, 1],
    ]
    meta = MetadataCatalog.get("mafl_test")
    assert meta.keypoint_names == ["left eye", "right eye", "nose", "left mouth", "right mouth"]
    assert meta.evaluator_type == "part_keypoints" and meta.image_root == str(root / "Img" / "img_align_celeba")


def test_celeba_in_the_wild_lists(d2root):
    root = d2root / "celeba"
    _jpeg(str(root / "img_celeba" / "000010.jpg"))
    _jpeg(str(root / "img_celeba" / "000011.jpg"))
    coords = ",".join(str(v) for v in range(10))
    _text(str(root / "cele_train_lm.txt"), [f"000010.jpg,{coords}", f"000011.jpg,{coords}"])
    _text(str(root / "MAFL_test_lm.txt"), [f"000011.jpg,{coords}"])
    assert [r["image_id"] for r in DatasetCatalog.get("celeba_wild_train")] == [10, 11]
    (rec,) = DatasetCatalog.get("mafl_wild_test")
    assert rec["file_name"] == str(root / "img_celeba" / "000011.jpg") and rec["keypoints"][4] == [
        8.0,
        9.0,
        1,
    ]
    with pytest.raises(DatasetNotFoundError, match="MAFL_train_lm.txt"):
        DatasetCatalog.get("mafl_wild_train")
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba"):
        DatasetCatalog.get("celeba_train")


# ----------------------------------------------------------------------------- DeepFashion


def test_deepfashion(d2root):
    seg = d2root / "deepfashion" / "In-shop Clothes Retrieval Benchmark" / "Anno" / "segmentation"
    colors = deepfashion.DEEPFASHION_PARSING_COLORS
    labels = np.zeros((32, 24), np.uint8)
    labels[4:20, 4:20] = 15
    labels[20:30, 2:10] = 7
    rgb = np.array(colors, np.uint8)[labels]
    rgb[0, 0] = (1, 2, 3)  # not a palette colour → ignore
    expected = labels.copy()
    expected[0, 0] = 255

    def image(rel, image_id):
        _jpeg(str(seg / rel), size=(24, 32))
        _png(str(seg / rel.replace(".jpg", "_segment.png")), rgb)
        return {"id": image_id, "file_name": rel, "height": 32, "width": 24}

    _json(
        str(seg / "DeepFashion_segmentation_train.json"),
        {
            "images": [
                image("img_highres/MEN/Denim/id_1/01_1_front.jpg", 1),
                image("img_highres/WOMEN/Dresses/id_2/02_1_front.jpg", 2),
            ]
        },
    )
    _json(
        str(seg / "DeepFashion_segmentation_query.json"),
        {"images": [image("img_highres/WOMEN/Tees/id_3/01_1_front.jpg", 1)]},
    )
    _json(
        str(seg / "DeepFashion_segmentation_gallery.json"),
        {"images": [image("img_highres/WOMEN/Tees/id_3/02_2_side.jpg", 1)]},
    )

    train = DatasetCatalog.get("deepfashion_train")
    test = DatasetCatalog.get("deepfashion_test")
    assert len(train) == 2 and [r["image_id"] for r in test] == [0, 1] and [r["json_image_id"] for r in test] == [1, 1]
    assert test[1]["file_name"] == str(seg / "img_highres/WOMEN/Tees/id_3/02_2_side.jpg") and os.path.isfile(
        test[1]["file_name"]
    )
    assert test[0]["parsing_file_name"] == str(seg / "img_highres/WOMEN/Tees/id_3/01_1_front_segment.png")
    assert (test[0]["height"], test[0]["width"]) == (32, 24)
    decoded = deepfashion.decode_parsing(test[0]["parsing_file_name"])
    assert decoded.dtype == np.uint8 and (decoded == expected).all()
    meta = MetadataCatalog.get("deepfashion_test")
    assert meta.num_parsing_labels == 16 and meta.evaluator_type == "part_nmi_ari" and meta.image_root == str(seg)

    os.remove(seg / "DeepFashion_segmentation_gallery.json")
    with pytest.raises(DatasetNotFoundError, match="DeepFashion_segmentation_gallery.json"):
        DatasetCatalog.get("deepfashion_test")


# ----------------------------------------------------------------------------- ImageNet folders + manifest


def _write_image_tree(train):
    _jpeg(str(train / "n02" / "b.JPEG"), size=(20, 10))
    _jpeg(str(train / "n02" / "a.JPEG"), size=(16, 8))
    _jpeg(str(train / "n01" / "c.jpg"), size=(12, 6))
    _jpeg(str(train / "n01" / "sub" / "d.JPEG"), size=(8, 4))
    _jpeg(str(train / "stray.JPEG"))  # outside a synset folder
    (train / "n03").mkdir()
    (train / "n03" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    (train / "n01" / "notes.txt").write_text("not an image")


def test_manifest_tool(tmp_path, monkeypatch, caplog, repo_script):
    tool = repo_script("datasets/prepare_image_list.py")
    train = tmp_path / "train"
    _write_image_tree(train)
    out = tmp_path / "manifest.tsv"
    assert inspect.isgenerator(tool.iter_image_dirs(str(train)))  # streamed, one folder at a time

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
    with caplog.at_level(logging.WARNING, logger="prepare_image_list"):
        stats = tool.write_manifest(str(train), str(out), with_size=True, workers=2, progress=False)
    first = out.read_bytes()
    assert first.decode().splitlines() == [
        "#path\tsynset\twidth\theight",
        "n01/c.jpg\tn01\t12\t6",
        "n01/sub/d.JPEG\tn01\t8\t4",
        "n02/a.JPEG\tn02\t16\t8",
        "n02/b.JPEG\tn02\t20\t10",
    ]
    assert stats == {"written": 4, "unreadable": 1, "no_synset": 1}
    assert "broken.JPEG" in caplog.text and "stray.JPEG" in caplog.text
    ((src, dst),) = renames
    assert dst == str(out) and src != dst and os.path.dirname(src) == str(tmp_path) and src.endswith(".tmp")
    assert sorted(os.listdir(tmp_path)) == ["manifest.tsv", "train"]

    # Deterministic; and a walk that fails midway leaves the previous manifest and no temp file.
    tool.write_manifest(str(train), str(out), with_size=True, workers=1, progress=False)
    assert out.read_bytes() == first

    def fail(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "read_size", fail)
    with pytest.raises(KeyboardInterrupt):
        tool.write_manifest(str(train), str(out), with_size=True, workers=1, progress=False)
    assert out.read_bytes() == first and sorted(os.listdir(tmp_path)) == ["manifest.tsv", "train"]

    # CLI without sizes: headers are not opened, so the broken file is listed.
    assert tool.main(["--root", str(train), "--out", str(tmp_path / "m2.tsv"), "--no-progress"]) == 0
    assert (tmp_path / "m2.tsv").read_text().splitlines()[0] == "#path\tsynset"
    assert "n03/broken.JPEG\tn03" in (tmp_path / "m2.tsv").read_text()
    assert tool.main(["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "m3.tsv")]) == 2


def test_imagenet_registration(d2root, repo_script):
    tool = repo_script("datasets/prepare_image_list.py")
    train = d2root / "imagenet_1k" / "train"
    _write_image_tree(train)
    tool.write_manifest(
        str(train),
        str(d2root / "imagenet_1k" / "train_manifest.tsv"),
        with_size=True,
        progress=False,
    )

    dataset = DatasetCatalog.get("imagenet_1k_train")
    meta = MetadataCatalog.get("imagenet_1k_train")
    assert isinstance(dataset, imagenet.ImageListDataset) and len(dataset) == 4
    assert meta.synsets == ["n01", "n02"] and meta.evaluator_type == "pseudo_label_writer"
    assert meta.manifest_file == str(d2root / "imagenet_1k" / "train_manifest.tsv")
    assert dataset[1] == {
        "file_name": str(train / "n01/sub/d.JPEG"),
        "image_id": "n01/sub/d",
        "class_code": "n01",
        "class_id": 0,  # the image-level class: index of the synset in meta.class_codes
        "width": 8,
        "height": 4,
    }
    assert meta.class_codes == meta.synsets and meta.image_level_labels
    assert dataset[-1]["file_name"] == str(train / "n02/b.JPEG") and dataset[-1]["class_id"] == 1
    assert all(os.path.isfile(r["file_name"]) for r in dataset)
    assert dataset.synset_ids.tolist() == [0, 0, 1, 1]
    sub = dataset[2:]
    assert len(sub) == 2 and sub[0]["image_id"] == "n02/a" and sub.subset([1])[0]["image_id"] == "n02/b"
    with pytest.raises(IndexError):
        dataset[4]
    # detectron2 takes a torch Dataset from the catalog as is (no list, no second serialised copy).
    assert get_detection_dataset_dicts(["imagenet_1k_train"]).synsets == ["n01", "n02"]

    tool.write_manifest(str(train), str(d2root / "imagenet_1k" / "train_manifest.tsv"), progress=False)
    dataset = DatasetCatalog.get("imagenet_1k_train")
    assert (
        len(dataset) == 5
        and "height" not in dataset[0]
        and MetadataCatalog.get("imagenet_1k_train").synsets == ["n01", "n02", "n03"]
    )

    (d2root / "imagenet_21k" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="prepare_image_list.py"):
        DatasetCatalog.get("imagenet_21k_train")


# ----------------------------------------------------------------------------- laziness and missing roots


def test_registration_reads_nothing(monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError("file system accessed at registration")

    for target, attr in (
        (builtins, "open"),
        (os, "scandir"),
        (os, "listdir"),
        (os, "stat"),
        (os.path, "exists"),
        (os.path, "isfile"),
        (os.path, "isdir"),
    ):
        monkeypatch.setattr(target, attr, no_io)
    try:
        for register in REGISTER:
            register()
    finally:
        monkeypatch.undo()
    assert set(ALL_NAMES) <= set(DatasetCatalog.list())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_missing_root_is_a_one_line_error(d2root, name):
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    message = str(e.value)
    assert str(d2root) in message and "datasets/README.md#" in message and "\n" not in message
