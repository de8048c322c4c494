"""TorchScript / ONNX export of the Mask2Former part models (stage 2 proposals, stage 4 distillation).

What is exported is the *network*: normalisation, backbone, pixel decoder and transformer decoder, from a
padded image batch to the raw predictions — ``pred_logits`` [B, Q, 2] (part / no part), ``pred_masks``
[B, Q, H/4, W/4] (mask logits) and, for :class:`PartDistillationModel`, ``query_feats`` [B, Q, D] (the class
head's input) and ``part_logits`` [B, Q, N_c^p] under the classifier of a given object class. The inference
that follows (top-k queries, resizing, object masking, per-pixel assignment, dropping empty parts) stays in
Python: it returns a data-dependent number of instances, which tracing would freeze to the traced image's
count. Tracing goes through detectron2's :class:`~detectron2.export.TracingAdapter` (inputs and outputs
flattened to tuples of tensors, with the schema to rebuild them).

Not exportable, and why:

* Mask2Former's compiled ``MultiScaleDeformableAttention`` CUDA op (a custom autograd Function with no
  TorchScript/ONNX symbolic): export runs on the CPU, where our dispatcher
  (:mod:`part_distillation.modeling.ops.ms_deform_attn`) uses the pure-PyTorch ``grid_sample`` path, so
  the exported graph holds that path (slower on GPU than the CUDA op, same values within float error);
* the Python post-processing above (data-dependent shapes). Scripting instead of tracing
  (``torch.jit.script``, or detectron2's ``scripting_with_instances`` for Instances outputs) fails on
  Mask2Former's head already ("UnsupportedNodeError: try blocks aren't supported", with the installed
  maskformer2 0.1), so tracing at a fixed input size is used;
* the traced graph is specialised to the traced input's height and width (sizes read from ``.shape``
  become constants, e.g. in the deformable attention's level shapes): export at the padded size you serve.
"""

import logging
import warnings

import torch
from detectron2.export import TracingAdapter
from torch import nn

from ..utils.errors import ConfigError

__all__ = ["ExportableHead", "EXPORTABLE_META_ARCHS", "export_torchscript", "export_onnx", "max_abs_diff"]

logger = logging.getLogger(__name__)

EXPORTABLE_META_ARCHS = ("ProposalModel", "PartDistillationModel", "PartRankingModel", "Mask2Former")


class ExportableHead(nn.Module):
    """A built Mask2Former-family model's network as a tensor → dict-of-tensors module.

    ``forward(images [B, 3, H, W] float raw pixels in INPUT.FORMAT, H and W multiples of the model's
    size_divisibility[, object_class: int64 [1]])``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in ("backbone", "sem_seg_head", "pixel_mean", "pixel_std"):
            if not hasattr(model, name):
                raise ConfigError(
                    f"{type(model).__name__} has no {name!r}: export supports the Mask2Former part models "
                    f"({', '.join(EXPORTABLE_META_ARCHS)})."
                )
        self.model = model.eval()
        self.part_classifier = getattr(model, "part_classifier", None)
        self._feats = None
        # the class head's input = the query embedding the part classifiers read (as PartDistillationModel)
        self._hook = model.sem_seg_head.predictor.class_embed.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._feats = inputs[0]

    def forward(self, images: torch.Tensor, object_class: torch.Tensor = None) -> dict:
        m = self.model
        out = m.sem_seg_head(m.backbone((images - m.pixel_mean) / m.pixel_std))
        if isinstance(getattr(m, "_query_feats", None), list):
            m._query_feats.clear()  # the distillation model's own capture list (filled by its hook)
        result = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
        if self.part_classifier is not None:
            feats = self._feats
            b, q, d = feats.shape
            index = object_class.reshape(1).expand(b * q)
            result["query_feats"] = feats
            result["part_logits"] = self.part_classifier(feats.reshape(b * q, d), index).reshape(b, q, -1)
        self._feats = None
        return result


def _adapter(head: ExportableHead, images: torch.Tensor, object_class=None) -> TracingAdapter:
    inputs = (images,) if head.part_classifier is None else (images, object_class)
    return TracingAdapter(head, inputs, allow_non_tensor=False)


def export_torchscript(head: ExportableHead, images: torch.Tensor, object_class=None):
    """Trace ``head`` on ``images`` (and ``object_class``); returns (traced module, adapter).

    The traced module takes the flattened inputs and returns a tuple of tensors;
    ``adapter.outputs_schema(outputs)`` rebuilds the dict.
    """
    adapter = _adapter(head, images, object_class)
    with torch.no_grad(), warnings.catch_warnings():
        # Python-side shape checks of upstream modules become constants: expected at a fixed input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def export_onnx(head: ExportableHead, images: torch.Tensor, path: str, object_class=None, opset: int = 17):
    """ONNX export of the same traced graph (needs the ``onnx`` package); returns the output names."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package (pip install onnx); TorchScript export works without it.")
    adapter = _adapter(head, images, object_class)
    names = ["pred_logits", "pred_masks"] + (["query_feats", "part_logits"] if head.part_classifier is not None else [])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            adapter, adapter.flattened_inputs, path, opset_version=opset, output_names=names, dynamo=False
        )
    return names


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two (nested) tuples/lists/dicts of tensors of equal structure."""
    if isinstance(a, dict):
        return max(max_abs_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    return float((a.float() - b.float()).abs().max())
