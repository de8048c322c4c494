"""Stage 1 end to end: labelling writes a complete store, survives SIGKILL + --resume byte for byte,
splits over 2 processes identically, and counts unreadable images instead of crashing."""

import os
import signal
import subprocess
import sys
import time

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import REPO_ROOT, read_tree

TOOL = os.path.join(REPO_ROOT, "tools", "make_pseudo_labels.py")
CONFIG = os.path.join(REPO_ROOT, "configs", "quick_schedules", "stage1_pixel_grouping_toyparts.yaml")

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import make_pseudo_labels  # noqa: E402


def _opts(root, out, batch=1):
    return [
        "DATASETS.PSEUDO_LABEL_ROOT",
        str(root),
        "OUTPUT_DIR",
        str(out),
        "INPUT.IMAGE_SIZE",
        "128",
        "DATALOADER.LABELLING_IMS_PER_BATCH",
        str(batch),
        "MODEL.PIXEL_GROUPING.KMEANS_N_INIT",
        "3",
    ]


def _store_files(root):
    return read_tree(os.path.join(root, "toyparts_val", "grouping"))


def _run_cli(args, env, **kw):
    return subprocess.run(
        [sys.executable, TOOL, "--config-file", CONFIG, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        **kw,
    )


def _free_port():
    """detectron2's default --dist-url port is fixed per user; parallel runs would collide on it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(argv):
    old = sys.argv
    sys.argv = ["make_pseudo_labels.py", *argv]
    try:
        return make_pseudo_labels.parse_args()
    finally:
        sys.argv = old


def test_labels_toyparts_and_reports(datasets_root, tmp_path):
    args = _parse(
        ["--config-file", CONFIG, "--shard-size", "2", "--vis", "2", *_opts(tmp_path / "pl", tmp_path / "out", 2)]
    )
    summary = make_pseudo_labels.main(args)
    n = len(DatasetCatalog.get("toyparts_val"))
    assert summary["images"] == n and summary["skipped"] == 0 and summary["complete"]
    assert summary["objects"] > 0 and summary["objects"] <= summary["parts"] <= 4 * summary["objects"]
    assert 0 < summary["ar"]["AR@10"] <= 100 and summary["ar"]["num_images"] == n
    assert sorted(os.listdir(tmp_path / "out" / "vis")) == ["0000.png", "0001.png"]
    assert os.path.isfile(tmp_path / "pl" / "toyparts_val" / "grouping" / "manifest.json")


def test_sigkill_then_resume_equals_uninterrupted_run(datasets_root, tmp_path):
    env = dict(os.environ)
    ref = _run_cli(["--shard-size", "1", *_opts(tmp_path / "ref", tmp_path / "o1")], env, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _store_files(tmp_path / "ref")

    shards = tmp_path / "killed" / "toyparts_val" / "grouping" / "shards"
    proc = subprocess.Popen(
        [
            sys.executable,
            TOOL,
            "--config-file",
            CONFIG,
            "--shard-size",
            "1",
            *_opts(tmp_path / "killed", tmp_path / "o2"),
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len([f for f in os.listdir(shards) if f.endswith(".jsonl.gz")]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "labelling finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [f for f in os.listdir(shards) if f.endswith(".jsonl.gz")]
    assert 2 <= len(done) < len([k for k in expected if k.endswith(".jsonl.gz")])

    resumed = _run_cli(
        ["--shard-size", "1", "--resume", *_opts(tmp_path / "killed", tmp_path / "o3")], env, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _store_files(tmp_path / "killed") == expected


def test_two_processes_equal_one(datasets_root, tmp_path):
    env = dict(os.environ)
    one = _run_cli(["--shard-size", "2", *_opts(tmp_path / "one", tmp_path / "o1", 2)], env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_cli(
        [
            "--num-gpus",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{_free_port()}",
            "--shard-size",
            "2",
            *_opts(tmp_path / "two", tmp_path / "o2", 2),
        ],
        env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert _store_files(tmp_path / "two") == _store_files(tmp_path / "one")


def test_unreadable_images_are_skipped_counted_and_named(datasets_root, tmp_path):
    good = DatasetCatalog.get("toyparts_val")[:3]
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0garbage")
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    bad = [
        dict(good[0], file_name=str(broken), image_id=10**6),
        dict(good[0], file_name=str(empty), image_id=10**6 + 1),
    ]
    name = "toyparts_val_with_bad_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: good + bad)
        MetadataCatalog.get(name).set(
            **{k: v for k, v in MetadataCatalog.get("toyparts_val").as_dict().items() if k not in ("name", "json_file")}
        )
    argv = [
        "--config-file",
        CONFIG,
        "--shard-size",
        "1",
        *_opts(tmp_path / "pl", tmp_path / "out"),
        "DATASETS.TEST",
        f"('{name}',)",
        "MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET",
        "",
    ]
    summary = make_pseudo_labels.main(_parse(argv))
    assert summary["images"] == 3 and summary["skipped"] == 2 and summary["complete"]
    assert sorted(summary["skipped_files"]) == sorted([str(broken), str(empty)])
    assert sum(summary["skipped_by_reason"].values()) == 2


def test_shard_size_must_align_with_batch(datasets_root, tmp_path):
    from part_distillation.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of DATALOADER.LABELLING_IMS_PER_BATCH"):
        make_pseudo_labels.main(_parse(["--config-file", CONFIG, "--shard-size", "3", *_opts(tmp_path, tmp_path, 2)]))
