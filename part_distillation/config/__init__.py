"""Config keys of part_distillation, on top of detectron2's and Mask2Former's, and :func:`load_cfg`.

The keys live by family: ``pipeline.py`` (input, backbone, Mask2Former overrides, stages 1-4, paper path, part
metrics, visualization) and ``discovery.py`` (paired views, the part-discovery heads, the ViT backbone).
Every key has a comment right above it saying where its default comes from.
"""

from detectron2.config import CfgNode as CN

from .discovery import add_discovery_config
from .pipeline import add_pipeline_config

__all__ = ["add_part_distillation_config", "load_cfg", "KEY_FILES"]


def add_part_distillation_config(cfg: CN) -> CN:
    """Add Mask2Former's keys, then ours, to ``cfg`` (in place; also returned for chaining)."""
    from ..utils.compat import import_mask2former

    import_mask2former()
    from mask2former import add_maskformer2_config

    if not hasattr(cfg.MODEL, "MASK_FORMER"):
        from detectron2.projects.deeplab import add_deeplab_config

        add_deeplab_config(cfg)  # Mask2Former's ResNet configs use its keys (e.g. RESNETS.STEM_TYPE)
        add_maskformer2_config(cfg)
    add_pipeline_config(cfg)
    add_discovery_config(cfg)
    return cfg


# Where valid keys are defined, for the error messages of load_cfg.
KEY_FILES = "part_distillation/config/{pipeline,discovery}.py, mask2former/config.py and detectron2/config/defaults.py"


def load_cfg(config_file: str, opts=()) -> CN:
    """detectron2's defaults + Mask2Former's + ours, merged from ``config_file`` and ``opts``; not frozen.

    Unknown keys raise :class:`~part_distillation.utils.errors.ConfigError` naming the key, where it
    came from and where keys live. Used by the tools (through ``engine.setup``) and by models that
    build another model from its own config file (e.g. the object model of stage 1).
    """
    import os

    from detectron2.config import get_cfg

    from ..utils.errors import ConfigError

    import yaml

    cfg = get_cfg()
    add_part_distillation_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"Config file {config_file!r} does not exist; pass a file from configs/.")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            if "was renamed to" in str(e.args[0]):  # a key that moved (pipeline.RENAMED_KEYS)
                raise ConfigError(f"{config_file}: {e.args[0]}") from None
            raise ConfigError(f"{config_file}: {e.args[0]}. Fix the key's spelling; valid keys are in {KEY_FILES}.")
        except yaml.YAMLError as e:  # malformed YAML (this file or a _BASE_)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"{config_file} is not valid YAML{where} ({problem}); fix the file's syntax.") from None
        except (ValueError, AssertionError, TypeError, AttributeError, OSError) as e:  # type mismatch, bad _BASE_
            message = str(e.args[0] if e.args else e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{config_file}: {message}. Valid keys and types are in {KEY_FILES}.") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        if isinstance(e, KeyError) and "was renamed to" in str(e.args[0]):
            raise ConfigError(f"command-line opts: {e.args[0]}") from None
        raise ConfigError(f"command-line opts: {e.args[0] if e.args else e}. Valid keys are in {KEY_FILES}.")
    return cfg
