"""Pictures of dataset records and model predictions with detectron2's ``Visualizer``
(tools/visualize_data.py and :class:`~part_distillation.engine.hooks.PredictionImagesHook`)."""

import cv2
import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.utils.visualizer import Visualizer
from pycocotools import mask as mask_util

__all__ = ["covering_metadata", "draw_record", "draw_predictions", "image_to_rgb"]


def covering_metadata(metadata, category_ids) -> Metadata:
    """A copy of ``metadata`` whose ``thing_classes`` name every id in ``category_ids`` (missing ones as
    ``"<id>"``): part-class ids of a pseudo-label store may exceed the source dataset's class list."""
    names = list(metadata.get("thing_classes", None) or []) if metadata is not None else []
    top = max([int(c) for c in category_ids] + [-1])
    names += [str(i) for i in range(len(names), top + 1)]
    return Metadata(name=getattr(metadata, "name", "vis"), thing_classes=names)


def image_to_rgb(image: np.ndarray, input_format: str) -> np.ndarray:
    """An (H, W, 3) image in ``input_format`` ("RGB"/"BGR") → RGB."""
    return image[:, :, ::-1] if input_format == "BGR" else image


def draw_record(image_rgb: np.ndarray, record: dict, metadata=None, scale: float = 1.0) -> np.ndarray:
    """A detectron2 dataset dict drawn on its image (RGB out): annotations by ``Visualizer.draw_dataset_dict``
    and, for part datasets (pseudo-label stores, object-view datasets), the ``objects`` outlined in white."""
    h, w = record.get("height", image_rgb.shape[0]), record.get("width", image_rgb.shape[1])
    if image_rgb.shape[:2] != (h, w):
        image_rgb = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    image_rgb = np.array(image_rgb, dtype=np.uint8, order="C", copy=True)  # writable: outlines are drawn on it

    for obj in record.get("objects", []) or []:
        seg = obj.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
            m = mask_util.decode(seg).astype(np.uint8)
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(image_rgb, contours, -1, (255, 255, 255), 2)
    anns = record.get("annotations", []) or []
    meta = covering_metadata(metadata, [a.get("category_id", 0) for a in anns])
    vis = Visualizer(image_rgb, meta, scale=scale)
    return vis.draw_dataset_dict(record).get_image()


def draw_predictions(image_rgb: np.ndarray, output: dict, scale: float = 1.0) -> np.ndarray:
    """A model output dict drawn on its image (RGB out): ``part_instances`` when present, else ``instances``
    (masks, ids and scores; class ids are shown as numbers, since part classes have no names)."""
    inst = output.get("part_instances", output.get("instances")).to("cpu")
    if inst.has("pred_masks") and inst.pred_masks.dtype != torch.bool:
        inst.pred_masks = inst.pred_masks > 0.5
    h, w = inst.image_size
    if image_rgb.shape[:2] != (h, w):
        image_rgb = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    vis = Visualizer(np.ascontiguousarray(image_rgb), Metadata(name="predictions"), scale=scale)
    return vis.draw_instance_predictions(inst).get_image()
