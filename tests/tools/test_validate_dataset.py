"""The dataset validator (part_distillation.data.validation) and its CLI, tools/validate_dataset.py,
on a fixture with one planted fault per check."""

import json
import os
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

from part_distillation.data.validation import (
    CHECKS,
    ERROR,
    WARNING,
    check_annotations,
    check_image_file,
    validate_dataset_dicts,
)

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import validate_dataset  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 24, 32
NAME = "validation_fixture_faults"
CLEAN_NAME = "validation_fixture_warnings_only"
META = {"thing_classes": ["cow", "horse"], "object_classes": ["cow", "horse"], "part_classes": ["head", "leg", "tail"]}


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def box_mask(shape=(H, W)):
    m = np.zeros(shape, dtype=bool)
    m[4:12, 6:20] = True
    return m


def anno(category_id=0, segmentation=None, **extra):
    return {
        "category_id": category_id,
        "segmentation": segmentation or rle(box_mask()),
        "bbox": [6, 4, 14, 8],
        "bbox_mode": 1,
        "iscrowd": 0,
        **extra,
    }


def record(file_name, image_id, height=H, width=W, annotations=None, **extra):
    return {
        "file_name": str(file_name),
        "image_id": image_id,
        "height": height,
        "width": width,
        "annotations": annotations if annotations is not None else [anno()],
        **extra,
    }


def noise(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 255, (h, w, 3), np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    p = {
        k: d / v
        for k, v in dict(
            good="good.jpg",
            png="good.png",
            trunc="truncated.jpg",
            zero="zero.jpg",
            g16="gray16.png",
            cmyk="cmyk.jpg",
            exif="exif_rotated.jpg",
            tiny="tiny.png",
            missing="missing.jpg",
            garbage="garbage.jpg",
        ).items()
    }
    Image.fromarray(noise(H, W)).save(p["good"], quality=90)
    Image.fromarray(noise(H, W, 1)).save(p["png"])
    Image.fromarray(noise(96, 128, 2)).save(d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    p["trunc"].write_bytes(data[: len(data) // 2])
    p["zero"].write_bytes(b"")
    p["garbage"].write_bytes(b"this is not an image at all" * 10)
    Image.fromarray((np.arange(H * W, dtype=np.uint16).reshape(H, W) * 50)).save(p["g16"])
    Image.fromarray(noise(H, W, 3)).convert("CMYK").save(p["cmyk"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: decoded size becomes W×H
    Image.fromarray(noise(H, W, 4)).save(p["exif"], exif=exif.tobytes())
    Image.new("RGB", (1, 1)).save(p["tiny"])
    return p


def fault_records(p):
    objects = [anno(0, id=1, object_id=1), anno(1, id=2, object_id=2)]
    parts = [anno(0, id=3, object_id=1, object_index=0), anno(1, id=4, object_id=999, object_index=7)]
    parts_view_annos = [anno(1, id=6, object_id=5, object_index=1)]  # object_index 1 of a 1-object list
    outside = [[40.0, 30.0, 50.0, 30.0, 50.0, 40.0]]  # entirely right of / below a 32x24 image
    partly = [[-5.0, 2.0, 10.0, 2.0, 10.0, 10.0]]
    return [
        record(p["good"], "good", annotations=objects, part_annotations=parts),  # dangling part #2
        record(p["png"], "png", annotations=parts_view_annos, object_annotations=[anno(0, id=5, object_id=5)]),
        record(p["trunc"], "trunc", height=96, width=128, annotations=[]),
        record(p["zero"], "zero"),
        record(p["garbage"], "garbage"),
        record(p["g16"], "g16"),
        record(p["cmyk"], "cmyk"),
        record(p["exif"], "exif"),  # recorded as stored (H×W); decoded W×H
        record(p["tiny"], "tiny", height=1, width=1, annotations=[]),
        record(p["missing"], "missing"),
        record(p["good"], "size", height=H + 1, width=W),  # wrong recorded size
        record(p["good"], "rle_outside", annotations=[anno(0, segmentation=rle(box_mask((10, 10))))]),
        record(p["good"], "poly_outside", annotations=[anno(0, segmentation=outside), anno(1, segmentation=partly)]),
        record(p["good"], "empty", annotations=[anno(0, segmentation=rle(np.zeros((H, W), bool)))]),
        record(p["good"], "unknown_cat", annotations=[anno(7), anno(-1), anno("cow")]),
        record(p["good"], "bad_poly", annotations=[anno(0, segmentation=[[1.0, 2.0, 3.0, 4.0]])]),
        record(p["png"], "png"),  # duplicate image_id
    ]


def by_check(findings):
    out = {}
    for f in findings:
        out.setdefault(f.check, set()).add((f.severity, os.path.basename(f.file)))
    return out


def test_every_planted_fault_is_reported(images):
    findings = validate_dataset_dicts(fault_records(images), META)
    assert {f.check for f in findings} <= set(CHECKS)
    got = by_check(findings)
    expected = {
        "truncated_image": {(ERROR, "truncated.jpg")},
        "empty_file": {(ERROR, "zero.jpg")},
        "unreadable_image": {(ERROR, "garbage.jpg")},
        "high_bit_depth": {(WARNING, "gray16.png")},
        "cmyk_image": {(WARNING, "cmyk.jpg")},
        "exif_rotation": {(ERROR, "exif_rotated.jpg")},
        "degenerate_image": {(ERROR, "tiny.png")},
        "missing_image": {(ERROR, "missing.jpg")},
        "size_mismatch": {(ERROR, "good.jpg")},
        "mask_outside_image": {(ERROR, "good.jpg"), (WARNING, "good.jpg")},
        "empty_mask": {(WARNING, "good.jpg")},
        "unknown_category": {(ERROR, "good.jpg")},
        "invalid_mask": {(ERROR, "good.jpg")},
        "dangling_object_ref": {(ERROR, "good.jpg"), (ERROR, "good.png")},
        "duplicate_image_id": {(ERROR, "good.png")},
    }
    for check, want in expected.items():
        assert got.get(check) == want, (check, got.get(check))
    assert set(got) == set(expected)  # no spurious checks (e.g. nothing on the clean objects)
    details = {f.check: f.detail for f in findings}
    assert "rescales it to 8 bits" in details["high_bit_depth"]
    assert "convert('RGB')" in details["cmyk_image"]
    assert "EXIF orientation 6" in details["exif_rotation"]
    assert sum(f.check == "unknown_category" for f in findings) == 3
    dangling = [f.detail for f in findings if f.check == "dangling_object_ref"]
    assert any("object_index 7" in d for d in dangling) and any("object_index 1" in d for d in dangling)


def test_clean_images_and_threads(images):
    assert check_image_file(str(images["good"]), (H, W)) == []
    assert check_image_file(str(images["png"])) == []
    assert check_image_file(str(images["exif"]), (W, H)) == []  # recorded in the rotated frame: fine
    assert check_annotations(record(images["good"], "x"), META) == []
    records = fault_records(images)
    assert validate_dataset_dicts(records, META, num_workers=3) == validate_dataset_dicts(records, META)


@pytest.fixture
def registered(images):
    def register(name, records):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(**META)

    register(NAME, fault_records(images))
    register(CLEAN_NAME, [record(images["good"], "a"), record(images["cmyk"], "b"), record(images["g16"], "c")])
    yield
    for name in (NAME, CLEAN_NAME):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_cli_reports_errors(registered, images, tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    rc = validate_dataset.main(["--dataset", NAME, "--json", str(report), "--num-workers", "2", "--no-progress"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "check" in out and "severity" in out and "examples" in out
    for check in ("truncated_image", "empty_file", "exif_rotation", "duplicate_image_id", "dangling_object_ref"):
        assert check in out
    data = json.loads(report.read_text())
    assert data["dataset"] == NAME and data["num_records"] == len(fault_records(images))
    assert data["num_errors"] > 0 and {s["check"] for s in data["summary"]} >= {"truncated_image", "cmyk_image"}
    assert all(set(f) == {"severity", "check", "file", "detail"} for f in data["findings"])
    assert os.listdir(report.parent) == ["report.json"]  # atomic write left no temporary file


def test_cli_warnings_only_and_bad_name(registered, capsys):
    assert validate_dataset.main(["--dataset", CLEAN_NAME, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 error(s), 2 warning(s)" in out and "cmyk_image" in out
    assert validate_dataset.main(["--dataset", NAME, "--max-images", "1", "--no-progress"]) == 1  # the dangling part
    capsys.readouterr()
    assert validate_dataset.main(["--dataset", "no_such_dataset", "--no-progress"]) == 2
    assert "not registered" in capsys.readouterr().err
