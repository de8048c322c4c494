"""Masks, in one place: COCO segmentations (polygons, compressed or uncompressed RLE) ↔ boolean arrays, and
the tensor helpers the models share (object masks at an output size, masks on a feature grid, boxes).

Used by the mappers, the models, the evaluators, the pseudo-label store and the validator.
"""

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import BitMasks, Boxes
from torch.nn import functional as F

__all__ = [
    "decode_segmentation",
    "segmentation_to_rle",
    "encode_mask",
    "decode_rle",
    "rle_area",
    "object_masks",
    "object_union",
    "object_grid_masks",
    "masks_to_grid",
    "mask_box_slices",
    "masks_to_boxes",
]


# ------------------------------------------------------------------------------------------
# COCO segmentations
# ------------------------------------------------------------------------------------------
def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Polygons, compressed RLE (str or bytes counts) or uncompressed RLE → one compressed RLE (bytes counts).

    Polygons are rasterised by pycocotools exactly as COCO evaluation does. The RLE's size is not checked
    here (see :func:`decode_segmentation`).
    """
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_util.frPyObjects(segmentation, height, width)
        else:
            rle = {
                "size": list(segmentation["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return rle


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Polygons, compressed RLE (str or bytes counts) or uncompressed RLE → bool H×W array.

    Raises ValueError when the segmentation is of an unknown type or its RLE size is not ``(height, width)``.
    """
    if isinstance(segmentation, list) and not segmentation:
        return np.zeros((height, width), dtype=bool)
    mask = mask_util.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"a segmentation of size {mask.shape} in a record of size {(height, width)}")
    return mask


def encode_mask(mask) -> dict:
    """Boolean H×W mask → compressed COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects one H×W mask, got shape {mask.shape}")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE (compressed with str or bytes counts, or uncompressed) → bool array of its own size."""
    height, width = (int(v) for v in rle["size"])
    return mask_util.decode(segmentation_to_rle(rle, height, width)).astype(bool)


def rle_area(rle: dict) -> int:
    """Pixel count of a COCO RLE (compressed with str or bytes counts, or uncompressed), without decoding."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed: alternating runs of 0s and 1s
        return int(sum(counts[1::2]))
    return int(
        mask_util.area(
            {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        )
    )


# ------------------------------------------------------------------------------------------
# Tensor masks of objects
# ------------------------------------------------------------------------------------------
def _as_bool_masks(objects, device) -> torch.Tensor:
    masks = objects.gt_masks
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    masks = torch.as_tensor(masks, device=device)
    if masks.dim() != 3:
        raise ValueError(f"objects.gt_masks must be M×H×W, got shape {tuple(masks.shape)}")
    return masks.bool()


def _check_image_size(size, image_size, output_size) -> None:
    if tuple(size) != tuple(image_size):
        raise ValueError(
            f"object masks of size {tuple(size)} match neither the image {tuple(image_size)} "
            f"nor the output {tuple(output_size)}"
        )


def _resize(masks: torch.Tensor, output_size) -> torch.Tensor:
    resized = F.interpolate(masks[:, None].float(), size=tuple(output_size), mode="bilinear", align_corners=False)
    return resized[:, 0] >= 0.5


def object_masks(objects, image_size, output_size, device) -> torch.Tensor:
    """``objects.gt_masks`` as bool [M, *output_size], each mask resized on its own.

    Masks at the (resized) image's size ``image_size`` — what evaluation mappers produce — are resized
    to the output size as Mask2Former resizes mask logits (bilinear), kept where ≥ 0.5; masks already at
    ``output_size`` are used as they are; any other size is an error.
    """
    masks = _as_bool_masks(objects, device)
    if masks.shape[0] == 0 or tuple(masks.shape[-2:]) == tuple(output_size):
        return masks.reshape((masks.shape[0],) + tuple(output_size))
    _check_image_size(masks.shape[-2:], image_size, output_size)
    return _resize(masks, output_size)


def object_union(objects, image_size, output_size, device) -> torch.Tensor:
    """Union of ``objects.gt_masks`` as a bool ``output_size`` mask (the union is resized, as
    :func:`object_masks` resizes one mask)."""
    masks = _as_bool_masks(objects, device)
    if masks.shape[0] == 0:
        return torch.zeros(tuple(output_size), dtype=torch.bool, device=device)
    union = masks.any(dim=0)
    if tuple(union.shape) == tuple(output_size):
        return union
    _check_image_size(union.shape, image_size, output_size)
    return _resize(union[None], output_size)[0]


def object_grid_masks(masks: torch.Tensor, grid_hw) -> torch.Tensor:
    """Bool masks [M, H, W] (image resolution) → bool masks [M, h, w] on a feature grid: the cells whose
    nearest image pixel is in the mask (the reference code's pixel grouping).

    A mask too thin to hit a grid point keeps every cell it touches, so small objects still get segments
    instead of being dropped.
    """
    m = masks[:, None].float()
    out = F.interpolate(m, size=tuple(grid_hw), mode="nearest")[:, 0] > 0.5
    empty = ~out.flatten(1).any(1)
    out[empty] = F.adaptive_max_pool2d(m, tuple(grid_hw))[:, 0][empty] > 0.5
    return out


def masks_to_grid(masks: torch.Tensor, grid_hw) -> torch.Tensor:
    """Bool masks [B, H, W] → [B, h, w]: a cell is in the mask when at least half of it is (area sampling,
    the part-discovery heads' foreground).

    A non-empty mask too thin to fill half of any cell keeps every cell it touches, so small objects
    still get points.
    """
    frac = F.interpolate(masks[:, None].float(), size=tuple(grid_hw), mode="area")[:, 0]
    out = frac >= 0.5
    empty = ~out.flatten(1).any(1)
    if empty.any():
        out[empty] = frac[empty] > 0
    return out


def mask_box_slices(masks: torch.Tensor) -> list:
    """Inclusive-exclusive ``(y0, y1, x0, x1)`` box of each mask [M, H, W]; an empty mask gives (0, 0, 0, 0)."""
    rows, cols = masks.any(2), masks.any(1)
    out = []
    for r, c in zip(rows, cols):
        ys, xs = torch.nonzero(r).flatten(), torch.nonzero(c).flatten()
        out.append((0, 0, 0, 0) if len(ys) == 0 else (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
    return out


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """XYXY ``Boxes`` of bool masks [K, H, W] (all zeros for an empty mask), on the masks' device."""
    return BitMasks(masks).get_bounding_boxes().to(masks.device)
