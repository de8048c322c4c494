"""register_part_coco: a user's COCO part JSON in detectron2's register_coco_instances style; the checked
loader names the file and the problem in one line."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from part_distillation.data.datasets.part_coco import DatasetFormatError, load_checked_coco_json, register_part_coco


def _coco(tmp_path, **changes):
    coco = {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 10, "width": 20}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "object_id": 7},
            {"id": 2, "image_id": 5, "category_id": 9, "segmentation": [[4, 0, 8, 0, 8, 4, 4, 4]], "object_id": 7},
            {"id": 3, "image_id": 5, "category_id": 9, "segmentation": [[10, 5, 12, 5, 12, 8, 10, 8]]},
        ],
        "categories": [{"id": 9, "name": "wheel"}, {"id": 3, "name": "door"}],
    }
    coco.update(changes)
    path = tmp_path / "parts.json"
    path.write_text(json.dumps(coco))
    return str(path), coco


def test_register_part_coco_parts_and_objects_views(tmp_path):
    json_file, _ = _coco(tmp_path)
    register_part_coco("pc_test_parts", json_file, str(tmp_path), objects_name="pc_test")
    parts = DatasetCatalog.get("pc_test_parts")
    meta = MetadataCatalog.get("pc_test_parts")
    assert meta.thing_classes == ["door", "wheel"] and meta.is_part_dataset  # ids 3, 9 → 0, 1
    assert [a["category_id"] for a in parts[0]["annotations"]] == [0, 1, 1]
    assert parts[0]["file_name"] == os.path.join(str(tmp_path), "a.jpg")
    objects = DatasetCatalog.get("pc_test")
    # object 7 = the union of its two parts; the part without object_id forms the image's own object
    assert [o["object_id"] for o in objects[0]["annotations"]] == [7, 5]
    assert objects[0]["annotations"][0]["bbox"] == [0.0, 0.0, 8.0, 4.0]
    assert MetadataCatalog.get("pc_test").thing_classes == ["object"]
    # the part view maps every part to the object view's one class, so stage 4 is evaluated with class 0
    assert meta.part_to_object == [0, 0]
    from PIL import Image

    from part_distillation.data.dataset_mappers.part_eval import PartEvalDatasetMapper

    Image.new("RGB", (20, 10), (90, 120, 30)).save(tmp_path / "a.jpg")
    mapper = PartEvalDatasetMapper(augmentations=[], image_format="RGB", part_to_object=meta.part_to_object)
    assert mapper(parts[0])["objects"].gt_classes.tolist() == [0, 0]
    # without an object view the parts' objects have no class (stage 4 refuses evaluating on it)
    register_part_coco("pc_test_parts_only", json_file, str(tmp_path))
    DatasetCatalog.get("pc_test_parts_only")
    assert MetadataCatalog.get("pc_test_parts_only").get("part_to_object", None) is None


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {
                "annotations": [
                    {"id": 1, "image_id": 5, "category_id": 3, "segmentation": []},
                    {"id": 1, "image_id": 5, "category_id": 3, "segmentation": []},
                ]
            },
            "annotation id 1 used 2 times",
        ),
        ({"annotations": [{"id": 1, "image_id": 5, "category_id": 4, "segmentation": []}]}, "category_id 4 is not in"),
        ({"annotations": [{"id": 1, "image_id": 5, "category_id": 3}]}, "no 'segmentation'"),
        (
            {"annotations": [{"id": 1, "image_id": 5, "category_id": 3, "segmentation": [], "bbox": [0, 0, -1, 2]}]},
            "negative width",
        ),
        ({"images": [{"id": 5, "file_name": "a.jpg"}]}, "no id/file_name/height/width"),
    ],
)
def test_unusable_json_is_one_line_naming_the_file(tmp_path, change, message):
    json_file, _ = _coco(tmp_path, **change)
    with pytest.raises(DatasetFormatError) as e:
        load_checked_coco_json(json_file, str(tmp_path))
    assert message in str(e.value) and json_file in str(e.value) and "\n" not in str(e.value)


def test_truncated_json_and_counted_drops(tmp_path):
    json_file, coco = _coco(tmp_path)
    text = open(json_file).read()
    open(json_file, "w").write(text[:50])
    with pytest.raises(DatasetFormatError, match="not valid JSON .*line 1 column"):
        load_checked_coco_json(json_file, str(tmp_path))
    coco["annotations"].append({"id": 8, "image_id": 404, "category_id": 3, "segmentation": []})
    coco["annotations"].append({"id": 9, "image_id": 5, "category_id": 3, "segmentation": [[1, 2, 3, 4]]})
    open(json_file, "w").write(json.dumps(coco))
    drops = {}
    records = load_checked_coco_json(json_file, str(tmp_path), "pc_drops", drops_out=drops)
    assert drops == {"annotation_without_image": 1, "invalid_polygon": 1}
    assert MetadataCatalog.get("pc_drops").load_drops == drops and len(records[0]["annotations"]) == 3


def test_config_specs_and_validator_flag(tmp_path, repo_script):
    from part_distillation.data.datasets.part_coco import register_part_coco_specs
    from part_distillation.utils.errors import ConfigError

    json_file, _ = _coco(tmp_path)
    assert register_part_coco_specs([f"pc_spec_parts,{json_file},{tmp_path},pc_spec"]) == ["pc_spec_parts", "pc_spec"]
    assert len(DatasetCatalog.get("pc_spec")) == 1
    with pytest.raises(ConfigError, match="DATASETS.PART_COCO entry 'only,two'"):
        register_part_coco_specs(["only,two"])
    validate = repo_script("tools/validate_dataset.py")
    # the image file does not exist: reported (exit 1), not a load failure
    assert (
        validate.main(["--part-coco", f"pc_flag,{json_file},{tmp_path}", "--dataset", "pc_flag", "--no-progress"]) == 1
    )


def test_each_test_dataset_is_mapped_with_its_own_metadata(tmp_path):
    """Two test datasets: the second's objects take their classes from its own part_to_object, not the first's."""
    from PIL import Image

    from part_distillation.data.build import build_detection_test_loader
    from part_distillation.engine import load_cfg

    from conftest import REPO_ROOT

    json_file, _ = _coco(tmp_path)
    Image.new("RGB", (20, 10), (90, 120, 30)).save(tmp_path / "a.jpg")
    register_part_coco("pc_two_first", json_file, str(tmp_path))  # no object view: no object classes
    register_part_coco("pc_two_second", json_file, str(tmp_path), objects_name="pc_two_second_objects")
    config = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage4_distillation_toyparts.yaml")
    cfg = load_cfg(config, ["DATASETS.TEST", "('pc_two_first', 'pc_two_second')", "DATALOADER.NUM_WORKERS", "0"])
    classes = {}
    for name in cfg.DATASETS.TEST:
        (batch,) = list(build_detection_test_loader(cfg, name))
        classes[name] = batch[0]["objects"].gt_classes.tolist()
    assert classes == {"pc_two_first": [-1, -1], "pc_two_second": [0, 0]}
