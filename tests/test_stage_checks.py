"""Stage configs refuse to run with random frozen/labelling modules; image-level classes, synset maps, WordNet."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import Instances

from part_distillation.engine import load_cfg
from part_distillation.engine.checks import check_stage_weights, resolve_stage_config
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT

STAGES = ("stage0_instance", "stage1_pixel_grouping", "stage2_proposals", "stage3_ranking", "stage4_distillation")


def _cfg(name, opts=()):
    return load_cfg(os.path.join(REPO_ROOT, "configs", f"{name}.yaml"), list(opts))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output/ of earlier runs
    return tmp_path


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {}}, path)


def test_missing_default_checkpoints_name_the_key_and_the_stage(in_tmp):
    with pytest.raises(
        ConfigError,
        match=r"MODEL.WEIGHTS='output/stage0_instance/model_final.pth' does not exist.*"
        r"configs/stage0_instance.yaml",
    ):
        check_stage_weights(_cfg("stage2_proposals"))
    with pytest.raises(ConfigError, match=r"MODEL.WEIGHTS='output/stage2_proposals/model_final.pth'.*stage2_proposals"):
        check_stage_weights(_cfg("stage3_ranking"))
    with pytest.raises(
        ConfigError, match=r"MODEL.PART_DISTILLATION.INIT_FROM='output/stage2_proposals/model_final.pth'"
    ):
        check_stage_weights(_cfg("stage4_distillation"))
    with pytest.raises(ConfigError, match=r"output/stage0_instance"):
        check_stage_weights(_cfg("stage1_pixel_grouping"))
    with pytest.raises(ConfigError, match=r"MODEL.WEIGHTS='weights/backbone/swin_large.*MODEL_ZOO.md"):
        check_stage_weights(_cfg("stage0_instance"))  # the Swin-L ImageNet-21K backbone of Mask2Former's recipe


def test_frozen_modules_need_a_checkpoint(in_tmp):
    with pytest.raises(ConfigError, match=r"FREEZE_KEYS freezes the backbone.*MODEL.WEIGHTS output/stage0_instance"):
        check_stage_weights(_cfg("stage2_proposals", ["MODEL.WEIGHTS", "", "MODEL.PROPOSAL.INIT_FROM", ""]))
    with pytest.raises(ConfigError, match=r"FREEZE_KEYS freezes the backbone.*PART_DISTILLATION.INIT_FROM"):
        check_stage_weights(_cfg("stage4_distillation", ["MODEL.PART_DISTILLATION.INIT_FROM", ""]))
    _touch("output/stage0_instance/model_final.pth")
    _touch("output/stage2_proposals/model_final.pth")
    open("output/stage0_instance/config.yaml", "w").close()
    check_stage_weights(_cfg("stage1_pixel_grouping"))
    check_stage_weights(_cfg("stage2_proposals"))  # the documented defaults, once stage 0 ran
    check_stage_weights(_cfg("stage4_distillation"))
    check_stage_weights(_cfg("stage3_ranking"))
    # the encoder alone from MODEL.WEIGHTS is enough for the frozen encoder; nothing frozen needs nothing
    check_stage_weights(_cfg("stage2_proposals", ["MODEL.PROPOSAL.INIT_FROM", ""]))
    check_stage_weights(
        _cfg(
            "stage2_proposals",
            ["MODEL.WEIGHTS", "", "MODEL.PROPOSAL.INIT_FROM", "", "MODEL.MASK_FORMER.FREEZE_KEYS", "[]"],
        )
    )
    # eval-only checks only that named files exist
    check_stage_weights(_cfg("stage4_distillation", ["MODEL.PART_DISTILLATION.INIT_FROM", ""]), eval_only=True)
    # labelling needs the stage-2 model / a non-random backbone
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS"):
        check_stage_weights(_cfg("stage3_ranking", ["MODEL.WEIGHTS", ""]))
    with pytest.raises(ConfigError, match="random backbone"):
        check_stage_weights(_cfg("stage1_pixel_grouping", ["MODEL.WEIGHTS", ""]))


def test_gt_objects_on_an_image_level_dataset_is_an_error():
    cfg = _cfg("stage1_pixel_grouping", ["MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE", "gt"])
    with pytest.raises(ConfigError, match=r"OBJECT_MASK_SOURCE='gt' but imagenet_21k_train has image-level labels"):
        resolve_stage_config(cfg)


def test_num_object_classes_from_the_store(tmp_path):
    from part_distillation.data.object_classes import write_store_classes
    from part_distillation.data.pseudo_labels import PseudoLabelWriter, register_pseudo_label_dataset

    writer = PseudoLabelWriter(str(tmp_path), "imagenet_21k_train", "ranking", shard_size=2, num_images=0)
    writer.finalize()
    write_store_classes(writer.dir, ["n02084071", "n02121808", "n02691156"])
    register_pseudo_label_dataset("imagenet_21k_train_pseudo_ranking", str(tmp_path), "imagenet_21k_train", "ranking")
    cfg = _cfg("stage4_distillation")
    resolve_stage_config(cfg)
    assert cfg.MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES == 3
    cfg = _cfg("stage4_distillation", ["DATASETS.TRAIN", "('toyparts_parts_train',)"])
    with pytest.raises(ConfigError, match="NUM_OBJECT_CLASSES is 0"):
        resolve_stage_config(cfg)


def test_cli_refuses_in_one_line(in_tmp):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            os.path.join(REPO_ROOT, "configs", "stage2_proposals.yaml"),
            "MODEL.DEVICE",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MODEL.WEIGHTS" in errors[0] and "Traceback" not in proc.stderr


def test_every_stage_and_baseline_config_runs_or_refuses_in_one_line(in_tmp):
    import glob

    files = [os.path.join(REPO_ROOT, "configs", f"{n}.yaml") for n in STAGES]
    files += sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "baselines", "*.yaml")))
    for path in files:
        cfg = load_cfg(path)
        try:
            check_stage_weights(cfg)
        except ConfigError as e:  # only for a checkpoint that is not there, with where it comes from
            assert "does not exist" in str(e) and ("output/stage" in str(e) or "MODEL_ZOO.md" in str(e)), (path, e)


def test_objects_take_the_image_class():
    from part_distillation.modeling.meta_arch.object_source import assign_image_class

    def objects():
        o = Instances((4, 4))
        o.gt_masks = torch.ones(3, 4, 4, dtype=torch.bool)
        o.gt_classes = torch.tensor([5, 2, 2])
        o.scores = torch.tensor([0.9, 0.5, 0.4])
        return o

    out = assign_image_class(objects(), 7)  # a COCO detector: every object becomes the synset's class
    assert out.gt_classes.tolist() == [7, 7, 7]
    out = assign_image_class(objects(), 2, same_vocabulary=True)  # Detic with the dataset's names: its class only
    assert out.gt_classes.tolist() == [2, 2] and out.scores.tolist() == pytest.approx([0.5, 0.4])
    out = assign_image_class(objects(), 3, same_vocabulary=True)  # none of the image's class: all, relabelled
    assert out.gt_classes.tolist() == [3, 3, 3]
    assert assign_image_class(objects(), None).gt_classes.tolist() == [5, 2, 2]


def test_synset_class_map_and_wordnet_filter(tmp_path):
    from part_distillation.data.object_classes import synset_class_map
    from part_distillation.data.wordnet_filter import filter_manifest, select_classes

    model = ["n02084071", "n02121808", "n02691156"]  # dog, domestic cat, airplane
    # Chihuahua → dog (hypernym), the model's own airplane, Pascal names, a fish it does not know
    assert synset_class_map(model, ["n02085620", "n02691156", "aeroplane", "cat", "n01440764"]) == [0, 2, 2, 1, -1]
    sel = select_classes(["n02084071", "n02121808", "n07707451", "n13104059", "n03001627"], num_classes=0, balanced=1)
    assert sel["kept"] == ["n02084071", "n02121808", "n03001627"]  # vegetable (food) and tree removed
    assert len(sel["inside"]) == 1 and sel["outside"] == ["n03001627"]
    manifest = tmp_path / "all.tsv"
    manifest.write_text("#path\tsynset\nn02084071/a.JPEG\tn02084071\nn07707451/b.JPEG\tn07707451\n")
    out = tmp_path / "train_manifest.tsv"
    assert filter_manifest(str(manifest), str(out), sel["kept"]) == 1
    assert out.read_text() == "#path\tsynset\nn02084071/a.JPEG\tn02084071\n"


def test_zero_shot_object_classes_in_the_eval_mapper(tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_util

    from part_distillation.data.dataset_mappers.part_eval import PartEvalDatasetMapper

    Image.new("RGB", (16, 16), (80, 90, 100)).save(tmp_path / "n02085620_1.JPEG")
    m = np.zeros((16, 16), np.uint8)
    m[2:14, 3:12] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    record = {
        "file_name": str(tmp_path / "n02085620_1.JPEG"),
        "image_id": 7,
        "height": 16,
        "width": 16,
        "class_code": "n02085620",
        "annotations": [{"segmentation": rle, "category_id": 0, "object_id": 0, "bbox": [3, 2, 9, 12], "bbox_mode": 1}],
    }
    model = ["n02084071", "n02121808"]  # dog, domestic cat
    kw = dict(augmentations=[], image_format="RGB", part_to_object=[3])
    assert PartEvalDatasetMapper(**kw)(record)["objects"].gt_classes.tolist() == [3]  # the dataset's id
    synset = PartEvalDatasetMapper(**kw, object_class_map="synset", model_class_codes=model)
    assert synset(record)["objects"].gt_classes.tolist() == [0]  # Chihuahua → the model's dog
    preds = tmp_path / "preds.json"  # image 8's prediction belongs to another image
    preds.write_text(
        json.dumps(
            [
                {"image_id": 7, "segmentation": rle, "score": 0.9, "class_code": "n02121808"},
                {"image_id": 8, "segmentation": rle, "score": 0.9, "category_id": 0},
            ]
        )
    )
    predicted = PartEvalDatasetMapper(
        **kw, object_class_map="predicted", model_class_codes=model, object_predictions=str(preds)
    )
    assert predicted(record)["objects"].gt_classes.tolist() == [1]  # the predicted cat, not the true dog
    with pytest.raises(ConfigError, match="OBJECT_PREDICTIONS_JSON"):
        PartEvalDatasetMapper(**kw, object_class_map="predicted")


def test_quick_schedules_pass_the_checks(in_tmp):
    import glob

    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "quick_schedules", "*.yaml"))):
        cfg = load_cfg(path)
        if os.path.basename(path).startswith(("stage3", "fewshot")):
            continue  # they name the previous quick stage's checkpoint
        check_stage_weights(cfg)


def test_cli_refuses_gt_objects_on_imagenet(in_tmp):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "make_pseudo_labels.py"),
            "--config-file",
            os.path.join(REPO_ROOT, "configs", "stage1_pixel_grouping.yaml"),
            "MODEL.DEVICE",
            "cpu",
            "MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE",
            "gt",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "image-level labels" in errors[0], proc.stderr[-2000:]
