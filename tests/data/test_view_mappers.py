"""PairedViewDatasetMapper and KeypointDatasetMapper on small synthetic images (seconds on CPU)."""

import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import part_distillation.data.dataset_mappers.keypoints as kpm
import part_distillation.data.dataset_mappers.paired_view as pvm
import part_distillation.structures.geometry as geo
from part_distillation.data.dataset_mappers.registry import DATASET_MAPPER_REGISTRY
from part_distillation.utils.errors import ConfigError

H, W = 120, 160
BBOX = (35.0, 30.0, 90.0, 60.0)  # tight XYWH box of the ellipse object
DOT_RADIUS = 3
# (column, row) pixel indices of the keypoint dots, and their colours (RGB).
DOTS = [((60, 50), (255, 0, 0)), ((100, 55), (0, 255, 0)), ((80, 78), (0, 0, 255)), ((52, 70), (255, 255, 0))]
OUTSIDE_DOT = ((5, 5), (255, 0, 255))  # visible in the image, outside the bbox crop
FLIP = (1, 0, 2, 3, 4, 5, 6, 7)  # dots 0 and 1 are a left/right pair


def _smooth_image(h, w):
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    r = 90 + 50 * np.sin(xx / 13.0) + 20 * np.cos(yy / 17.0)
    g = 100 + 40 * np.cos((xx + yy) / 19.0)
    b = 110 + 45 * np.sin(yy / 11.0) * np.cos(xx / 23.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture
def scene(tmp_path):
    """Smooth RGB image with an elliptic object, its mask PNG (0/255), dots at the keypoints."""
    img = _smooth_image(H, W)
    yy, xx = np.mgrid[:H, :W]
    mask = ((xx + 0.5 - 80) / 45.0) ** 2 + ((yy + 0.5 - 60) / 30.0) ** 2 <= 1.0
    img[mask] = (img[mask] * 0.6 + 40).astype(np.uint8)
    keypoints = []
    for (c, r), colour in DOTS + [OUTSIDE_DOT]:
        img[r - DOT_RADIUS : r + DOT_RADIUS + 1, c - DOT_RADIUS : c + DOT_RADIUS + 1] = colour
        keypoints.append([c + 0.5, r + 0.5, 1.0])  # continuous coordinates of the dot's centre pixel
    keypoints.append([70.5, 60.5, 0.0])  # not visible in the record
    keypoints += [[140.5, 60.5, 1.0], [80.5, 115.5, 1.0]]  # outside the crop box in x only / in y only
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    record = {
        "file_name": str(tmp_path / "img.png"),
        "fg_mask_file": str(tmp_path / "mask.png"),
        "image_id": 7,
        "height": H,
        "width": W,
        "bbox": list(BBOX),
        "keypoints": keypoints,
    }
    return record, img, mask


@pytest.fixture
def blob(tmp_path):
    """64² black image with one Gaussian bright blob off-centre."""
    yy, xx = np.mgrid[:64, :64] + 0.5
    g = 250 * np.exp(-((xx - 36.5) ** 2 + (yy - 27.5) ** 2) / (2 * 2.5**2))
    img = np.repeat(g[..., None], 3, axis=2).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "blob.png")
    return {"file_name": str(tmp_path / "blob.png"), "image_id": 1}


def _paired(is_train=True, **kw):
    args = dict(image_format="RGB", image_size=64, scale=0.2, rotation=30.0, translation=8.0, bbox_jitter=0.0)
    args.update(kw)
    return pvm.PairedViewDatasetMapper(is_train=is_train, **args)


def _kp_mapper(is_train=False, **kw):
    args = dict(image_format="RGB", image_size=96, bbox_jitter=0.0)
    args.update(kw)
    return kpm.KeypointDatasetMapper(is_train=is_train, **args)


def _centroid(img_chw):
    w = img_chw.float().sum(0)
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]) + 0.5, torch.arange(w.shape[1]) + 0.5, indexing="ij")
    return torch.stack([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


def _erode(mask, k=5):
    return torch.from_numpy(cv2.erode(mask.numpy().astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------- paired views
def test_registered_and_config_keys():
    from detectron2.config import get_cfg
    from detectron2.config import CfgNode as CN

    assert "PairedViewDatasetMapper" in DATASET_MAPPER_REGISTRY
    assert "KeypointDatasetMapper" in DATASET_MAPPER_REGISTRY
    cfg = get_cfg()
    m = pvm.PairedViewDatasetMapper(cfg, is_train=True)  # no PAIRED_VIEW node: defaults
    assert (m.image_size, m.scale, m.rotation, m.translation) == (256, 0.05, 15.0, 5.0)
    cfg.INPUT.PAIRED_VIEW = CN({"IMAGE_SIZE": 128, "ROTATION": 30.0})
    cfg.INPUT.KEYPOINT_VIEW = CN({"IMAGE_SIZE": 448, "CROP_TO_BBOX": False, "FLIP_INDICES": list(FLIP)})
    m = pvm.PairedViewDatasetMapper(cfg, is_train=True)
    assert (m.image_size, m.rotation, m.scale) == (128, 30.0, 0.05)
    k = kpm.KeypointDatasetMapper(cfg, is_train=True)
    assert (k.image_size, k.crop_to_bbox, k.flip_indices) == (448, False, FLIP)
    with pytest.raises(ConfigError, match="SCALE"):
        pvm.PairedViewDatasetMapper(is_train=True, scale=1.5)


def test_paired_view_outputs(scene):
    record, _, gt_mask = scene
    np.random.seed(0)
    out = _paired()(record)
    s = 64
    for key in ("image", "image2"):
        assert out[key].shape == (3, s, s) and out[key].dtype == torch.uint8
    for key in ("fg_mask", "fg_mask2", "valid2"):
        assert out[key].shape == (s, s) and out[key].dtype == torch.bool
    assert out["transform"].shape == (2, 3) and out["transform"].dtype == torch.float32
    assert (out["height"], out["width"], out["orig_size"], out["image_id"]) == (s, s, (H, W), 7)
    assert "keypoints" not in out and "bbox" not in out
    assert not out["fg_mask2"][~out["valid2"]].any()
    # orig_transform maps the object's centroid in the original image to the view-1 mask centroid
    ys, xs = np.nonzero(gt_mask)
    c_orig = np.array([[xs.mean() + 0.5, ys.mean() + 0.5]])
    c_view = _centroid(out["fg_mask"][None]).numpy()
    assert np.abs(geo.apply_affine(out["orig_transform"].numpy(), c_orig)[0] - c_view).max() < 1.0


def test_view2_is_view1_warped_by_transform(scene):
    record, _, _ = scene
    mapper = _paired(crop_to_bbox=False)
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(record)
        a = out["transform"]
        assert not torch.allclose(a, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        inner = _erode(out["valid2"])
        assert inner.float().mean() > 0.4
        warped = geo.warp_to_view2(out["image"][None].float(), a)[0]
        assert (warped - out["image2"].float()).abs()[:, inner].mean() < 2.0
        # independent check of the coordinate convention with OpenCV (pixel-centre coordinates)
        cv = cv2.warpAffine(
            out["image"].permute(1, 2, 0).numpy(), geo.affine_for_cv2(a.numpy()), (64, 64), flags=cv2.INTER_LINEAR
        )
        cv = torch.from_numpy(cv).permute(2, 0, 1).float()
        assert (cv - out["image2"].float()).abs()[:, inner].mean() < 2.0
        # masks: nearest warp of the view-1 mask, zero outside view 1
        m2 = geo.warp_to_view2(out["fg_mask"][None, None].float(), a, mode="nearest")[0, 0] > 0.5
        assert (m2 & out["valid2"]).eq(out["fg_mask2"]).float().mean() > 0.99
        # inverse helper: view 2 warped back matches view 1 where both are defined
        back = geo.warp_to_view1(out["image2"][None].float(), a)[0]
        valid1 = _erode(geo.warp_to_view1(out["valid2"][None, None].float(), a, mode="nearest")[0, 0] > 0.5)
        assert (back - out["image"].float()).abs()[:, valid1].mean() < 4.0
        assert torch.allclose(geo.invert_affine(geo.invert_affine(a.double())), a.double(), atol=1e-6)


def test_transform_maps_blob_centroid(blob):
    mapper = _paired(crop_to_bbox=False, flip_prob=0.0)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(blob)
        c1, c2 = _centroid(out["image"]), _centroid(out["image2"])
        assert c1.sub(torch.tensor([36.5, 27.5])).abs().max() < 0.1
        mapped = geo.apply_affine(out["transform"].double(), c1[None].double())[0]
        assert (mapped - c2.double()).abs().max() < 0.3, (seed, mapped, c2)


def test_warp_lower_resolution_maps_with_image_size(scene):
    record, _, _ = scene
    np.random.seed(3)
    out = _paired(crop_to_bbox=False, rotation=10.0)(record)
    f1 = F.avg_pool2d(out["image"][None].float(), 4)  # a stride-4 "feature map" of view 1
    f2 = F.avg_pool2d(out["image2"][None].float(), 4)
    warped = geo.warp_to_view2(f1, out["transform"], image_size=(64, 64))
    inner = _erode(-F.max_pool2d(-out["valid2"][None, None].float(), 4)[0, 0] > 0.5, 3)
    assert inner.any()
    err = (warped - f2).abs()[0][:, inner].mean()
    wrong = (geo.warp_to_view2(f1, out["transform"]) - f2).abs()[0][:, inner].mean()  # A read as 16-px units
    assert err < 4.0 and err < wrong


def test_identity_parameters_give_identical_views(scene):
    record, _, _ = scene
    out = _paired(scale=0.0, rotation=0.0, translation=0.0)(record)
    assert torch.equal(out["image"], out["image2"])
    assert torch.equal(out["fg_mask"], out["fg_mask2"])
    assert out["valid2"].all()
    assert torch.allclose(out["transform"], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_paired_flip_moves_image_and_mask_together(scene):
    record, _, _ = scene
    plain = _paired(flip_prob=0.0)(record)
    flipped = _paired(flip_prob=1.0)(record)
    assert flipped["flipped"] and not plain["flipped"]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["fg_mask"], plain["fg_mask"].flip(-1))
    fx = flipped["orig_transform"].numpy()
    px = plain["orig_transform"].numpy()
    assert np.allclose(fx[0], [-px[0, 0], -px[0, 1], 64 - px[0, 2]]) and np.allclose(fx[1], px[1])


def test_paired_eval_is_deterministic(scene):
    record, _, _ = scene
    mapper = _paired(is_train=False, flip_prob=1.0, bbox_jitter=0.1)
    np.random.seed(0)
    a = mapper(record)
    np.random.seed(1)
    b = mapper(record)
    assert "image2" not in a and not a["flipped"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["fg_mask"], b["fg_mask"])
    assert a["crop_box"] == b["crop_box"] == (31, 11, 130, 110)  # margin 5%, squared, no jitter
    assert torch.equal(a["transform"], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_sem_seg_file_as_foreground(scene, tmp_path):
    record, _, gt_mask = scene
    labels = np.where(gt_mask, 3, 0).astype(np.uint8)
    labels[:2] = 255  # ignore label counts as background
    Image.fromarray(labels).save(tmp_path / "labels.png")
    rec = {k: v for k, v in record.items() if k != "fg_mask_file"}
    rec["sem_seg_file_name"] = str(tmp_path / "labels.png")
    a = _paired(is_train=False)(rec)
    b = _paired(is_train=False)(record)
    assert torch.equal(a["fg_mask"], b["fg_mask"])


def test_annotation_union_as_foreground(scene):
    """Without a mask file, the union of the record's (non-crowd) annotation masks is the fg mask."""
    from pycocotools import mask as mask_util

    record, _, gt_mask = scene
    rec = {k: v for k, v in record.items() if k != "fg_mask_file"}
    left, right = gt_mask.copy(), gt_mask.copy()
    left[:, 80:], right[:, :80] = False, False  # the object as two part annotations
    crowd = np.zeros_like(gt_mask)
    crowd[:10, :10] = True  # ignored: crowd
    rec["annotations"] = [
        {"segmentation": mask_util.encode(np.asfortranarray(m.astype(np.uint8))), "iscrowd": int(m is crowd)}
        for m in (left, right, crowd)
    ]
    a = _paired(is_train=False)(rec)
    b = _paired(is_train=False)(record)
    assert torch.equal(a["fg_mask"], b["fg_mask"])
    rec["annotations"] = [{"bbox": [0, 0, 4, 4]}]  # no segmentation: no mask
    assert "fg_mask" not in _paired(is_train=False)(rec)


@pytest.mark.parametrize("mapper_fn", [_paired, _kp_mapper])
def test_bad_files_return_none_with_warning(scene, tmp_path, mapper_fn):
    record, _, _ = scene
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    from part_distillation.data.skips import reset_skip_counts

    reset_skip_counts()  # skips are logged in full only for the first few of each reason in a process
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("part_distillation.data.skips", pvm.__name__)]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        assert mapper_fn()(dict(record, file_name=str(tmp_path / "broken.jpg"))) is None
        assert mapper_fn()(dict(record, fg_mask_file=str(tmp_path / "missing.png"))) is None
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert any("broken.jpg" in m for m in handler.messages)
    assert any("missing.png" in m for m in handler.messages)


# ---------------------------------------------------------------- keypoints
def _assert_on_dots(out, colour_of):
    img = out["image"].permute(1, 2, 0).numpy().astype(int)
    kps = out["keypoints"].numpy()
    for i, colour in colour_of.items():
        x, y, v = kps[i]
        assert v == 1.0, i
        pix = img[int(np.floor(y)), int(np.floor(x))]
        assert np.abs(pix - np.array(colour)).max() < 40, (i, pix, colour)


def test_keypoints_follow_crop_and_resize(scene):
    record, _, _ = scene
    out = _kp_mapper()(record)
    assert out["image"].shape == (3, 96, 96) and (out["height"], out["width"]) == (96, 96)
    assert out["keypoints"].shape == (len(DOTS) + 4, 3) and out["keypoints"].dtype == torch.float32
    assert out["fg_mask"].shape == (96, 96) and out["orig_size"] == (H, W)
    _assert_on_dots(out, {i: c for i, (_, c) in enumerate(DOTS)})
    vis = out["keypoints"][:, 2]
    assert vis[len(DOTS)] == 0  # the dot outside the crop box
    assert vis[len(DOTS) + 1] == 0  # invisible in the record stays invisible
    assert vis[len(DOTS) + 2] == 0 and vis[len(DOTS) + 3] == 0  # right of / below the crop box
    # the transform maps back to the original annotation
    orig = np.array(record["keypoints"])[: len(DOTS), :2]
    back = kpm.points_to_original(out["keypoints"][: len(DOTS), :2], out["transform"])
    assert np.allclose(back.numpy(), orig, atol=1e-3)


def test_keypoints_shorter_side_protocol(scene):
    record, _, _ = scene
    # Choudhury FG protocol: tight bbox (90x60) → shorter side 72 (108x72) → centre-cut to /16 (96x64)
    out = _kp_mapper(
        image_size=72, bbox_margin=0.0, bbox_square=False, resize_mode="shorter_side", size_divisibility=16
    )(record)
    assert out["image"].shape == (3, 64, 96) and (out["height"], out["width"]) == (64, 96)
    assert out["crop_box"] == (35, 30, 125, 90)
    _assert_on_dots(out, {i: c for i, (_, c) in enumerate(DOTS)})
    # no crop: the outside dot is kept
    out = _kp_mapper(crop_to_bbox=False, image_size=128)(record)
    _assert_on_dots(out, {i: c for i, (_, c) in enumerate(DOTS + [OUTSIDE_DOT])})


def test_keypoint_flip_consistency(scene):
    record, _, _ = scene
    plain = _kp_mapper(is_train=True, flip_prob=0.0, flip_indices=FLIP)(record)
    flipped = _kp_mapper(is_train=True, flip_prob=1.0, flip_indices=FLIP)(record)
    assert flipped["flipped"]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["fg_mask"], plain["fg_mask"].flip(-1))
    expect = plain["keypoints"][list(FLIP)].clone()
    expect[:, 0] = 96 - expect[:, 0]
    assert torch.allclose(flipped["keypoints"], expect)
    # ids swapped: keypoint 0 now sits on dot 1's colour and vice versa
    _assert_on_dots(flipped, {0: DOTS[1][1], 1: DOTS[0][1], 2: DOTS[2][1], 3: DOTS[3][1]})


def test_keypoint_eval_deterministic(scene):
    record, _, _ = scene
    mapper = _kp_mapper(is_train=False, flip_prob=1.0, bbox_jitter=0.1)
    np.random.seed(0)
    a = mapper(record)
    np.random.seed(5)
    b = mapper(record)
    assert not a["flipped"] and torch.equal(a["image"], b["image"])
    assert torch.equal(a["keypoints"], b["keypoints"]) and torch.equal(a["transform"], b["transform"])


def test_flip_indices_from_dataset_metadata():
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("view_mappers_kp_ds").set(
        keypoint_names=["nose", "left eye", "right eye"], keypoint_flip_map=[("left eye", "right eye")]
    )
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("view_mappers_kp_ds",)
    assert kpm.KeypointDatasetMapper(cfg, is_train=True).flip_indices == (0, 2, 1)
    assert kpm.KeypointDatasetMapper(cfg, is_train=False).flip_prob == 0.0
    assert kpm.keypoint_flip_indices_from_metadata(["view_mappers_no_meta"]) is None
