"""Masks: decode COCO segmentations (polygons, compressed or uncompressed RLE) into boolean arrays."""
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["decode_segmentation", "segmentation_to_rle"]


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
            rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
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
