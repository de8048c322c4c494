"""Class-level pixel grouping: the one-stage self-training baseline's labels and the raw-RGB K-means baseline.

PartDistillation supp. §3 ("One-stage self-training"; no reference code): instead of clustering every object on its own
(stage 1), the pixel features of *all* objects of an object class across the dataset are clustered into
K = 8 clusters, and the cluster id of each pixel directly becomes its part label (consistent across the
class, so no ranking stage is needed). Self-training on those labels with the stage-4 recipe gives the
one-stage baseline; evaluated directly they are the "K-means on features" baseline (with the raw-RGB
backbone, the raw-RGB K-means baseline).

:class:`ClassPixelGroupingModel` reuses :class:`PixelGroupingModel` (backbone levels, objects, dense CRF)
and the two-pass prototype protocol of ``tools/rank_parts.py``:

1. **cluster pass** (no prototypes set): per object, ``MODEL.ONE_STAGE.SAMPLES_PER_OBJECT`` feature-grid
   cells inside it, evenly spaced in raster order (deterministic, no RNG), are returned as
   ``cluster_features`` with the object's class; the tool gathers them in dataset order and clusters each
   object class into ``MODEL.PART_RANKING.NUM_CLUSTERS`` prototypes (Euclidean K-means, the reference's
   sklearn default).
2. **labelling pass** (:meth:`set_prototypes`, or ``MODEL.ONE_STAGE.PROTOTYPES`` = a saved prototypes file):
   every grid cell of an object goes to its class's nearest prototype (squared distances upsampled
   bilinearly, argmax inside the object), optionally refined by the dense CRF; one part per used
   prototype, with ``pred_classes`` = prototype id, ``soft_scores`` = softmax(−‖f̄ − μ_k‖ / T) of the
   part's mean feature f̄ (so the store writer records ``part_class``) and ``features`` = f̄ (for
   mIoU-clustered). Objects whose class has no prototypes get no parts.
"""

import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances

from ...clustering.prototypes import load_prototypes, prototype_soft_scores
from ...structures.masks import mask_box_slices, object_grid_masks
from ...utils.errors import ConfigError
from .object_source import filter_objects
from .pixel_grouping import PixelGroupingModel

# load_prototypes stays importable from here (it lives in clustering.prototypes).
__all__ = ["ClassPixelGroupingModel", "load_prototypes", "sample_object_cells"]

logger = logging.getLogger(__name__)


def sample_object_cells(grid_mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of ``count`` cells of a [h, w] bool mask, evenly spaced in raster order (all if fewer)."""
    cells = grid_mask.flatten().nonzero().flatten()
    if len(cells) <= count:
        return cells
    pick = torch.linspace(0, len(cells) - 1, count, device=cells.device).round().long()
    return cells[pick]


@META_ARCH_REGISTRY.register()
class ClassPixelGroupingModel(PixelGroupingModel):
    run_with = "tools/rank_parts.py or --eval-only"

    @configurable
    def __init__(self, *, samples_per_object: int, temperature: float = 1.0, prototypes_file: str = "", **kwargs):
        super().__init__(**kwargs)
        if int(samples_per_object) < 1:
            raise ConfigError(f"MODEL.ONE_STAGE.SAMPLES_PER_OBJECT={samples_per_object} must be ≥ 1.")
        self.samples_per_object = int(samples_per_object)
        self.temperature = float(temperature)
        # Buffers (not saved) so that .to(device) moves prototypes loaded before the model is moved.
        self.register_buffer("prototypes", None, persistent=False)  # [C, K, D]
        self.register_buffer("num_clusters", None, persistent=False)  # [C]
        if prototypes_file:
            self.set_prototypes(*load_prototypes(prototypes_file))

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(
            num_parts=cfg.MODEL.PART_RANKING.NUM_CLUSTERS,  # labels 1..K for the CRF
            samples_per_object=cfg.MODEL.ONE_STAGE.SAMPLES_PER_OBJECT,
            temperature=cfg.MODEL.PART_RANKING.TEMPERATURE,
            prototypes_file=cfg.MODEL.ONE_STAGE.PROTOTYPES,
        )
        return ret

    # the prototype protocol of tools/rank_parts.py
    requires_weights = False

    @property
    def cluster_feature_dim(self) -> int:
        return sum(self.backbone.output_shape()[lvl].channels for lvl in self.feature_levels)

    def set_prototypes(self, prototypes, num_clusters) -> None:
        """Prototypes [C, K, D] and per-class cluster counts [C] (None: back to the cluster pass)."""
        if prototypes is not None:
            d = self.cluster_feature_dim
            if prototypes.dim() != 3 or prototypes.shape[-1] != d or tuple(num_clusters.shape) != prototypes.shape[:1]:
                raise ConfigError(
                    f"MODEL.ONE_STAGE.PROTOTYPES: prototypes {tuple(prototypes.shape)} with counts "
                    f"{tuple(num_clusters.shape)} do not fit this model's [C, K, {d}] features (MODEL.PIXEL_GROUPING."
                    "FEATURE_LEVELS of this backbone); write them with tools/rank_parts.py and the same config."
                )
            if len(num_clusters) and int(num_clusters.max()) > prototypes.shape[1]:
                raise ConfigError(f"MODEL.ONE_STAGE.PROTOTYPES: num_clusters exceeds K = {prototypes.shape[1]}.")
        self.prototypes = None if prototypes is None else prototypes.to(self.device).float()
        self.num_clusters = None if num_clusters is None else num_clusters.to(self.device).long()

    @torch.no_grad()
    def forward(self, batched_inputs):
        raw, images = self.prepare_images(batched_inputs)
        feats = self.features(images.tensor)
        results = []
        for i, (x, obj) in enumerate(zip(batched_inputs, self._objects(batched_inputs))):
            obj = obj.to(self.device)
            if not obj.has("scores"):  # GT objects (PartEvalDatasetMapper) carry no score
                obj.scores = torch.ones(len(obj), device=self.device)
            obj = filter_objects(obj, **self.object_filter)
            h, w = images.image_sizes[i]
            pad = images.tensor.shape[-2:]
            masks = F.pad(obj.gt_masks.bool(), (0, pad[1] - w, 0, pad[0] - h))
            grid = object_grid_masks(masks, feats.shape[-2:])  # [M, gh, gw]
            if self.prototypes is None:
                results.append(self._cluster_features(feats[i], grid, obj))
            else:
                results.append(self._label(raw[i], feats[i], masks, grid, obj, (h, w), x))
        return results

    def _objects_out(self, obj, size):
        out = Instances(size)
        masks = obj.gt_masks.bool()
        if tuple(masks.shape[-2:]) != tuple(size):
            masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        out.pred_masks = masks
        out.scores = obj.scores.float()
        out.pred_classes = obj.gt_classes.long()
        return out

    def _cluster_features(self, feats, grid, obj):
        flat = feats.flatten(1).t()  # [gh·gw, C]
        index, chosen = [], []
        for j in range(len(obj)):
            cells = sample_object_cells(grid[j], self.samples_per_object)
            chosen.append(flat[cells])
            index.append(torch.full((len(cells),), j, dtype=torch.long, device=feats.device))
        features = torch.cat(chosen) if chosen else feats.new_zeros((0, feats.shape[0]))
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=feats.device)
        return {
            "instances": self._objects_out(obj, obj.image_size),
            "cluster_features": {"object_index": index, "features": features},
        }

    def _label(self, image, feats, masks, grid, obj, image_size, inp):
        k = self.prototypes.shape[1]
        classes = obj.gt_classes.long()
        valid_class = (classes >= 0) & (classes < self.prototypes.shape[0])
        protos = self.prototypes[classes.clamp(0, self.prototypes.shape[0] - 1)]  # [M, K, C]
        counts = torch.where(valid_class, self.num_clusters[classes.clamp(0, self.prototypes.shape[0] - 1)], 0)
        # −‖f − μ‖² on the grid, then bilinear upsampling: smooth assignments at full resolution (as stage 1)
        sim = 2 * torch.einsum("chw,mkc->mkhw", feats, protos) - (protos**2).sum(-1)[:, :, None, None]
        unused = torch.arange(k, device=sim.device)[None] >= counts[:, None]
        sim = sim.masked_fill(unused[:, :, None, None], -1e30)
        sim = F.interpolate(sim, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        labels = torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
        for j, (y0, y1, x0, x1) in enumerate(mask_box_slices(masks)):
            if counts[j] > 0:
                box = (slice(y0, y1), slice(x0, x1))
                labels[j][box] = (sim[j][(slice(None),) + box].argmax(0) + 1) * masks[j][box]
        h, w = image_size
        labels = labels[:, :h, :w]
        if self.crf is not None and len(obj):
            labels = self._refine(image, labels, masks[:, :h, :w])  # K + 1 labels (num_parts = K)
        # each feature cell takes the label of its pixel in the padded frame the features were computed on
        padded = F.pad(labels, (0, masks.shape[-1] - w, 0, masks.shape[-2] - h))
        grid_labels = F.interpolate(padded[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
        height, width = inp.get("height", h), inp.get("width", w)
        return self._parts_out(labels, grid_labels, feats, grid, obj, counts, height, width)

    def _parts_out(self, labels, grid_labels, feats, grid, obj, counts, height, width):
        """Label maps [M, h, w] (0 = none, k + 1 = prototype k) and their feature-grid version → objects and
        ranked part Instances (part features = mean feature of the part's grid cells)."""
        k = self.prototypes.shape[1]
        if labels.shape[-2:] != (height, width):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
        flat = feats.flatten(1).t()
        masks, owner, ids, means = [], [], [], []
        for j in range(labels.shape[0]):
            for c in range(k):
                m = labels[j] == c + 1
                if not m.any():
                    continue
                cells = (grid_labels[j] == c + 1) & grid[j]
                if not cells.any():  # a part thinner than a grid cell: use the prototype itself
                    mean = self.prototypes[int(obj.gt_classes[j]), c]
                else:
                    mean = flat[cells.flatten()].mean(0)
                masks.append(m)
                owner.append(j)
                ids.append(c)
                means.append(mean)
        device = labels.device
        parts = Instances((height, width))
        parts.pred_masks = (
            torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool, device=device)
        )
        parts.scores = torch.ones(len(masks), device=device)
        parts.object_index = torch.tensor(owner, dtype=torch.long, device=device)
        parts.pred_classes = torch.tensor(ids, dtype=torch.long, device=device)
        parts.features = torch.stack(means) if means else feats.new_zeros((0, feats.shape[0]))
        soft = [
            prototype_soft_scores(f[None], self.prototypes[int(obj.gt_classes[j])], int(counts[j]), self.temperature)[0]
            for f, j in zip(means, owner)
        ]
        parts.soft_scores = torch.stack(soft) if soft else torch.zeros((0, k), device=device)
        return {"instances": self._objects_out(obj, (height, width)), "part_instances": parts}
