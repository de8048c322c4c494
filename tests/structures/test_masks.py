"""part_distillation.structures.masks: every segmentation form decodes to the same mask, RLE areas without
decoding, feature-grid masks of small objects, and box slices."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from part_distillation.structures.masks import (
    decode_rle,
    decode_segmentation,
    encode_mask,
    mask_box_slices,
    masks_to_boxes,
    masks_to_grid,
    object_grid_masks,
    rle_area,
)

H, W = 6, 8


def _mask():
    m = np.zeros((H, W), dtype=bool)
    m[1:4, 2:7] = True
    return m


def test_all_segmentation_forms_decode_alike():
    mask = _mask()
    rle = encode_mask(mask)  # str counts
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.uint8)
    runs, value, count = [], 0, 0
    for v in flat:  # uncompressed RLE: run lengths starting with zeros
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    uncompressed = {"size": [H, W], "counts": runs}
    polygon = [[2.0, 1.0, 7.0, 1.0, 7.0, 4.0, 2.0, 4.0]]  # the box outline, rasterised by pycocotools
    for segm in (rle, as_bytes, uncompressed):
        assert np.array_equal(decode_segmentation(segm, H, W), mask)
        assert np.array_equal(decode_rle(segm), mask)
        assert rle_area(segm) == mask.sum() == 15
    poly = decode_segmentation(polygon, H, W)
    assert np.array_equal(poly, mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygon, H, W))).astype(bool))
    assert not decode_segmentation([], H, W).any()
    with pytest.raises(ValueError, match="size"):
        decode_segmentation(rle, H + 1, W)


def test_grid_masks_keep_thin_objects():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8] = True  # top half
    masks[1, 5, 5] = True  # one pixel: hits no grid point, keeps the cell it touches
    nearest = object_grid_masks(masks, (4, 4))
    assert nearest[0, :2].all() and not nearest[0, 2:].any()
    assert nearest[1].sum() == 1 and nearest[1, 1, 1]
    area = masks_to_grid(masks, (4, 4))
    assert torch.equal(area[0], nearest[0]) and area[1].sum() == 1 and area[1, 1, 1]


def test_box_slices_and_boxes():
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0] = torch.from_numpy(_mask())
    assert mask_box_slices(masks) == [(1, 4, 2, 7), (0, 0, 0, 0)]
    assert masks_to_boxes(masks).tensor.tolist() == [[2.0, 1.0, 7.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
