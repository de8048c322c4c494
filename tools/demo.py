#!/usr/bin/env python
"""End-to-end CPU demo on the embedded toyparts dataset (what `make demo` runs).

Today it runs stages 0 and 1: generate toyparts (if absent); train the Mask2Former object-instance
quick schedule on the bundled ImageNet EfficientNet-Lite0, evaluate COCO mask AP on toyparts_val and
write prediction overlays; then label toyparts_val with part pseudo-labels by pixel grouping (GT object
masks) on EfficientNet features and, as the baseline, on raw RGB, reporting AR@k against GT parts.
Later stages are appended here as they land.
"""
import argparse
import logging
import os

import cv2
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from part_distillation.data.datasets.toyparts import default_toyparts_root, ensure_toyparts
from part_distillation.engine import Trainer, check_runtime, load_cfg, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE0_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "stage0_instance_toyparts.yaml")
STAGE1_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "stage1_pixel_grouping_toyparts.yaml")
STAGE1_RGB_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "stage1_pixel_grouping_toyparts_rgb.yaml")
logger = logging.getLogger("part_distillation.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo", help="where checkpoints, metrics and pictures go")
    p.add_argument("--num-train", type=int, default=200, help="toyparts training images (if generated)")
    p.add_argument("--num-val", type=int, default=50, help="toyparts validation images (if generated)")
    p.add_argument("--num-vis", type=int, default=6, help="validation images to render with predictions")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for stage 0 (KEY VALUE ...)")
    return p.parse_args(argv)


def train_stage0(output_dir, opts):
    cfg = check_runtime(load_cfg(STAGE0_CONFIG, ["OUTPUT_DIR", os.path.join(output_dir, "stage0"), *opts]))
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # the final evaluation hook's results
    return cfg, trainer.model, results


def run_stage1(config, output_dir, name, vis=0):
    """Pixel grouping on toyparts_val with GT object masks; returns the labelling summary with AR@k."""
    import make_pseudo_labels

    argv = ["--config-file", config, "--shard-size", "100", "--vis", str(vis),
            "DATASETS.PSEUDO_LABEL_ROOT", os.path.join(output_dir, "pseudo_labels", name),
            "OUTPUT_DIR", os.path.join(output_dir, name)]  # fmt: skip
    return make_pseudo_labels.main(make_pseudo_labels.parse_args(argv))


@torch.no_grad()
def render_predictions(cfg, model, out_dir, num_images, score_threshold=0.5):
    """Overlay the model's instances above ``score_threshold`` on validation images."""
    from part_distillation.data.dataset_mappers import build_dataset_mapper

    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    mapper = build_dataset_mapper(cfg, is_train=False)
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    paths = []
    for record in DatasetCatalog.get(dataset)[:num_images]:
        inputs = mapper(record)
        instances = model([inputs])[0]["instances"].to("cpu")
        instances = instances[instances.scores > score_threshold]
        image = cv2.imread(record["file_name"])[:, :, ::-1]
        vis = Visualizer(image, metadata, scale=2.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
        path = os.path.join(out_dir, f"{record['image_id']}.png")
        tmp = path + ".tmp.png"
        cv2.imwrite(tmp, vis.get_image()[:, :, ::-1])
        os.replace(tmp, path)  # no half-written pictures
        paths.append(path)
    return paths


def _ars(summary):
    ar = summary["ar"]
    return f"{ar['AR@1']:.1f} / {ar['AR@10']:.1f} / {ar['AR@200']:.1f}"


def print_table(rows):
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 24))


def main(argv=None):
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="part_distillation")
    root = ensure_toyparts(default_toyparts_root(), num_train=args.num_train, num_val=args.num_val)
    logger.info("toyparts at %s", root)
    cfg, model, results = train_stage0(args.output, args.opts)
    pictures = render_predictions(cfg, model, os.path.join(args.output, "stage0_predictions"), args.num_vis)
    stage1 = run_stage1(STAGE1_CONFIG, args.output, "stage1_grouping", vis=args.num_vis)
    stage1_rgb = run_stage1(STAGE1_RGB_CONFIG, args.output, "stage1_grouping_rgb")
    segm = results.get("segm", {})
    print_table(
        [
            ("stage 0: objects (Mask2Former, EfficientNet-Lite0)", ""),
            ("  toyparts_val mask AP", f"{segm.get('AP', float('nan')):.1f}"),
            ("  toyparts_val mask AP50", f"{segm.get('AP50', float('nan')):.1f}"),
            ("  toyparts_val mask AP75", f"{segm.get('AP75', float('nan')):.1f}"),
            ("  checkpoint", os.path.join(cfg.OUTPUT_DIR, "model_final.pth")),
            ("  prediction overlays", f"{len(pictures)} in {os.path.dirname(pictures[0]) if pictures else '-'}"),
            ("stage 1: part pseudo-labels (GT objects, K-means K=4 + dense CRF), AR@1 / AR@10 / AR@200", ""),
            ("  EfficientNet-Lite0 res3+res4 features", _ars(stage1)),
            ("  raw RGB (baseline)", _ars(stage1_rgb)),
            ("  pseudo-label overlays", os.path.join(args.output, "stage1_grouping", "vis")),
        ]
    )
    return {"stage0": results, "stage1": stage1, "stage1_rgb": stage1_rgb}


if __name__ == "__main__":
    run_cli(main)
