"""Filters on part predictions, shared by evaluators and tools (pure functions, no I/O)."""

import numpy as np

__all__ = ["mask_iou_with_objects", "drop_object_like_parts"]


def _flat(masks):
    """(N, H, W) numpy array or torch tensor → (N, H·W) bool numpy array."""
    if hasattr(masks, "detach"):  # a torch tensor
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {masks.shape}")
    return masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]).astype(bool)


def mask_iou_with_objects(part_masks, object_masks, object_index) -> np.ndarray:
    """IoU of every part mask with the mask of the object it belongs to.

    Args:
        part_masks: (P, H, W) bool (numpy or torch).
        object_masks: (M, H, W) bool, same H, W.
        object_index: (P,) ints in [0, M): the object of each part.
    Returns:
        (P,) float64 IoUs (0 for an empty part and an empty object).
    """
    parts, objects = _flat(part_masks), _flat(object_masks)
    owner = np.asarray(
        object_index.detach().cpu().numpy() if hasattr(object_index, "detach") else object_index, dtype=np.int64
    )
    owner = owner.reshape(-1)
    if len(owner) != len(parts):
        raise ValueError(f"object_index has {len(owner)} entries for {len(parts)} part masks")
    if len(parts) == 0:
        return np.zeros(0)
    if parts.shape[1] != objects.shape[1] or owner.min() < 0 or owner.max() >= len(objects):
        raise ValueError("part and object masks must share H, W and object_index must index object_masks")
    obj = objects[owner]
    inter = (parts & obj).sum(1)
    union = (parts | obj).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def drop_object_like_parts(part_masks, object_masks, object_index, max_iou: float = 0.5) -> np.ndarray:
    """Which part predictions to keep: those whose IoU with their object's mask is at most ``max_iou``.

    PartDistillation (Cho et al. 2023), supplementary "Manual evaluation": part predictions whose IoU with
    the object mask exceeds 50 % are dropped before the collages are shown to annotators, since a "part" that
    covers most of its object says nothing about part discovery. The same filter can be applied before a part
    metric, so that a model cannot score by returning whole objects.

    Args:
        part_masks: (P, H, W) bool (numpy array or torch tensor).
        object_masks: (M, H, W) bool.
        object_index: (P,) the row of ``object_masks`` each part belongs to.
        max_iou: keep a part iff IoU(part, its object) <= max_iou (paper: 0.5).
    Returns:
        (P,) bool numpy array, True = keep. Use it to index the predictions (``instances[torch.from_numpy(keep)]``).
    """
    if not 0.0 <= max_iou <= 1.0:
        raise ValueError(f"max_iou={max_iou}: use a value in [0, 1] (the paper uses 0.5)")
    return mask_iou_with_objects(part_masks, object_masks, object_index) <= max_iou
