#!/usr/bin/env python
"""Export a stage-2 proposal or stage-4 distillation model to TorchScript (and ONNX when the onnx package is
installed) through detectron2's TracingAdapter; checks the exported outputs against the eager model.

    python tools/export_model.py --config-file configs/quick_schedules/stage4_distillation_toyparts.yaml \
        --output out/export --format torchscript onnx --opts MODEL.WEIGHTS output/demo/stage4/model_final.pth

Writes ``model.ts`` (``torch.jit.load``-able; inputs: images [B, 3, H, W] float raw pixels in INPUT.FORMAT at
the export size[, object_class int64 [1]]; outputs: a tuple in the order of ``export.json``'s "outputs"),
``model.onnx`` (with --format onnx), and ``export.json`` (input size, outputs, parity). What the graph holds and
what stays in Python (post-processing): see part_distillation/engine/export.py and GETTING_STARTED.md.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("part_distillation.export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, help="folder for model.ts / model.onnx / export.json")
    p.add_argument("--format", nargs="+", choices=["torchscript", "onnx"], default=["torchscript"])
    p.add_argument("--sample-image", default="", help="image to trace on (default: the first of DATASETS.TEST[0])")
    p.add_argument("--object-class", type=int, default=0, help="object class of the traced sample (distillation)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def _sample(cfg, path):
    """A (1, 3, H, W) float batch in INPUT.FORMAT, resized as at test time and padded to size_divisibility."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import ImageList

    import part_distillation.data.datasets  # noqa: F401  (lazy registrations)
    from part_distillation.utils.errors import ConfigError

    if not path:
        if not cfg.DATASETS.TEST or cfg.DATASETS.TEST[0] not in DatasetCatalog.list():
            raise ConfigError(
                "no --sample-image and DATASETS.TEST[0] is not a registered dataset: give --sample-image."
            )
        path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
    image = read_image(path, format=cfg.INPUT.FORMAT)
    image = (
        T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        .get_transform(image)
        .apply_image(image)
    )
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return ImageList.from_tensors([tensor], cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY).tensor, path


def main(argv=None) -> dict:
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    from part_distillation.utils.io import atomic_file, atomic_write_bytes
    from part_distillation.engine import check_runtime, load_cfg
    from part_distillation.engine.export import ExportableHead, export_onnx, export_torchscript, max_abs_diff

    args = parse_args(argv)
    if not logging.getLogger("part_distillation").handlers:
        setup_logger(name="part_distillation", abbrev_name="pd")
    cfg = check_runtime(load_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"]))
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("No MODEL.WEIGHTS: exporting a freshly initialised %s.", cfg.MODEL.META_ARCHITECTURE)
    head = ExportableHead(model)
    images, sample_path = _sample(cfg, args.sample_image)
    object_class = torch.tensor([args.object_class], dtype=torch.int64)
    os.makedirs(args.output, exist_ok=True)
    info = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "input_size": list(images.shape[-2:]),
        "input_format": cfg.INPUT.FORMAT,
        "sample_image": sample_path,
        "inputs": ["images"] + (["object_class"] if head.part_classifier is not None else []),
        "files": {},
    }
    with torch.no_grad():
        eager = head(images, object_class)
    if "torchscript" in args.format:
        traced, adapter = export_torchscript(head, images, object_class)
        path = os.path.join(args.output, "model.ts")
        with atomic_file(path) as f:
            torch.jit.save(traced, f)
        loaded = torch.jit.load(path)
        with torch.no_grad():
            exported = adapter.outputs_schema(loaded(*adapter.flattened_inputs))
        info["outputs"] = list(adapter.outputs_schema.keys)
        info["torchscript_max_abs_diff"] = max_abs_diff(eager, exported)
        info["files"]["torchscript"] = path
    if "onnx" in args.format:
        path = os.path.join(args.output, "model.onnx")
        tmp = os.path.join(args.output, ".model.onnx.tmp")
        info["onnx_outputs"] = export_onnx(head, images, tmp, object_class)
        os.replace(tmp, path)
        info["files"]["onnx"] = path
    atomic_write_bytes(
        os.path.join(os.path.abspath(args.output), "export.json"), json.dumps(info, indent=1).encode("utf-8")
    )
    logger.info(
        "Exported %s to %s (TorchScript vs eager: max |diff| %s)",
        cfg.MODEL.META_ARCHITECTURE,
        args.output,
        info.get("torchscript_max_abs_diff"),
    )
    return info


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)
