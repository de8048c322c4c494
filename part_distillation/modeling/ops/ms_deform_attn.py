"""Multi-scale deformable attention with an explicit CUDA-op / pure-PyTorch dispatch.

Mask2Former's ``MSDeformAttn`` calls the compiled ``MultiScaleDeformableAttention`` extension inside
a bare ``try/except`` and silently falls back to PyTorch on *any* error, which also hides real CUDA
failures and tries the CUDA kernel on CPU tensors first. We replace the autograd function it uses
with a dispatcher: the compiled op for CUDA tensors when it is importable, PyTorch otherwise.
"""

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

_MSDA = None
_MSDA_CHECKED = False


def load_cuda_op():
    """The compiled ``MultiScaleDeformableAttention`` module, or None when it is not installed."""
    global _MSDA, _MSDA_CHECKED
    if not _MSDA_CHECKED:
        try:
            _MSDA = importlib.import_module("MultiScaleDeformableAttention")
        except ImportError:
            _MSDA = None
        _MSDA_CHECKED = True
    return _MSDA


def use_cuda_op(value: torch.Tensor) -> bool:
    return value.is_cuda and load_cuda_op() is not None


class DispatchingMSDeformAttnFunction:
    """Drop-in for Mask2Former's ``MSDeformAttnFunction`` (same ``apply`` signature)."""

    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        from mask2former.modeling.pixel_decoder.ops.functions import ms_deform_attn_func as f

        if use_cuda_op(value):
            f.MSDA = load_cuda_op()  # the upstream function reads this module-level name
            return f.MSDeformAttnFunction.apply(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
            )
        return f.ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


def patch_mask2former() -> None:
    """Make Mask2Former's MSDeformAttn module use :class:`DispatchingMSDeformAttnFunction`."""
    from mask2former.modeling.pixel_decoder.ops.modules import ms_deform_attn as m

    if m.MSDeformAttnFunction is not DispatchingMSDeformAttnFunction:
        m.MSDeformAttnFunction = DispatchingMSDeformAttnFunction
        logger.debug("MSDeformAttn: CUDA op %s", "available" if load_cuda_op() else "absent; using PyTorch")
