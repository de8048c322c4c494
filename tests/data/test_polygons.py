"""Polygon annotations (PartImageNet ships them) train through the LSJ mapper, including the
self-intersecting polygons real annotations contain, with the crop applied to the rasterised mask."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image

from part_distillation.data.dataset_mappers.instance_lsj import InstanceLSJDatasetMapper
from part_distillation.data.datasets import part_imagenet

from conftest import QUICK_STAGE0, tiny_quick_opts

SIZE = 96


def _poly(*xy):
    return [float(v) for v in xy]


# Per image: (part category id, polygons). Category ids index PART_IMAGENET_PART_CLASSES; 0-3 are
# Quadruped parts, 24-25 Car parts. The bowtie self-intersects (shapely calls such polygons invalid).
BOWTIE = _poly(10, 10, 60, 60, 60, 10, 10, 60)
IMAGES = [
    ("n01440764_1.JPEG", [(0, [_poly(8, 8, 40, 8, 40, 40, 8, 40)]), (1, [_poly(40, 40, 90, 40, 90, 90, 40, 90)])]),
    ("n01440764_2.JPEG", [(0, [BOWTIE]), (2, [_poly(62, 62, 94, 62, 78, 94)])]),
    (
        "n02814533_3.JPEG",
        [
            (24, [_poly(4, 4, 92, 4, 92, 50, 4, 50)]),
            (25, [_poly(10, 60, 30, 60, 30, 80, 10, 80), _poly(60, 60, 80, 60, 80, 80, 60, 80)]),
        ],
    ),
    ("n02814533_4.JPEG", [(24, [_poly(0, 0, 95, 0, 95, 95)]), (25, [BOWTIE])]),
]


def _write_part_imagenet_polygons(root):
    pin = root / "part_imagenet"
    images, annotations = [], []
    # R and G encode x and y (2 levels a pixel), so a crop's offset can be read back from its first pixel
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ramp = np.stack([2 * xx, 2 * yy, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    for image_id, (name, parts) in enumerate(IMAGES):
        images.append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
        path = pin / "images" / "train" / name.split("_")[0] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ramp).save(path, quality=100)
        for category_id, polygons in parts:
            xs, ys = np.concatenate([p[0::2] for p in polygons]), np.concatenate([p[1::2] for p in polygons])
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "bbox": bbox,
                    "segmentation": polygons,
                    "area": bbox[2] * bbox[3],
                }
            )
    categories = [
        {"id": i, "name": n, "supercategory": n.split(" ")[0]}
        for i, n in enumerate(part_imagenet.PART_IMAGENET_PART_CLASSES)
    ]
    (pin / "annotations").mkdir(parents=True)
    with open(pin / "annotations" / "train.json", "w") as f:
        json.dump({"categories": categories, "images": images, "annotations": annotations}, f)
    return pin


@pytest.fixture
def pin_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    yield _write_part_imagenet_polygons(tmp_path)
    monkeypatch.undo()
    part_imagenet.register_part_imagenet()


@pytest.mark.parametrize("view", ["part_imagenet_train", "part_imagenet_parts_train"])
def test_lsj_mapper_crops_polygons_like_masks(pin_root, view):
    records = DatasetCatalog.get(view)
    assert any(isinstance(a["segmentation"], list) for r in records for a in r["annotations"])
    # a zoom that always crops: the crop must cut polygons (detectron2 would need shapely here)
    augs = [
        T.ResizeScale(min_scale=2.0, max_scale=2.0, target_height=SIZE, target_width=SIZE),
        T.FixedSizeCrop(crop_size=(SIZE, SIZE), seg_pad_value=0),
    ]
    mapper = InstanceLSJDatasetMapper(is_train=True, augmentations=augs, image_format="RGB")
    for record in records:
        torch.manual_seed(0)
        np.random.seed(0)
        out = mapper(record)
        masks = out["instances"].gt_masks
        assert masks.dtype == torch.bool and masks.shape[1:] == (SIZE, SIZE)
        assert len(out["instances"]) >= 1
        # every kept mask is the 2x-upscaled polygon raster, cropped at the same offset as the image
        full = [
            polygons_to_bitmask(a["segmentation"], SIZE, SIZE).repeat(2, 0).repeat(2, 1) for a in record["annotations"]
        ]
        x0, y0 = (int(v) for v in out["image"][:2, 0, 0])  # the 2x-upscaled ramp: one level a pixel
        best = None
        for y in range(max(0, y0 - 3), min(SIZE, y0 + 3) + 1):
            for x in range(max(0, x0 - 3), min(SIZE, x0 + 3) + 1):
                expected = [m[y : y + SIZE, x : x + SIZE] for m in full]
                expected = [m for m in expected if m.any()]
                if len(expected) != len(masks):
                    continue
                error = max((got != want).mean() for got, want in zip(masks.numpy(), expected))
                best = error if best is None else min(best, error)
        assert best is not None and best < 0.02  # resize interpolation at the edges only


def test_stage0_trains_on_part_imagenet_polygons(pin_root, tmp_path):
    from part_distillation.engine import Trainer, load_cfg

    cfg = load_cfg(
        QUICK_STAGE0,
        tiny_quick_opts(tmp_path / "out", max_iter=3)
        + [
            "DATASETS.TRAIN",
            "('part_imagenet_train',)",
            "DATASETS.TEST",
            "()",
            "INPUT.IMAGE_SIZE",
            str(SIZE),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            str(len(part_imagenet.PART_IMAGENET_OBJECT_CLASSES)),
        ],
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    loss = trainer.storage.history("total_loss").latest()
    assert np.isfinite(loss) and loss > 0
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
