"""Optimizer as Mask2Former builds it: per-parameter LR/decay groups, full-model gradient clipping."""

import itertools
import logging

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

from ..utils.errors import ConfigError

__all__ = ["build_optimizer", "freeze_modules"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def freeze_modules(model: torch.nn.Module, keys) -> int:
    """Set ``requires_grad=False`` on parameters of modules whose name contains any of ``keys``.

    Returns the number of frozen parameter tensors (the reference code freezes "backbone" and "encoder").
    """
    frozen = 0
    for module_name, module in model.named_modules():
        if any(k in module_name for k in keys):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += 1
    return frozen


def _param_groups(cfg, model):
    solver = cfg.SOLVER
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            lr, wd = solver.BASE_LR, solver.WEIGHT_DECAY
            if "backbone" in module_name:
                lr *= solver.BACKBONE_MULTIPLIER
            if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                wd = 0.0  # Swin's position tables are not regularised
            elif isinstance(module, _NORM_TYPES):
                wd = solver.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding):
                wd = solver.WEIGHT_DECAY_EMBED  # query and level embeddings
            groups.append({"params": [p], "lr": lr, "weight_decay": wd})
    return groups


def _with_full_model_clipping(optim_cls, clip_value: float, norm_type: float):
    """Subclass ``optim_cls`` so ``step`` first clips the global gradient norm over all parameters."""

    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*(g["params"] for g in self.param_groups))
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optim_cls.__name__}WithFullModelClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    keys = list(cfg.MODEL.MASK_FORMER.FREEZE_KEYS)
    if keys:
        logger.info("Froze %d parameter tensors matching %s", freeze_modules(model, keys), keys)
    groups = _param_groups(cfg, model)
    if not groups:
        raise ConfigError(
            "The model has no trainable parameters (check MODEL.MASK_FORMER.FREEZE_KEYS, MODEL.BACKBONE.FREEZE_AT, "
            "MODEL.PART_DISCOVERY.FREEZE_BACKBONE); a model with nothing to learn is run with tools/train_net.py "
            "--eval-only."
        )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        betas = tuple(float(b) for b in cfg.SOLVER.BETAS)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"SOLVER.BETAS={list(cfg.SOLVER.BETAS)!r}: give two values in [0, 1), e.g. (0.9, 0.95).")
        optim_cls, kwargs = torch.optim.AdamW, {"betas": betas}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'ADAMW' or 'SGD'.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:  # "value"/"norm" clip per parameter, as detectron2 does
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
