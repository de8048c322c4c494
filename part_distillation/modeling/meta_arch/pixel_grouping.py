"""Stage 1: part segments by clustering backbone features inside each object (PartDistillation supp. §2, Tab. 1/4).

For every object of a batch at once: backbone levels (default res3+res4) are resized to the first
level's grid (stride 8) and concatenated; the object's feature vectors are clustered with our batched
torch K-means (K = 4, 10 restarts, Euclidean, as sklearn in the reference); every pixel of the
object is then assigned to the centroid it is most similar to (``DISTANCE``: the reference's "dot"
product by default) — the similarities are computed on the feature grid and bilinearly upsampled, so
the assignment is smooth at full resolution — and the segments are refined by a dense CRF.

Inference only. Output per image (at the input's original height/width):
``{"instances": objects (pred_masks, scores, pred_classes), "part_instances": part segments
(pred_masks, scores = 1, pred_classes = 0, object_index)}``.
"""

import logging
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Instances
from torch import nn

from ...structures.masks import mask_box_slices, object_grid_masks
from ...utils.errors import ConfigError
from ...clustering.crf import DenseCRFRefiner
from ...clustering.kmeans import batched_kmeans
from ...data.dataset_mappers.pixel_grouping import object_filter_args
from .object_source import assign_image_class, build_object_model, filter_objects
from .part_mask2former import normalize_images

__all__ = ["PixelGroupingModel", "group_pixels"]

logger = logging.getLogger(__name__)


def _similarity(feats: torch.Tensor, centers: torch.Tensor, distance: str) -> torch.Tensor:
    """[M, C, h, w] × [M, K, C] → [M, K, h, w]; larger = more similar."""
    dot = torch.einsum("mchw,mkc->mkhw", feats, centers)
    if distance == "dot":
        return dot
    if distance == "l2":  # −‖x − c‖² up to the per-pixel constant ‖x‖²
        return 2 * dot - (centers**2).sum(-1)[:, :, None, None]
    if distance == "cosine":
        fn = feats.norm(dim=1, keepdim=True).clamp_min(1e-6)
        cn = centers.norm(dim=-1).clamp_min(1e-6)[:, :, None, None]
        return dot / fn / cn
    raise ConfigError(f"MODEL.PIXEL_GROUPING.DISTANCE={distance!r}: use 'dot', 'l2' or 'cosine'.")


def group_pixels(
    feats: torch.Tensor,
    object_masks: torch.Tensor,
    object_image: torch.Tensor,
    num_parts: int,
    distance: str,
    kmeans_kwargs: dict,
):
    """Part labels (0 = outside the object, 1..K) for every object at full (padded) resolution.

    Args:
        feats: [B, C, h, w] concatenated features of the padded batch.
        object_masks: [M, Hp, Wp] bool masks at padded image resolution.
        object_image: [M] image index of each object.
    Returns:
        labels [M, Hp, Wp] long, num_clusters [M] long.
    """
    num_objects = object_masks.shape[0]
    grid_hw = feats.shape[-2:]
    if num_objects == 0:
        return object_masks.new_zeros(object_masks.shape, dtype=torch.long), object_masks.new_zeros(0, dtype=torch.long)
    grid = object_grid_masks(object_masks, grid_hw)  # [M, h, w]
    obj_feats = feats[object_image]  # [M, C, h, w]
    points = obj_feats.flatten(2).transpose(1, 2)  # [M, h·w, C]; the validity mask selects the object
    result = batched_kmeans(points, grid.flatten(1), num_parts, **kwargs_for_kmeans(kmeans_kwargs))
    sim = _similarity(obj_feats, result.centers.to(obj_feats.dtype), distance)  # [M, K, h, w]
    # centres of instances with fewer than K distinct points are placeholders: never assign to them
    k_idx = torch.arange(num_parts, device=sim.device)
    sim = sim.masked_fill((k_idx[None] >= result.num_clusters[:, None])[:, :, None, None], float("-inf"))
    sim = sim.nan_to_num(neginf=-1e30)
    # upsample and argmax only inside each object's box: full-image maps cost more than K-means
    labels = torch.zeros(object_masks.shape, dtype=torch.long, device=object_masks.device)
    for j, (y0, y1, x0, x1) in enumerate(mask_box_slices(object_masks)):
        if y1 == y0:
            continue
        window, (oy, ox) = _upsampled_window(sim[j], (y0, y1, x0, x1), object_masks.shape[-2:])
        box = (slice(y0, y1), slice(x0, x1))
        labels[j][box] = (window[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].argmax(0) + 1) * object_masks[j][box]
    return labels, result.num_clusters


def _upsampled_window(sim: torch.Tensor, box, size):
    """Part of the bilinear upsampling of ``sim`` [K, h, w] to ``size`` that covers ``box``.

    Returns the window [K, h', w'] and its top-left (y, x) in the upsampled map. When ``size`` is
    an integer multiple of the grid (the padded image over a stride-s grid), only the grid cells
    the box needs (one cell of margin) are interpolated: same values as the full map, as the
    sampling positions are the full map's shifted by whole cells; otherwise the full map.
    The window is channels-last, so the argmax over K reads contiguous memory (~20x faster).
    """
    (height, width), (h, w) = size, sim.shape[-2:]
    if height % h or width % w:
        cells = sim[None].contiguous(memory_format=torch.channels_last)
        full = F.interpolate(cells, size=size, mode="bilinear", align_corners=False)
        return full[0], (0, 0)
    sy, sx = height // h, width // w
    y0, y1, x0, x1 = box
    # grid rows (cols) whose values reach the box: floor of the first sample position, and one
    # past the second neighbour of the last
    gy0, gx0 = max(math.floor((y0 + 0.5) / sy - 0.5), 0), max(math.floor((x0 + 0.5) / sx - 0.5), 0)
    gy1, gx1 = min(math.floor((y1 - 0.5) / sy - 0.5) + 2, h), min(math.floor((x1 - 0.5) / sx - 0.5) + 2, w)
    cells = sim[None, :, gy0:gy1, gx0:gx1].contiguous(memory_format=torch.channels_last)
    window = F.interpolate(cells, size=(sy * (gy1 - gy0), sx * (gx1 - gx0)), mode="bilinear", align_corners=False)
    return window[0], (sy * gy0, sx * gx0)


def kwargs_for_kmeans(kmeans_kwargs: dict) -> dict:
    # K-means is Euclidean whatever DISTANCE says, as in the reference (sklearn); DISTANCE only assigns.
    return dict(kmeans_kwargs, metric="l2")


@META_ARCH_REGISTRY.register()
class PixelGroupingModel(nn.Module):
    run_with = "--eval-only or make_pseudo_labels.py"  # how to run it (the error in training mode says)

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_levels,
        feature_normalize: bool,
        num_parts: int,
        distance: str,
        kmeans_kwargs: dict,
        crf: DenseCRFRefiner = None,
        object_model: nn.Module = None,
        object_filter: dict,
        pixel_mean,
        pixel_std,
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        missing = [lvl for lvl in feature_levels if lvl not in backbone.output_shape()]
        if missing:
            raise ConfigError(
                f"MODEL.PIXEL_GROUPING.FEATURE_LEVELS has {missing}, not produced by the backbone "
                f"(it has {sorted(backbone.output_shape())})."
            )
        self.feature_levels = list(feature_levels)
        self.feature_normalize = feature_normalize
        self.num_parts = num_parts
        self.distance = distance
        self.kmeans_kwargs = kmeans_kwargs
        self.crf = crf
        self.object_model = object_model
        self.object_filter = object_filter
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        pg = cfg.MODEL.PIXEL_GROUPING
        crf = DenseCRFRefiner.from_config(cfg) if pg.CRF.ENABLED else None
        return {
            "backbone": build_backbone(cfg),
            "feature_levels": pg.FEATURE_LEVELS,
            "feature_normalize": pg.FEATURE_NORMALIZE,
            "num_parts": pg.NUM_PARTS,
            "distance": pg.DISTANCE,
            "kmeans_kwargs": {
                "n_init": pg.KMEANS_N_INIT,
                "max_iter": pg.KMEANS_MAX_ITER,
                "tol": pg.KMEANS_TOL,
                "seed": pg.SEED,
                "project_dim": pg.KMEANS_PROJECT_DIM,
            },
            "crf": crf,
            "object_model": build_object_model(cfg),
            "object_filter": object_filter_args(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Selected backbone levels resized to the first level's grid and concatenated: [B, C, h, w].

        On the CPU images go through the backbone one at a time: a batch's activations overflow the
        caches (EfficientNet-Lite0 at 640 px: 0.25 s/image in batches of 4, 0.11 s one by one), and
        an image's features then do not depend on the other images of its batch.
        """
        if images.device.type == "cpu" and images.shape[0] > 1:
            return torch.cat([self.features(image[None]) for image in images])
        out = self.backbone(images)
        first = out[self.feature_levels[0]]
        feats = [first] + [
            F.interpolate(out[lvl], size=first.shape[-2:], mode="bilinear", align_corners=False)
            for lvl in self.feature_levels[1:]
        ]
        feats = torch.cat(feats, dim=1).float()
        return F.normalize(feats, dim=1) if self.feature_normalize else feats

    def _objects(self, batched_inputs):
        if self.object_model is not None:
            return self.object_model(batched_inputs)
        if any("objects" not in x for x in batched_inputs):
            raise ConfigError(
                "PixelGroupingModel got no object masks: use INPUT.DATASET_MAPPER_NAME PixelGroupingDatasetMapper "
                "with MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE gt/json, or set OBJECT_MASK_SOURCE model."
            )
        return [x["objects"] for x in batched_inputs]

    def prepare_images(self, batched_inputs):
        """``(raw images on the device, normalised padded ImageList)`` of a batch; RuntimeError in training mode
        (the grouping models have nothing to train)."""
        if self.training:
            raise RuntimeError(f"{type(self).__name__} has nothing to train; run it with {self.run_with}.")
        raw = [x["image"].to(self.device) for x in batched_inputs]
        return raw, normalize_images(raw, self.pixel_mean, self.pixel_std, self.size_divisibility)

    @torch.no_grad()
    def forward(self, batched_inputs):
        raw, images = self.prepare_images(batched_inputs)
        same_vocabulary = getattr(self.object_model, "dataset_vocabulary", False)
        objects = [
            # an image-level label (ImageNet folders: record "class_id") is every object's class
            filter_objects(
                assign_image_class(o.to(self.device), x.get("class_id"), same_vocabulary), **self.object_filter
            )
            for o, x in zip(self._objects(batched_inputs), batched_inputs)
        ]
        padded_hw = images.tensor.shape[-2:]
        masks, owner = [], []
        for i, obj in enumerate(objects):
            m = obj.gt_masks
            masks.append(F.pad(m, (0, padded_hw[1] - m.shape[-1], 0, padded_hw[0] - m.shape[-2])))
            owner += [i] * len(obj)
        masks = torch.cat(masks) if masks else torch.zeros((0, *padded_hw), dtype=torch.bool, device=self.device)
        owner = torch.tensor(owner, dtype=torch.long, device=self.device)
        labels, _ = group_pixels(
            self.features(images.tensor), masks, owner, self.num_parts, self.distance, self.kmeans_kwargs
        )
        results, start = [], 0
        for i, (x, obj) in enumerate(zip(batched_inputs, objects)):
            h, w = images.image_sizes[i]
            lab = labels[start : start + len(obj), :h, :w]
            start += len(obj)
            if self.crf is not None and len(obj):
                lab = self._refine(raw[i], lab, obj.gt_masks)
            results.append(self._postprocess(lab, obj, x.get("height", h), x.get("width", w)))
        return results

    def _refine(self, image: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Dense CRF per object on its bounding box (plus a margin for the 20-px bilateral kernel).

        All objects of the image are refined in one call (their boxes are independent problems).
        """
        H, W = labels.shape[-2:]
        margin = 16
        boxes = [
            (max(y0 - margin, 0), min(y1 + margin, H), max(x0 - margin, 0), min(x1 + margin, W))
            if y1 > y0
            else (0,) * 4
            for y0, y1, x0, x1 in mask_box_slices(masks)
        ]
        out = self.crf.refine_boxes(image, labels, boxes, self.num_parts + 1)
        if self.crf.restrict_to_object:  # the refiner's setting (MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT)
            out = out * masks
        return out

    def _postprocess(self, labels: torch.Tensor, objects: Instances, height: int, width: int) -> dict:
        """Label maps [M, h, w] → object and part Instances at the original resolution."""
        if labels.shape[-2:] != (height, width):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
            obj_masks = (
                F.interpolate(objects.gt_masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5
            )
        else:
            obj_masks = objects.gt_masks
        obj_inst = Instances((height, width))
        obj_inst.pred_masks = obj_masks
        obj_inst.scores = objects.scores.float()
        obj_inst.pred_classes = objects.gt_classes
        part_masks, part_owner = [], []
        for j in range(labels.shape[0]):
            for k in range(1, self.num_parts + 1):
                m = labels[j] == k
                if m.any():
                    part_masks.append(m)
                    part_owner.append(j)
        parts = Instances((height, width))
        parts.pred_masks = (
            torch.stack(part_masks)
            if part_masks
            else torch.zeros((0, height, width), dtype=torch.bool, device=labels.device)
        )
        parts.scores = torch.ones(len(part_masks), device=labels.device)
        parts.pred_classes = torch.zeros(len(part_masks), dtype=torch.long, device=labels.device)
        parts.object_index = torch.tensor(part_owner, dtype=torch.long, device=labels.device)
        return {"instances": obj_inst, "part_instances": parts}
