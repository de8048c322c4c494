"""Small, explicit shims that make the pinned upstream packages import on a CPU-only Python 3.11 box.

Each shim is idempotent and only touches what is broken; see INSTALL.md for the failure it fixes.
"""

import sys
import types

__all__ = ["install_fast_eval_api_shim", "import_mask2former", "import_panoptic_parts"]


def install_fast_eval_api_shim() -> bool:
    """Provide ``detectron2.evaluation.fast_eval_api`` when detectron2 was installed without ``_C``.

    ``mask2former.evaluation.instance_evaluation`` imports ``COCOeval_opt`` from it unconditionally.
    pycocotools' ``COCOeval`` computes the same numbers (only slower), so we register it under that
    name. Returns True if the shim was installed, False if the real module imports.
    """
    name = "detectron2.evaluation.fast_eval_api"
    if name in sys.modules:
        return False
    import detectron2.evaluation  # noqa: F401  (parent package must exist first)

    try:
        __import__(name)
        return False
    except ImportError:
        from pycocotools.cocoeval import COCOeval

        shim = types.ModuleType(name)
        shim.COCOeval_opt = COCOeval
        shim.__doc__ = "part_distillation stand-in: COCOeval_opt is pycocotools' COCOeval (no detectron2._C)."
        sys.modules[name] = shim
        return True


def import_mask2former():
    """Import ``mask2former`` (registers its heads/backbones) after installing the needed shims.

    The MSDeformAttn dispatch (``modeling/ops/ms_deform_attn.py``) is installed by
    ``part_distillation.modeling`` when it is imported (utils never import modeling).
    """
    install_fast_eval_api_shim()
    import mask2former

    return mask2former


def import_panoptic_parts():
    """Import ``panoptic_parts`` (2.0rc6), which refuses Python >= 3.10 by mistake, and return it.

    Its ``specs/dataset_spec.py`` runs ``float(platform.python_version()[:3]) <= 3.6`` at import time,
    and '3.1' (from '3.10'/'3.11'...) passes that test, so the import raises ``OSError``. We make
    ``platform.python_version`` report '3.7.0' only for the duration of the import, then restore it.
    """
    if "panoptic_parts" in sys.modules:
        return sys.modules["panoptic_parts"]
    import platform

    real_python_version = platform.python_version
    platform.python_version = lambda: "3.7.0"
    try:
        import panoptic_parts
        import panoptic_parts.specs.dataset_spec  # noqa: F401  (the module with the version check)
    finally:
        platform.python_version = real_python_version
    return panoptic_parts


def quiet_upstream_warnings() -> None:
    """Hide deprecation warnings that pinned upstream packages emit on every call (CLI tools only).

    Mask2Former's matcher warns about ``torch.cuda.amp.autocast`` at every training step, which
    buries the training log; our own warnings stay visible.
    """
    import warnings

    for module in ("mask2former", "torch", "timm", "detectron2", "pycocotools"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message="torch.meshgrid")
