"""Config defaults, every shipped YAML loads, and config mistakes give one clear line."""

import glob
import os
import subprocess
import sys

import pytest

from part_distillation.engine import load_cfg
from part_distillation.utils.errors import ConfigError

from conftest import QUICK_STAGE0, REPO_ROOT

ALL_CONFIGS = sorted(
    f
    for f in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(f).startswith("Base-")
)


def test_defaults_added():
    cfg = load_cfg("")
    assert cfg.INPUT.DATASET_MAPPER_NAME == "InstanceLSJDatasetMapper"
    assert cfg.INPUT.TEST_DATASET_MAPPER_NAME == ""
    assert cfg.MODEL.EFFICIENTNET.OUT_FEATURES == ["res2", "res3", "res4", "res5"]
    assert cfg.MODEL.EFFICIENTNET.PRETRAINED is True and cfg.MODEL.EFFICIENTNET.WEIGHTS == ""
    assert cfg.MODEL.MASK_FORMER.POINT_SAMPLING == "importance"
    assert cfg.MODEL.MASK_FORMER.FREEZE_KEYS == []
    # Mask2Former's and detectron2's deeplab keys are present too
    assert cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS == 112 * 112
    assert cfg.MODEL.RESNETS.STEM_TYPE == "deeplab"


def test_every_key_is_commented():
    """Each key our config adds is documented by a comment right above it (paper symbol/default)."""
    files = sorted(glob.glob(os.path.join(REPO_ROOT, "part_distillation", "config", "*.py")))
    assert len(files) == 3, files  # __init__.py, pipeline.py, discovery.py
    for path in files:
        src = open(path).read().splitlines()
        for i, line in enumerate(src):
            stripped = line.strip()
            if stripped.startswith("cfg.") and "=" in stripped and "CN()" not in stripped:
                where = f"{os.path.basename(path)}:{i + 1}"
                assert src[i - 1].strip().startswith("#"), f"{where} has no comment: {stripped}"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_shipped_configs_load(path):
    cfg = load_cfg(path)
    assert cfg.MODEL.META_ARCHITECTURE


def test_quick_schedule_values():
    cfg = load_cfg(QUICK_STAGE0)
    assert cfg.MODEL.BACKBONE.NAME == "build_efficientnet_lite0_backbone"
    assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED
    assert cfg.DATASETS.TRAIN == ("toyparts_train",) and cfg.DATASETS.TEST == ("toyparts_val",)
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


def test_unknown_key_in_opts_is_named():
    with pytest.raises(ConfigError, match="MODEL.NOT_A_KEY"):
        load_cfg(QUICK_STAGE0, ["MODEL.NOT_A_KEY", "1"])


def test_unknown_key_in_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{QUICK_STAGE0}"\nMODEL:\n  MASK_FORMR:\n    NUM_OBJECT_QUERIES: 3\n')
    with pytest.raises(ConfigError, match=r"bad.yaml.*MODEL.MASK_FORMR"):
        load_cfg(str(bad))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_cfg("configs/nope.yaml")


def test_cli_prints_one_line_error(tmp_path):
    """The CLI turns a config mistake into `error: ...` on one line, exit code 2, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            QUICK_STAGE0,
            "MODEL.NOT_A_KEY",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MODEL.NOT_A_KEY" in errors[0]
    assert "Traceback" not in proc.stderr


def test_cli_missing_dataset_root(tmp_path):
    """A missing dataset gives one line naming the path and how to create it."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            "--config-file",
            QUICK_STAGE0,
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "nowhere") in errors[0] and "prepare_toyparts.py" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("key", ["MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME"])
def test_unregistered_model_pieces_are_named(key):
    from part_distillation.engine import check_runtime

    with pytest.raises(ConfigError, match=f"{key}='NoSuchThing' is not registered; use one of: .*Mask2Former|{key}"):
        check_runtime(load_cfg(QUICK_STAGE0, [key, "NoSuchThing"]))


def test_moved_key_names_its_new_home(tmp_path):
    """Keys that moved (MODEL.PSEUDO_LABELS -> INPUT, the labelling batch -> DATALOADER) fail with one clear line."""
    old = tmp_path / "old.yaml"
    old.write_text(f'_BASE_: "{QUICK_STAGE0}"\nMODEL:\n  PSEUDO_LABELS:\n    USE_PART_CLASSES: True\n')
    with pytest.raises(ConfigError, match=r"old.yaml: Key MODEL.PSEUDO_LABELS was renamed to INPUT.PSEUDO_LABELS") as e:
        load_cfg(str(old))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="MODEL.PIXEL_GROUPING.IMS_PER_BATCH was renamed to DATALOADER.LABELLING_IMS"):
        load_cfg(QUICK_STAGE0, ["MODEL.PIXEL_GROUPING.IMS_PER_BATCH", "2"])
    new = load_cfg(
        QUICK_STAGE0, ["INPUT.PSEUDO_LABELS.USE_PART_CLASSES", "True", "DATALOADER.LABELLING_IMS_PER_BATCH", "2"]
    )
    assert new.INPUT.PSEUDO_LABELS.USE_PART_CLASSES is True and new.DATALOADER.LABELLING_IMS_PER_BATCH == 2
