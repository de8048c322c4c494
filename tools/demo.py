#!/usr/bin/env python
"""End-to-end CPU demo on the embedded toyparts dataset (what `make demo` runs).

Generates toyparts (if absent), then runs the pipeline on the quick schedules:

0. Mask2Former object instances on the bundled ImageNet EfficientNet-Lite0 → COCO mask AP on toyparts_val;
1. part pseudo-labels by pixel grouping inside GT objects (EfficientNet features; raw RGB as the baseline)
   → AR@k against GT parts on toyparts_val; the same labelling of toyparts_train feeds stage 2;
2. class-agnostic part proposals trained on the stage-1 labels → AR@k on toyparts_parts_val;
3. part ranking: per-object-class prototypes over proposal features → a ranked store of toyparts_train;
4. part distillation (per-object-class part classifiers) trained on it → mIoU-mapped on toyparts_parts_val.

It prints one table and writes overlays to ``--output``.
"""
import argparse
import logging
import os

import cv2
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from part_distillation.data.datasets.toyparts import default_toyparts_root, ensure_toyparts
from part_distillation.data.pseudo_labels import register_all_pseudo_label_datasets
from part_distillation.engine import Trainer, check_runtime, load_cfg, run_cli
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules")
STAGE0_CONFIG = os.path.join(QUICK, "stage0_instance_toyparts.yaml")
STAGE1_CONFIG = os.path.join(QUICK, "stage1_pixel_grouping_toyparts.yaml")
STAGE1_RGB_CONFIG = os.path.join(QUICK, "stage1_pixel_grouping_toyparts_rgb.yaml")
STAGE2_CONFIG = os.path.join(QUICK, "stage2_proposals_toyparts.yaml")
STAGE3_CONFIG = os.path.join(QUICK, "stage3_ranking_toyparts.yaml")
STAGE4_CONFIG = os.path.join(QUICK, "stage4_distillation_toyparts.yaml")
logger = logging.getLogger("part_distillation.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo", help="where checkpoints, metrics and pictures go")
    p.add_argument("--num-train", type=int, default=200, help="toyparts training images (if generated)")
    p.add_argument("--num-val", type=int, default=50, help="toyparts validation images (if generated)")
    p.add_argument("--num-vis", type=int, default=6, help="validation images to render with predictions")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides applied to every stage (KEY VALUE ...)")
    return p.parse_args(argv)


def train(config, output_dir, opts, part_classes=0):
    """Train a quick schedule in this process; returns (cfg, model, last evaluation results)."""
    cfg = check_runtime(load_cfg(config, ["OUTPUT_DIR", output_dir, *opts]))
    cfg.freeze()
    names = [f"part {i}" for i in range(part_classes)] if part_classes else ["part"]
    register_all_pseudo_label_datasets(cfg.DATASETS.PSEUDO_LABEL_ROOT, thing_classes=names)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_all_rng(cfg.SEED)  # what default_setup does for train_net: same data order and initialisation
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return cfg, trainer.model, trainer.train()  # train() returns the final evaluation's results


def label(tool, config, output_dir, opts, flags=()):
    """Run a labelling tool (make_pseudo_labels / rank_parts) in this process; returns its summary.

    ``flags`` are the tool's own options (e.g. ``--vis 2``), ``opts`` config overrides (KEY VALUE ...).
    """
    module = __import__(tool)
    argv = ["--config-file", config, "--shard-size", "100", *flags, *opts, "OUTPUT_DIR", output_dir]
    return module.main(module.parse_args(argv))


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


def print_table(rows):
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 24))


def _ars(ar):
    return f"{ar['AR@1']:.1f} / {ar['AR@10']:.1f} / {ar['AR@200']:.1f}"


def main(argv=None):
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="part_distillation")
    out = args.output
    root = ensure_toyparts(default_toyparts_root(), num_train=args.num_train, num_val=args.num_val)
    logger.info("toyparts at %s", root)
    labels = os.path.join(out, "pseudo_labels")

    cfg0, model0, stage0 = train(STAGE0_CONFIG, os.path.join(out, "stage0"), args.opts)
    pictures = render_predictions(cfg0, model0, os.path.join(out, "stage0_predictions"), args.num_vis)

    extra = list(args.opts)
    stage1 = label("make_pseudo_labels", STAGE1_CONFIG, os.path.join(out, "stage1_val"),
                   ["DATASETS.PSEUDO_LABEL_ROOT", os.path.join(labels, "val"), *extra], ["--vis", str(args.num_vis)])
    stage1_rgb = label("make_pseudo_labels", STAGE1_RGB_CONFIG, os.path.join(out, "stage1_val_rgb"),
                       ["DATASETS.PSEUDO_LABEL_ROOT", os.path.join(labels, "val_rgb"), *extra])
    label("make_pseudo_labels", STAGE1_CONFIG, os.path.join(out, "stage1_train"),
          ["DATASETS.PSEUDO_LABEL_ROOT", labels, "DATASETS.TEST", "('toyparts_train',)",
           "MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET", "", *extra])  # fmt: skip

    stage2_dir = os.path.join(out, "stage2")
    _, _, stage2 = train(STAGE2_CONFIG, stage2_dir, ["DATASETS.PSEUDO_LABEL_ROOT", labels, *args.opts])
    stage2_weights = os.path.join(stage2_dir, "model_final.pth")
    label("rank_parts", STAGE3_CONFIG, os.path.join(out, "stage3"),
          ["DATASETS.PSEUDO_LABEL_ROOT", labels, "MODEL.WEIGHTS", stage2_weights, *extra])  # fmt: skip
    stage4_opts = ["DATASETS.PSEUDO_LABEL_ROOT", labels, "MODEL.PART_DISTILLATION.INIT_FROM", stage2_weights,
                   "DATASETS.TEST", "('toyparts_parts_val',)", "TEST.EVALUATOR_TYPE", "part_miou_mapped", *args.opts]
    cfg4, _, stage4 = train(STAGE4_CONFIG, os.path.join(out, "stage4"), stage4_opts,
                            part_classes=load_cfg(STAGE4_CONFIG).MODEL.PART_DISTILLATION.NUM_PART_CLASSES)  # fmt: skip

    segm, miou = stage0.get("segm", {}), stage4.get("part_miou_mapped", {})
    print_table(
        [
            ("stage 0: objects (Mask2Former, EfficientNet-Lite0), toyparts_val mask AP / AP50 / AP75",
             f"{segm.get('AP', float('nan')):.1f} / {segm.get('AP50', float('nan')):.1f} / "
             f"{segm.get('AP75', float('nan')):.1f}"),
            ("stage 1: part pseudo-labels (GT objects, K=4 + dense CRF), AR@1 / AR@10 / AR@200", ""),
            ("  EfficientNet-Lite0 res3+res4 features", _ars(stage1["ar"])),
            ("  raw RGB (baseline)", _ars(stage1_rgb["ar"])),
            ("stage 2: part proposals trained on stage-1 labels, AR@1 / AR@10 / AR@200", _ars(stage2["part_proposals"])),
            ("stage 4: part distillation, mIoU-mapped C-mIoU / A-mIoU",
             f"{miou.get('C-mIoU', float('nan')):.1f} / {miou.get('A-mIoU', float('nan')):.1f}"),
            ("checkpoints", f"{out}/stage{{0,2,4}}/model_final.pth"),
            ("object overlays", f"{len(pictures)} in {os.path.join(out, 'stage0_predictions')}"),
            ("pseudo-label overlays", os.path.join(out, "stage1_val", "vis")),
        ]
    )  # fmt: skip
    return {"stage0": stage0, "stage1": stage1, "stage1_rgb": stage1_rgb, "stage2": stage2, "stage4": stage4,
            "stage4_config": cfg4}  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
