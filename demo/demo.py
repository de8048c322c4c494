#!/usr/bin/env python
"""Parts on your own images, in detectron2's demo style.

    python demo/demo.py --input photo.jpg photos/ "more/*.png" --output out/ \
        [--config-file CFG --opts MODEL.WEIGHTS model_final.pth] [--object-masks objects.json]

For every image: ``out/<name>.png`` (parts coloured per part label with a legend, object contours in
white, where the objects came from written above the legend) and one ``out/predictions.json`` with every
object and part as compressed COCO RLE. Without ``--config-file`` it runs stage-1 pixel grouping
(``configs/demo/pixel_grouping_lite0.yaml``: K-means of ImageNet EfficientNet-Lite0 features inside each
object + dense CRF), which needs no trained weights. Objects: ``--object-masks`` (a COCO instances JSON whose
``images[].file_name`` base names match the inputs), else the model's own object detector when the config
has one, else the whole image as one object.

(``make demo`` is a different program: ``tools/demo.py`` runs the whole toyparts training pipeline.)
"""

import argparse
import json
import logging
import os
import sys

import cv2
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo", "pixel_grouping_lite0.yaml")
logger = logging.getLogger("part_distillation.demo_images")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="model config (default: stage-1 pixel grouping)"
    )
    p.add_argument("--input", nargs="+", required=True, help="image files, folders, or quoted glob patterns")
    p.add_argument("--output", required=True, help="folder for the pictures and predictions.json")
    p.add_argument("--object-masks", default="", help="COCO instances JSON with the objects of the images")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from detectron2.utils.logger import setup_logger

    from part_distillation.data.pseudo_labels import atomic_write_bytes
    from part_distillation.engine import load_cfg
    from part_distillation.engine.image_inputs import CocoObjectMasks, expand_inputs, output_names, prediction_record
    from part_distillation.engine.predictor import PartPredictor
    from part_distillation.engine.setup import check_runtime
    from part_distillation.utils.compat import quiet_upstream_warnings
    from part_distillation.utils.part_overlay import part_label_names, render_parts_with_legend

    args = parse_args(argv)
    quiet_upstream_warnings()
    if not logging.getLogger("part_distillation").handlers:
        setup_logger(name="part_distillation", abbrev_name="pd")
    paths = expand_inputs(args.input)  # errors before the model is built
    object_json = CocoObjectMasks(args.object_masks) if args.object_masks else None
    cfg = check_runtime(load_cfg(args.config_file, args.opts))
    predictor = PartPredictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    records, skipped = [], []
    for path, name in tqdm(list(zip(paths, output_names(paths))), desc="images", unit="img"):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("Skipping %s: not a readable image", path)
            skipped.append(path)
            continue
        given = object_json.get(path, *image.shape[:2]) if object_json is not None else None
        if object_json is not None and given is None:
            logger.warning("%s is not in %s: the whole image is its object", path, args.object_masks)
        masks, classes, scores = given if given is not None else (None, None, None)
        pred = predictor(image, object_masks=masks, object_classes=classes, object_scores=scores)
        parts = pred["parts"]
        labels = part_label_names(parts.pred_classes.tolist(), parts.object_index.tolist(), pred["class_agnostic"])
        source = pred["object_source"] + (f" ({os.path.basename(args.object_masks)})" if given is not None else "")
        title = [f"objects: {len(pred['objects'])}", source, f"model: {cfg.MODEL.META_ARCHITECTURE}"]
        canvas, legend = render_parts_with_legend(
            image, pred["objects"].pred_masks.numpy(), parts.pred_masks.numpy(), labels, title
        )
        ok, png = cv2.imencode(".png", canvas)
        if not ok:
            raise RuntimeError(f"cv2 could not encode the picture of {path}")
        atomic_write_bytes(os.path.join(args.output, name), png.tobytes())
        record = prediction_record(
            path, pred, labels, legend, name, object_json.category_names if object_json else None
        )
        record["object_source"] = source
        records.append(record)
    result = {
        "config_file": args.config_file,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "weights": cfg.MODEL.WEIGHTS or "none (training-free: the backbone's pretrained weights)",
        "mask_format": "compressed COCO RLE {size: [H, W], counts}",
        "images": records,
        "skipped": skipped,
    }
    atomic_write_bytes(os.path.join(args.output, "predictions.json"), json.dumps(result, indent=1).encode("utf-8"))
    logger.info("Wrote %d pictures and predictions.json to %s (%d skipped)", len(records), args.output, len(skipped))
    return result


if __name__ == "__main__":
    sys.path.insert(0, REPO)  # run from a checkout without installing
    from part_distillation.engine import run_cli

    run_cli(main)
