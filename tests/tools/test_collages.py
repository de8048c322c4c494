"""tools/make_collages.py, tools/summarize_collages.py, the object-like-part filter; the page in headless Chromium."""

import csv
import os
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from part_distillation.data.pseudo_labels import PseudoLabelWriter, make_object, make_part
from part_distillation.evaluation.filters import drop_object_like_parts, mask_iou_with_objects

H = W = 96
NUM_IMAGES = 5


def _store(tmp_path):
    """Images with a disc (class 0) and a square (class 1), each split into 3 parts (part classes 0-2) plus a
    part covering its whole object (part class 3): the one the paper's filter must drop."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    writer = PseudoLabelWriter(str(tmp_path / "store"), "shapes_train", "ranking", shard_size=2, num_images=NUM_IMAGES)
    yy, xx = np.mgrid[:H, :W]
    for i in range(NUM_IMAGES):
        image = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        cy, cx = 25 + i, 28
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 18**2
        square = (yy >= 50) & (yy < 90) & (xx >= 50 + i) & (xx < 90)
        image[disc] = (40, 200, 40)
        image[square] = (200, 120, 30)
        path = images / f"im{i}.png"
        cv2.imwrite(str(path), image)
        objects = []
        for cls, m in ((0, disc), (1, square)):
            thirds = [
                m & (xx < np.percentile(xx[m], 33)),
                m & (xx >= np.percentile(xx[m], 33)) & (xx < np.percentile(xx[m], 66)),
                m & (xx >= np.percentile(xx[m], 66)),
            ]
            parts = [make_part(t, 0.9, k) for k, t in enumerate(thirds)] + [make_part(m, 0.5, 3)]
            objects.append(make_object(m, parts, 1.0, cls))
        writer.add(i, {"image_id": i, "file_name": str(path), "height": H, "width": W, "objects": objects})
    writer.close()
    writer.finalize()
    return str(tmp_path / "store")


def test_drop_object_like_parts_numpy_and_torch():
    import torch

    obj = np.zeros((2, 10, 10), bool)
    obj[0, :, :5] = True  # 50 px
    obj[1, :, 5:] = True
    parts = np.zeros((4, 10, 10), bool)
    parts[0, :, :5] = True  # = object 0: IoU 1
    parts[1, :5, :5] = True  # half of object 0: IoU 0.5, kept (the filter drops IoU > 0.5)
    parts[2, :6, 5:] = True  # 30 of 50 px of object 1: IoU 0.6
    parts[3, 0, 0] = True  # outside its object 1: IoU 0
    owner = [0, 0, 1, 1]
    np.testing.assert_allclose(mask_iou_with_objects(parts, obj, owner), [1.0, 0.5, 0.6, 0.0])
    assert drop_object_like_parts(parts, obj, owner).tolist() == [False, True, False, True]
    keep = drop_object_like_parts(torch.from_numpy(parts), torch.from_numpy(obj), torch.tensor(owner), max_iou=0.7)
    assert keep.tolist() == [False, True, True, True]
    assert drop_object_like_parts(np.zeros((0, 10, 10), bool), obj, []).shape == (0,)
    with pytest.raises(ValueError, match="object_index"):
        drop_object_like_parts(parts, obj, [0, 0, 2, 1])


@pytest.fixture
def collages(tmp_path, repo_script):
    store = _store(tmp_path)
    tool = repo_script("tools/make_collages.py")
    out = tmp_path / "collages"
    result = tool.main(
        [
            "--root",
            store,
            "--source",
            "shapes_train",
            "--stage",
            "ranking",
            "--output",
            str(out),
            "--drop-object-like",
            "0.5",
            "--tile-size",
            "64",
        ]
    )
    return tool, store, out, result


def test_make_and_summarize_collages(collages, tmp_path, repo_script):
    tool, store, out, result = collages
    assert result["collages"] == 6 and result["classes"] == 2  # part class 3 (= whole object) was dropped
    assert result["dropped_object_like"] == 2 * NUM_IMAGES and result["parts"] == 8 * NUM_IMAGES
    with open(out / "collages.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["object_class"], r["part_class"]) for r in rows] == [(str(c), str(p)) for c in (0, 1) for p in (0, 1, 2)]
    assert all(r["num_instances"] == str(NUM_IMAGES) and r["consistent"] == "" for r in rows)
    page = (out / "index.html").read_text()
    for r in rows:
        collage = cv2.imread(str(out / r["collage"]))
        assert collage.shape == (3 * 64 + 4 * 4,) * 2 + (3,)
        # 5 instances in the first 5 cells, each with red part pixels; the rest of the grid stays white
        cells = [
            collage[4 + rr * 68 : 4 + rr * 68 + 64, 4 + cc * 68 : 4 + cc * 68 + 64]
            for rr in range(3)
            for cc in range(3)
        ]
        red = [((c[..., 2] > 150) & (c[..., 1] < 80) & (c[..., 0] < 80)).sum() for c in cells]
        assert all(n > 20 for n in red[:NUM_IMAGES]) and all((c == 255).all() for c in cells[NUM_IMAGES:])
        assert f'src="{r["collage"]}"' in page
    # without the filter the whole-object "part" gets its collage too
    unfiltered = tool.main(
        [
            "--root",
            store,
            "--source",
            "shapes_train",
            "--stage",
            "ranking",
            "--output",
            str(tmp_path / "all"),
            "--tile-size",
            "64",
        ]
    )
    assert unfiltered["collages"] == 8 and unfiltered["dropped_object_like"] == 0
    # annotate: class 0 has 3 consistent parts, class 1 one
    answers = {
        ("0", "0"): "yes",
        ("0", "1"): "Y",
        ("0", "2"): "yes",
        ("1", "0"): "no",
        ("1", "1"): "yes",
        ("1", "2"): "n",
    }
    for r in rows:
        r["consistent"] = answers[(r["object_class"], r["part_class"])]
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summarize = repo_script("tools/summarize_collages.py")
    summary = summarize.main([str(filled), "--output", str(tmp_path / "summary.json")])
    assert summary["parts"] == 6 and summary["consistent_parts"] == 4
    assert summary["consistent_share"] == pytest.approx(100 * 4 / 6)
    assert summary["classes"] == 2 and summary["classes_with_min_consistent"] == 1
    assert os.path.isfile(tmp_path / "summary.json")
    from part_distillation.utils.errors import UserError

    with pytest.raises(UserError, match=r"row 2 .*answer yes or no"):
        summarize.main([str(out / "collages.csv")])  # not annotated yet


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(args, tmp_path):
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (scripts/install_deps.sh installs Debian's chromium)")
def test_collage_page_in_headless_chromium(collages, tmp_path):
    _, _, out, result = collages
    url = (out / "index.html").as_uri()
    dom = _browser(["--dump-dom", url], tmp_path).stdout
    total = re.search(r'data-images="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, dom[-500:]
    assert int(total.group(1)) == result["collages"] == int(loaded.group(1))  # every image resolved
    shot = tmp_path / "page.png"
    _browser(["--screenshot=" + str(shot), "--window-size=1000,900", url], tmp_path)
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (900, 1000) and picture.std() > 10
    assert (
        (picture[..., 2] > 150) & (picture[..., 1] < 80) & (picture[..., 0] < 80)
    ).sum() > 100  # red parts on screen
    # the page notices a missing collage
    os.remove(out / "collages" / os.listdir(out / "collages")[0] / "part_00.png")
    dom = _browser(["--dump-dom", url], tmp_path).stdout
    assert re.search(r'data-images-loaded="(\d+)"', dom).group(1) == str(result["collages"] - 1)
    assert "1 of 6 collages failed to load" in dom
