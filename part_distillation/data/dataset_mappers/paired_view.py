"""Paired-view mapper for the reconstruction / equivariance part-discovery heads, and what it shares with the keypoint
view mapper (crop, resize, flip, the output fields).

The base view is the (optionally bbox-cropped) image resized to a square ``image_size``, flipped at random
when training. By default view 1 is the base view and view 2 the base view warped by a random similarity
transform ``A`` (scale, rotation about the image centre, translation). With ``independent_warps``
(``INPUT.PAIRED_VIEW.INDEPENDENT_WARPS``) each view is the base view under its own random similarity, ``A1``
and ``A2``, as PartFormer (Xia et al., TPAMI 2024, §4.3: "randomly scale (±5%), rotate (±15°) and translate
(±5px) each input image" twice); ``transform`` is then ``A = A2 · A1⁻¹`` (view 1 → view 2) and ``valid1``
marks the view-1 pixels that come from inside the base view. Choudhury et al. (NeurIPS 2021) draw their
equivariance warp (TPS around a similarity, rotation ±60°, zoom [0.7, 2], ±10% shift) on the GPU inside
the model; for that head use this mapper's view 1 (and fg mask) and ignore view 2, or set the ranges
wide.

Coordinates, ``transform`` and the warps: see :mod:`part_distillation.structures.geometry`.

Border handling of view 2: ``valid2`` marks view-2 pixels whose centre maps (by ``A⁻¹``) inside view 1's
extent ``[0, W] × [0, H]``. Inside it the image is bilinearly sampled with the border clamped (so no fill
bleeds in); outside it the image is ``warp_fill`` (default 0, black, as PartFormer's ``cv2.warpAffine``
border) and the mask is 0 (background).
"""

import copy
import logging
import math

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

from ...structures.geometry import (
    as_affine,
    invert_affine,
    random_similarity,
    sample_at,
    sampling_grid,
    to_3x3,
    warp_to_view2,
)
from ...utils.errors import ConfigError
from .instance_lsj import read_image_or_none
from .part_eval import decode_segmentation
from .registry import DATASET_MAPPER_REGISTRY

__all__ = [
    "PairedViewDatasetMapper",
    "PadCropTransform",
    "object_crop_box",
    "build_view_transforms",
    "transforms_to_matrix",
    "read_fg_mask",
    "xywh_to_xyxy",
    "VIEW_KEYS",
    "PAIRED_VIEW_KEYS",
    "view_args_from_cfg",
    "read_view_inputs",
    "init_view_args",
    "set_view_fields",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# View-1 geometry: crop around the object (padding outside the image), resize, flip.
# --------------------------------------------------------------------------------------------------
class PadCropTransform(T.Transform):
    """Crop the integer box ``[x0, x0+w) × [y0, y0+h)``, which may extend past the image.

    Pixels outside the image become ``fill`` (images) or ``seg_fill`` (masks); detectron2's
    ``CropTransform`` cannot do that, and the papers' bbox crops with a margin often leave the image.
    """

    def __init__(self, x0: int, y0: int, w: int, h: int, fill: int = 0, seg_fill: int = 0):
        super().__init__()
        self._set_attributes(locals())

    def _crop(self, img: np.ndarray, fill) -> np.ndarray:
        out = np.full((self.h, self.w) + img.shape[2:], fill, dtype=img.dtype)
        H, W = img.shape[:2]
        sx0, sy0 = max(self.x0, 0), max(self.y0, 0)
        sx1, sy1 = min(self.x0 + self.w, W), min(self.y0 + self.h, H)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - self.y0 : sy1 - self.y0, sx0 - self.x0 : sx1 - self.x0] = img[sy0:sy1, sx0:sx1]
        return out

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._crop(img, self.fill)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._crop(segmentation, self.seg_fill)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] -= self.x0
        coords[:, 1] -= self.y0
        return coords


def object_crop_box(bbox_xywh, margin: float, square: bool, jitter: float = 0.0):
    """Integer crop box ``(x0, y0, w, h)`` around ``bbox_xywh``; None for a degenerate box.

    Each side is pushed out by ``margin`` (+ U(−jitter, jitter) per side, drawn with ``np.random``) times
    the box width (left/right) or height (top/bottom), as Choudhury et al.'s CUB loader does with the
    CMR box (margin 0.05, jitter 0.05 at train time). ``square`` then grows the short side about the
    centre. Without ``square`` the corner is floored and the size truncated, so margin 0 reproduces
    their evaluation crop ``img[int(y):int(y)+int(h), int(x):int(x)+int(w)]``.
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    if not (w > 0 and h > 0) or not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    m = np.full(4, float(margin))
    if jitter > 0:
        m = m + np.random.uniform(-jitter, jitter, size=4)
    x0, x1 = x - m[0] * w, x + w + m[1] * w
    y0, y1 = y - m[2] * h, y + h + m[3] * h
    if square:
        side = max(1, int(round(max(x1 - x0, y1 - y0))))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return int(math.floor(cx - side / 2 + 0.5)), int(math.floor(cy - side / 2 + 0.5)), side, side
    ix0, iy0 = int(math.floor(x0)), int(math.floor(y0))
    return ix0, iy0, max(1, int(x1 - x0)), max(1, int(y1 - y0))


def build_view_transforms(
    image_hw,
    *,
    crop_box=None,
    image_size: int = 256,
    resize_mode: str = "square",
    size_divisibility: int = 0,
    flip: bool = False,
    crop_fill: int = 0,
) -> T.TransformList:
    """Crop (``crop_box`` XYWH ints, or None) → resize → centre-cut to ``size_divisibility`` → h-flip.

    ``resize_mode``: ``"square"`` resizes to ``image_size²`` without keeping the aspect ratio (PartFormer,
    MPAE test, and Choudhury's square CMR crops); ``"shorter_side"`` resizes the shorter side to
    ``image_size`` (longer side truncated, like torchvision's ``Resize(int)``), as Choudhury's evaluation.
    The image is resized with PIL bilinear (anti-aliased when shrinking), masks with nearest.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    tfms = []
    if crop_box is not None:
        x0, y0, cw, ch = (int(v) for v in crop_box)
        tfms.append(PadCropTransform(x0, y0, cw, ch, fill=crop_fill, seg_fill=0))
        h, w = ch, cw
    if resize_mode == "square":
        new_h = new_w = int(image_size)
    elif resize_mode == "shorter_side":
        if h <= w:
            new_h, new_w = int(image_size), max(1, int(image_size * w / h))
        else:
            new_h, new_w = max(1, int(image_size * h / w)), int(image_size)
    else:
        raise ConfigError(f"resize_mode={resize_mode!r} must be 'square' or 'shorter_side'.")
    tfms.append(T.ResizeTransform(h, w, new_h, new_w, Image.BILINEAR))
    if size_divisibility and size_divisibility > 1:
        cut_h = max(size_divisibility, new_h - new_h % size_divisibility)
        cut_w = max(size_divisibility, new_w - new_w % size_divisibility)
        if (cut_h, cut_w) != (new_h, new_w):
            tfms.append(PadCropTransform((new_w - cut_w) // 2, (new_h - cut_h) // 2, cut_w, cut_h, crop_fill, 0))
            new_h, new_w = cut_h, cut_w
    if flip:
        tfms.append(T.HFlipTransform(new_w))
    return T.TransformList(tfms)


def transforms_to_matrix(tfms) -> np.ndarray:
    """The 2×3 matrix (float64) of a composition of affine detectron2 transforms (crop, resize, flip)."""
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = tfms.apply_coords(pts.copy())
    return np.stack([out[1] - out[0], out[2] - out[0], out[0]], axis=1)


def read_fg_mask(dataset_dict: dict, image_hw, sem_seg_ignore_value: int = 255):
    """Foreground mask (bool H×W) of the record, or None when it names no mask file.

    ``fg_mask_file``: a binary PNG; a mask whose maximum is ≤ 1 ({0, 1}, e.g. Choudhury's
    ``supervisedlabels``) is foreground where > 0, otherwise where ≥ 128 (e.g. CUB's soft 0–255
    segmentations; colour masks use their brightest channel). ``sem_seg_file_name`` (used when there is
    no ``fg_mask_file``): a label map, foreground where the label is neither 0 (background) nor
    ``sem_seg_ignore_value``; for colour-coded maps, where any channel is non-zero. ``parsing_file_name``
    (DeepFashion's colour-coded ``_segment.png``, Choudhury et al. 2021 train on its foreground): decoded with
    the dataset's palette, foreground where the label is not 0 (black). Otherwise, the union of the record's
    (non-crowd) ``annotations`` masks, when it has any with a ``segmentation``.
    Raises OSError/ValueError for an unreadable file or a size that differs from the image.
    """
    if dataset_dict.get("fg_mask_file"):
        path = dataset_dict["fg_mask_file"]
        arr = utils.read_image(path)
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=2)
        if arr.dtype == bool:
            fg = arr
        else:
            fg = arr > 0 if arr.max() <= 1 else arr >= 128
    elif dataset_dict.get("sem_seg_file_name"):
        path = dataset_dict["sem_seg_file_name"]
        arr = utils.read_image(path)
        if arr.ndim == 3:
            fg = (arr[..., :3] != 0).any(axis=2)
        else:
            fg = (arr != 0) & (arr != sem_seg_ignore_value)
    elif dataset_dict.get("parsing_file_name"):
        from ..datasets.deepfashion import decode_parsing

        path = dataset_dict["parsing_file_name"]
        fg = decode_parsing(path) != 0
    elif any("segmentation" in a for a in dataset_dict.get("annotations", [])):
        # instance/part annotations (toyparts, PartImageNet, COCO-style): the GT foreground is their union
        fg = np.zeros(tuple(image_hw), dtype=bool)
        try:
            for a in dataset_dict["annotations"]:
                if "segmentation" in a and not a.get("iscrowd", 0):
                    fg |= decode_segmentation(a["segmentation"], *image_hw)
        except ValueError as e:
            raise ValueError(f"the annotations of {dataset_dict.get('file_name')}: {e}") from None
        return fg
    else:
        return None
    if fg.shape != tuple(image_hw):
        raise ValueError(f"mask {path} is {fg.shape[1]}x{fg.shape[0]} but the image is {image_hw[1]}x{image_hw[0]}")
    return np.ascontiguousarray(fg)


def xywh_to_xyxy(crop_box):
    """XYWH crop box → (x0, y0, x1, y1) tuple; None stays None."""
    if crop_box is None:
        return None
    x0, y0, w, h = crop_box
    return (x0, y0, x0 + w, y0 + h)


def _read_fg_mask_or_skip(dataset_dict: dict, image_hw):
    """``(mask or None, ok)``; on a bad mask file log why and return ``(None, False)``."""
    try:
        return read_fg_mask(dataset_dict, image_hw), True
    except (OSError, ValueError, SyntaxError) as e:
        logger.warning("Skipping %s, unreadable foreground mask: %s", dataset_dict.get("file_name"), e)
        return None, False


# --------------------------------------------------------------------------------------------------
# The mapper.
# --------------------------------------------------------------------------------------------------
# Constructor argument ← config key, for the arguments every view mapper (this one and
# KeypointDatasetMapper) takes; each mapper reads them under its own cfg.INPUT group.
VIEW_KEYS = {
    "image_size": "IMAGE_SIZE",
    "flip_prob": "FLIP_PROB",
    "crop_to_bbox": "CROP_TO_BBOX",
    "bbox_margin": "BBOX_MARGIN",
    "bbox_square": "BBOX_SQUARE",
    "bbox_jitter": "BBOX_JITTER",
    "crop_fill": "CROP_FILL",
}
# Constructor argument ← key under cfg.INPUT.PAIRED_VIEW (read only when the node exists).
PAIRED_VIEW_KEYS = {
    **VIEW_KEYS,
    "scale": "SCALE",
    "rotation": "ROTATION",
    "translation": "TRANSLATION",
    "warp_fill": "WARP_FILL",
    "independent_warps": "INDEPENDENT_WARPS",
}


def view_args_from_cfg(cfg, is_train: bool, group: str, keys: dict) -> dict:
    """``from_config`` arguments of the view mappers: ``is_train``, ``image_format`` (cfg.INPUT.FORMAT) and
    each constructor argument of ``keys`` whose key exists under ``cfg.INPUT.<group>``; absent keys (or
    no node at all) leave the constructor defaults, so configs without the group still build."""
    args = {"is_train": is_train, "image_format": cfg.INPUT.FORMAT}
    if group in cfg.INPUT:
        node = cfg.INPUT[group]
        args.update({arg: node[key] for arg, key in keys.items() if key in node})
    return args


def read_view_inputs(mapper, dataset_dict: dict):
    """``(dataset_dict copy, image, fg mask or None, XYWH crop box or None)``, or None to skip the record.

    The first steps of the view mappers (:class:`PairedViewDatasetMapper`, ``KeypointDatasetMapper``),
    which read the same record fields and crop the same way; ``mapper`` supplies ``image_format``,
    ``is_train`` and the ``crop_to_bbox``/``bbox_*`` settings (bbox jitter is training-only). The crop box is
    drawn before any flip so that both mappers consume random numbers in the same order.
    """
    dataset_dict = copy.deepcopy(dataset_dict)
    image = read_image_or_none(dataset_dict, mapper.image_format)
    if image is None:
        return None
    mask, ok = _read_fg_mask_or_skip(dataset_dict, image.shape[:2])
    if not ok:
        return None
    crop_box = None
    if mapper.crop_to_bbox and dataset_dict.get("bbox") is not None:
        jitter = mapper.bbox_jitter if mapper.is_train else 0.0
        crop_box = object_crop_box(dataset_dict["bbox"], mapper.bbox_margin, mapper.bbox_square, jitter)
    return dataset_dict, image, mask, crop_box


def init_view_args(
    mapper,
    *,
    is_train,
    image_format,
    image_size,
    flip_prob,
    crop_to_bbox,
    bbox_margin,
    bbox_square,
    bbox_jitter,
    crop_fill,
    group: str,
):
    """Check the constructor arguments of :data:`VIEW_KEYS` (errors name the key under
    ``cfg.INPUT.<group>``) and set them, with ``is_train`` and ``image_format``, on ``mapper``.

    ``flip_prob`` is only checked: the mappers differ on whether evaluation keeps it.
    """
    name = type(mapper).__name__

    def bad(arg, value, why):
        raise ConfigError(f"{name}: {arg}={value!r} {why} (cfg.INPUT.{group}.{arg.upper()}).")

    if int(image_size) < 1:
        bad("image_size", image_size, "must be a positive integer")
    if not 0.0 <= flip_prob <= 1.0:
        bad("flip_prob", flip_prob, "must be in [0, 1]")
    if bbox_margin < 0 or bbox_jitter < 0:
        bad("bbox_margin" if bbox_margin < 0 else "bbox_jitter", min(bbox_margin, bbox_jitter), "must be ≥ 0")
    if not 0 <= int(crop_fill) <= 255:
        bad("crop_fill", crop_fill, "must be a grey level in [0, 255]")
    mapper.is_train = is_train
    mapper.image_format = image_format
    mapper.image_size = int(image_size)
    mapper.crop_to_bbox = bool(crop_to_bbox)
    mapper.bbox_margin, mapper.bbox_square = float(bbox_margin), bool(bbox_square)
    mapper.bbox_jitter = float(bbox_jitter)
    mapper.crop_fill = int(crop_fill)


def set_view_fields(dataset_dict: dict, view: np.ndarray, tfms, *, mask, flip, crop_box, orig_hw, transform_key: str):
    """The output fields every view mapper sets on ``dataset_dict`` (in place; returned): ``image`` (``view``, H×W×C
    uint8, as C×H×W), ``transform_key`` (the 2×3 matrix of ``tfms``, original → view pixels), ``flipped``,
    ``crop_box`` (XYXY or None), ``orig_size``, the view's ``height``/``width``, ``image_id`` and, when ``mask``
    (original resolution) is given, ``fg_mask`` (bool H×W, ``tfms`` applied). Fields in original coordinates
    (``annotations``, ``object_annotations``, ``keypoints``, ``bbox``) are dropped."""
    for key in ("annotations", "object_annotations", "keypoints", "bbox"):
        dataset_dict.pop(key, None)
    dataset_dict.update(
        {
            "image": torch.as_tensor(view.transpose(2, 0, 1).copy()),
            transform_key: torch.as_tensor(transforms_to_matrix(tfms), dtype=torch.float32),
            "flipped": bool(flip),
            "crop_box": xywh_to_xyxy(crop_box),
            "orig_size": (int(orig_hw[0]), int(orig_hw[1])),
            "height": int(view.shape[0]),
            "width": int(view.shape[1]),
            "image_id": dataset_dict.get("image_id"),
        }
    )
    if mask is not None:
        fg = tfms.apply_segmentation(mask.astype(np.uint8)) > 0
        dataset_dict["fg_mask"] = torch.as_tensor(np.ascontiguousarray(fg))
    return dataset_dict


@DATASET_MAPPER_REGISTRY.register()
class PairedViewDatasetMapper:
    """Dataset dict → two geometrically related views for reconstruction / equivariance losses.

    Record fields read: ``file_name``, optional ``fg_mask_file`` or ``sem_seg_file_name`` (see
    :func:`read_fg_mask`), optional ``bbox`` (XYWH, original pixels), ``image_id``.

    Output (training):
      ``image``, ``image2``: uint8 C×S×S (``image_format`` channel order); ``fg_mask``, ``fg_mask2``:
      bool S×S (only when the record has a mask); ``valid1`` (``independent_warps`` only): bool S×S, view-1
      pixels that come from inside the base view; ``valid2``: bool S×S, view-2 pixels that come from
      inside view 1; ``transform``: float32 2×3 ``A``, view-1 → view-2 pixel coordinates (module
      docstring); ``orig_transform``: float32 2×3, original-image → view-1 pixel coordinates (crop,
      resize and flip); ``flipped``; ``crop_box`` (x0, y0, x1, y1) in original pixels or None;
      ``orig_size`` (H0, W0); ``height``/``width`` = S (the view size, not the original's);
      ``image_id``, ``file_name``. Fields in original coordinates (``annotations``, ``keypoints``,
      ``bbox``) are dropped; use :class:`KeypointDatasetMapper` for keypoints.
    Evaluation (``is_train=False``): deterministic: no flip, no bbox jitter, no second view (no
      ``image2``/``fg_mask2``/``valid2``) and ``transform`` = identity.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        image_format: str = "BGR",
        image_size: int = 256,
        scale: float = 0.05,
        rotation: float = 15.0,
        translation: float = 5.0,
        flip_prob: float = 0.5,
        crop_to_bbox: bool = True,
        bbox_margin: float = 0.05,
        bbox_square: bool = True,
        bbox_jitter: float = 0.05,
        crop_fill: int = 255,
        warp_fill: int = 0,
        independent_warps: bool = False,
    ):
        """
        Args:
            image_size: side S of both square views (Choudhury 256; PartFormer 256; MPAE 448 CUB / 224).
            scale: view-2 zoom factor ~ U[1 − scale, 1 + scale] (PartFormer ±5%).
            rotation: view-2 angle ~ U[−rotation, rotation] degrees (PartFormer ±15°).
            translation: view-2 shift ~ U[−translation, translation] pixels per axis (PartFormer ±5 px).
            flip_prob: horizontal-flip probability of view 1 at training (shared by both views).
            crop_to_bbox: crop around the record's ``bbox`` when it has one (Choudhury's CUB loader).
            bbox_margin, bbox_square, bbox_jitter: see :func:`object_crop_box`; jitter is training-only.
            crop_fill: grey level of crop pixels outside the image (Choudhury: white).
            warp_fill: grey level of view-2 pixels outside view 1 (PartFormer's cv2 border: black).
            independent_warps: warp both views, each by its own random similarity (module docstring).
        """
        init_view_args(
            self,
            is_train=is_train,
            image_format=image_format,
            image_size=image_size,
            flip_prob=flip_prob,
            crop_to_bbox=crop_to_bbox,
            bbox_margin=bbox_margin,
            bbox_square=bbox_square,
            bbox_jitter=bbox_jitter,
            crop_fill=crop_fill,
            group="PAIRED_VIEW",
        )
        for arg, value in (("scale", scale), ("rotation", rotation), ("translation", translation)):
            if value < 0 or (arg == "scale" and value >= 1):
                raise ConfigError(
                    f"{type(self).__name__}: {arg}={value!r} must be ≥ 0{' and < 1' if arg == 'scale' else ''} "
                    f"(cfg.INPUT.PAIRED_VIEW.{arg.upper()})."
                )
        if not 0 <= int(warp_fill) <= 255:
            raise ConfigError(
                f"{type(self).__name__}: warp_fill={warp_fill!r} must be in [0, 255] (cfg.INPUT.PAIRED_VIEW.WARP_FILL)."
            )
        self.scale, self.rotation, self.translation = float(scale), float(rotation), float(translation)
        self.flip_prob = float(flip_prob)
        self.warp_fill = int(warp_fill)
        self.independent_warps = bool(independent_warps)
        logger.info(
            "%s (%s): size %d, scale ±%g, rotation ±%g°, translation ±%g px, flip %g, "
            "bbox crop %s (margin %g, square %s, jitter %g)",
            type(self).__name__,
            "train" if is_train else "test",
            self.image_size,
            self.scale,
            self.rotation,
            self.translation,
            self.flip_prob,
            self.crop_to_bbox,
            self.bbox_margin,
            self.bbox_square,
            self.bbox_jitter,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return view_args_from_cfg(cfg, is_train, "PAIRED_VIEW", PAIRED_VIEW_KEYS)

    def __call__(self, dataset_dict: dict):
        inputs = read_view_inputs(self, dataset_dict)
        if inputs is None:
            return None
        dataset_dict, image, mask, crop_box = inputs
        orig_hw = image.shape[:2]
        flip = self.is_train and self.flip_prob > 0 and np.random.rand() < self.flip_prob
        tfms = build_view_transforms(
            orig_hw, crop_box=crop_box, image_size=self.image_size, flip=flip, crop_fill=self.crop_fill
        )
        view1 = np.ascontiguousarray(tfms.apply_image(image))
        set_view_fields(
            dataset_dict,
            view1,
            tfms,
            mask=mask,
            flip=flip,
            crop_box=crop_box,
            orig_hw=orig_hw,
            transform_key="orig_transform",
        )
        size = self.image_size
        if not self.is_train:
            dataset_dict["transform"] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            return dataset_dict

        base, base_mask = dataset_dict["image"], dataset_dict.get("fg_mask")
        a = random_similarity((size, size), self.scale, self.rotation, self.translation)
        image2, mask2, valid2 = self.warp_view(base, base_mask, a)
        if self.independent_warps:
            # view 1 = base under A1, view 2 = base under A2 (drawn above): A = A2 · A1⁻¹ maps view 1 → view 2
            a1 = random_similarity((size, size), self.scale, self.rotation, self.translation)
            image1, mask1, valid1 = self.warp_view(base, base_mask, a1)
            dataset_dict.update({"image": image1, "valid1": valid1})
            if mask1 is not None:
                dataset_dict["fg_mask"] = mask1
            a = (to_3x3(a) @ to_3x3(invert_affine(a1)))[:2]
            # view-2 pixels must also come from a valid view-1 pixel
            back = warp_to_view2(valid1[None, None].float(), a, mode="nearest")[0, 0] > 0.5
            valid2 = valid2 & back
            if mask2 is not None:
                mask2 = mask2 & valid2
        dataset_dict.update({"image2": image2, "valid2": valid2, "transform": torch.as_tensor(a, dtype=torch.float32)})
        if mask2 is not None:
            dataset_dict["fg_mask2"] = mask2
        return dataset_dict

    def warp_view(self, image: torch.Tensor, mask, a):
        """View 1 (uint8 C×H×W, optional bool H×W mask) → ``(image2, mask2, valid2)`` under ``a``."""
        c, h, w = image.shape
        grid = sampling_grid(invert_affine(as_affine(a)), (1, c, h, w), (h, w), torch.float32, "cpu")
        valid2 = (grid[0].abs() <= 1).all(dim=-1)
        img = sample_at(image[None].float(), grid, "bilinear", "border")[0]
        img = torch.where(valid2, img, torch.tensor(float(self.warp_fill)))
        image2 = img.round_().clamp_(0, 255).to(torch.uint8)
        mask2 = None
        if mask is not None:
            m = sample_at(mask[None, None].float(), grid, "nearest", "zeros")
            mask2 = (m[0, 0] > 0.5) & valid2
        return image2, mask2, valid2
