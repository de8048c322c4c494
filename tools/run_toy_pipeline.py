#!/usr/bin/env python
"""End-to-end CPU demo on the embedded toyparts dataset (what `make demo` runs; formerly tools/demo.py).

Generates toyparts (if absent), then runs the pipeline on the quick schedules:

0. Mask2Former object instances on the bundled ImageNet EfficientNet-Lite0 → COCO mask AP on toyparts_val;
1. part pseudo-labels by pixel grouping inside GT objects (EfficientNet features; raw RGB as the baseline)
   → AR@k against GT parts on toyparts_val; the same labelling of toyparts_train feeds stage 2;
2. class-agnostic part proposals trained on the stage-1 labels → AR@k on toyparts_parts_val;
3. part ranking inside the objects of the stage-1 store: per-object-class prototypes over proposal features →
   a ranked store of toyparts_train;
4. part distillation (per-object-class part classifiers) trained on it → mIoU-clustered and -mapped on
   toyparts_parts_val, with overlays of its parts per object class;

next to two baselines scored the same way: raw-RGB K-means per object class (K = 8) and the one-stage
baseline (K-means of the same features per object class, K = 8, labels used directly and self-trained with
the stage-4 recipe). It prints one table and writes overlays to ``--output``.
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
from part_distillation.utils.io import atomic_write_bytes

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules")
STAGE0_CONFIG = os.path.join(QUICK, "stage0_instance_toyparts.yaml")
STAGE1_CONFIG = os.path.join(QUICK, "stage1_pixel_grouping_toyparts.yaml")
STAGE1_RGB_CONFIG = os.path.join(QUICK, "stage1_pixel_grouping_toyparts_rgb.yaml")
STAGE2_CONFIG = os.path.join(QUICK, "stage2_proposals_toyparts.yaml")
STAGE3_CONFIG = os.path.join(QUICK, "stage3_ranking_toyparts.yaml")
STAGE4_CONFIG = os.path.join(QUICK, "stage4_distillation_toyparts.yaml")
ONESTAGE_CONFIG = os.path.join(QUICK, "onestage_grouping_toyparts.yaml")
ONESTAGE_RGB_CONFIG = os.path.join(QUICK, "onestage_grouping_toyparts_rgb.yaml")
ONESTAGE_TRAIN_CONFIG = os.path.join(QUICK, "onestage_distillation_toyparts.yaml")
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


def _write_picture(path, vis):
    """A Visualizer's picture as PNG, through a temporary file: no half-written pictures."""
    ok, png = cv2.imencode(".png", vis.get_image()[:, :, ::-1])
    if not ok:
        raise RuntimeError(f"cannot encode the picture {path} as PNG")
    atomic_write_bytes(path, png.tobytes())


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
        _write_picture(path, vis)
        paths.append(path)
    return paths


@torch.no_grad()
def render_part_predictions(cfg, model, out_dir, per_class, score_threshold=0.0):
    """Stage-4 parts on validation images, one folder per object class (``<out_dir>/<class>/<image_id>.png``).

    A part class keeps its colour in every picture of an object class, so whether the model found the same
    part in every instance is visible at a glance.
    """
    from detectron2.utils.colormap import colormap

    from part_distillation.data.dataset_mappers import build_dataset_mapper

    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    object_names = metadata.get("object_classes", None) or [str(c) for c in range(1000)]
    palette = colormap(rgb=True, maximum=1)
    mapper = build_dataset_mapper(cfg, is_train=False)
    model.eval()
    counts, paths = {}, []
    for record in DatasetCatalog.get(dataset):
        inputs = mapper(record)
        classes = inputs["objects"].gt_classes.tolist()
        wanted = [m for m, c in enumerate(classes) if c >= 0 and counts.get(c, 0) < per_class]
        if not wanted:
            continue
        parts = model([inputs])[0]["part_instances"].to("cpu")
        image = cv2.imread(record["file_name"])[:, :, ::-1]
        for m in wanted:
            if counts.get(classes[m], 0) >= per_class:  # two objects of one class in this image
                continue
            mine = parts[(parts.object_index == m) & (parts.scores >= score_threshold)]
            name = object_names[classes[m]].replace(" ", "_")
            vis = Visualizer(image, metadata, scale=2.0, instance_mode=ColorMode.IMAGE).overlay_instances(
                masks=mine.pred_masks.numpy(),
                labels=[f"part {int(k)}" for k in mine.pred_classes],
                assigned_colors=[palette[int(k) % len(palette)] for k in mine.pred_classes],
                alpha=0.6,
            )
            folder = os.path.join(out_dir, name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{record['image_id']}_object{m}.png")
            _write_picture(path, vis)
            paths.append(path)
            counts[classes[m]] = counts.get(classes[m], 0) + 1
    return paths


def print_table(rows):
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 24))


def _ars(ar):
    return f"{ar['AR@1']:.1f} / {ar['AR@10']:.1f} / {ar['AR@200']:.1f}"


def evaluate(cfg, model, evaluator_type, opts=()):
    """``model`` evaluated on cfg.DATASETS.TEST[0] with another evaluator (e.g. mIoU-mapped after mIoU-clustered)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(["TEST.EVALUATOR_TYPE", evaluator_type, *opts])
    cfg.freeze()
    return Trainer.test(cfg, model)


def class_level_baseline(config, out, labels, extra, stage):
    """One-stage labels: class prototypes fit on toyparts_parts_train (cluster + labelling pass of rank_parts),
    then the labels of toyparts_parts_val with those prototypes, scored by mIoU-clustered and -mapped."""
    label("rank_parts", config, out, ["DATASETS.PSEUDO_LABEL_ROOT", labels, *extra], ["--stage", stage])
    opts = [
        "OUTPUT_DIR",
        out,
        "MODEL.ONE_STAGE.PROTOTYPES",
        os.path.join(out, "prototypes.pth"),
        "DATASETS.TEST",
        "('toyparts_parts_val',)",
        *extra,
    ]
    cfg = check_runtime(load_cfg(config, opts))
    cfg.freeze()
    model = Trainer.build_model(cfg)
    return evaluate(cfg, model, "part_miou"), evaluate(cfg, model, "part_miou_mapped")


def _miou(results, key):
    r = results.get(key, {})
    return f"{r.get('C-mIoU', float('nan')):.1f} / {r.get('A-mIoU', float('nan')):.1f}"


def main(argv=None):
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="part_distillation")
    # Training results are reproducible to the digit only for the same float path: thread count and CPU kernels
    # (stage 0 moved between 40.9 and 44.0 mask AP with them; MODEL_ZOO.md, stage 0), so the log records both.
    logger.info(
        "torch %s, %d threads, CPU kernels %s",
        torch.__version__,
        torch.get_num_threads(),
        torch.backends.cpu.get_cpu_capability(),
    )
    out = args.output
    root = ensure_toyparts(default_toyparts_root(), num_train=args.num_train, num_val=args.num_val)
    logger.info("toyparts at %s", root)
    labels = os.path.join(out, "pseudo_labels")
    extra = list(args.opts)

    # 0. objects
    cfg0, model0, stage0 = train(STAGE0_CONFIG, os.path.join(out, "stage0"), args.opts)
    pictures = render_predictions(cfg0, model0, os.path.join(out, "stage0_predictions"), args.num_vis)

    # 1. pixel grouping: val (scored by AR@k), raw-RGB baseline, train (feeds stage 2 and the ranking)
    stage1 = label(
        "make_pseudo_labels",
        STAGE1_CONFIG,
        os.path.join(out, "stage1_val"),
        ["DATASETS.PSEUDO_LABEL_ROOT", os.path.join(labels, "val"), *extra],
        ["--vis", str(args.num_vis)],
    )
    stage1_rgb = label(
        "make_pseudo_labels",
        STAGE1_RGB_CONFIG,
        os.path.join(out, "stage1_val_rgb"),
        ["DATASETS.PSEUDO_LABEL_ROOT", os.path.join(labels, "val_rgb"), *extra],
    )
    label(
        "make_pseudo_labels",
        STAGE1_CONFIG,
        os.path.join(out, "stage1_train"),
        [
            "DATASETS.PSEUDO_LABEL_ROOT",
            labels,
            "DATASETS.TEST",
            "('toyparts_train',)",
            "MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET",
            "",
            *extra,
        ],
    )

    # 2. part proposals
    stage2_dir = os.path.join(out, "stage2")
    _, _, stage2 = train(STAGE2_CONFIG, stage2_dir, ["DATASETS.PSEUDO_LABEL_ROOT", labels, *args.opts])
    stage2_weights = os.path.join(stage2_dir, "model_final.pth")

    # 3. ranking inside the objects of the stage-1 store → toyparts_train_pseudo_ranking
    label(
        "rank_parts",
        STAGE3_CONFIG,
        os.path.join(out, "stage3"),
        ["DATASETS.PSEUDO_LABEL_ROOT", labels, "MODEL.WEIGHTS", stage2_weights, *extra],
    )

    # 4. distillation, scored by mIoU-clustered (its final evaluation) and mIoU-mapped
    num_part_classes = load_cfg(STAGE4_CONFIG).MODEL.PART_DISTILLATION.NUM_PART_CLASSES
    stage4_opts = [
        "DATASETS.PSEUDO_LABEL_ROOT",
        labels,
        "MODEL.PART_DISTILLATION.INIT_FROM",
        stage2_weights,
        *args.opts,
    ]
    cfg4, model4, stage4 = train(STAGE4_CONFIG, os.path.join(out, "stage4"), stage4_opts, num_part_classes)
    stage4_mapped = evaluate(cfg4, model4, "part_miou_mapped")
    overlays = render_part_predictions(cfg4, model4, os.path.join(out, "stage4_parts"), args.num_vis)

    # baselines: class-level K-means of raw RGB and of the same features (one-stage labels), and one-stage
    # self-training (the stage-4 recipe on the one-stage labels)
    rgb_clustered, rgb_mapped = class_level_baseline(
        ONESTAGE_RGB_CONFIG, os.path.join(out, "baseline_rgb_kmeans"), labels, extra, "rgb_kmeans"
    )
    one_clustered, one_mapped = class_level_baseline(
        ONESTAGE_CONFIG, os.path.join(out, "baseline_onestage_labels"), labels, extra, "onestage"
    )
    cfg_o, model_o, onestage = train(
        ONESTAGE_TRAIN_CONFIG,
        os.path.join(out, "baseline_onestage"),
        ["DATASETS.PSEUDO_LABEL_ROOT", labels, "MODEL.PART_DISTILLATION.INIT_FROM", stage2_weights, *args.opts],
        num_part_classes,
    )
    onestage_mapped = evaluate(cfg_o, model_o, "part_miou_mapped")

    segm = stage0.get("segm", {})
    miou_rows = [
        ("  raw-RGB K-means (per object class, K=8; baseline)", rgb_clustered, rgb_mapped),
        ("  one-stage labels (features, per object class, K=8)", one_clustered, one_mapped),
        ("  one-stage self-training (baseline)", onestage, onestage_mapped),
        ("  PartDistillation (stages 1-4)", stage4, stage4_mapped),
    ]
    print_table(
        [
            (
                "stage 0: objects (Mask2Former, EfficientNet-Lite0), toyparts_val mask AP / AP50 / AP75",
                f"{segm.get('AP', float('nan')):.1f} / {segm.get('AP50', float('nan')):.1f} / "
                f"{segm.get('AP75', float('nan')):.1f}",
            ),
            ("stage 1: part pseudo-labels (GT objects, K=4 + dense CRF), AR@1 / AR@10 / AR@200", ""),
            ("  EfficientNet-Lite0 res3+res4 features", _ars(stage1["ar"])),
            ("  raw RGB (baseline)", _ars(stage1_rgb["ar"])),
            (
                "stage 2: part proposals trained on stage-1 labels, AR@1 / AR@10 / AR@200",
                _ars(stage2["part_proposals"]),
            ),
            ("toyparts_parts_val part mIoU (C-mIoU / A-mIoU): clustered | mapped", ""),
            *[
                (name, f"{_miou(c, 'part_miou_clustered')} | {_miou(m, 'part_miou_mapped')}")
                for name, c, m in miou_rows
            ],
            ("checkpoints", f"{out}/stage{{0,2,4}}/model_final.pth"),
            ("object overlays", f"{len(pictures)} in {os.path.join(out, 'stage0_predictions')}"),
            ("pseudo-label overlays", os.path.join(out, "stage1_val", "vis")),
            ("stage-4 part overlays per object class", f"{len(overlays)} in {os.path.join(out, 'stage4_parts')}"),
        ]
    )
    return {
        "stage0": stage0,
        "stage1": stage1,
        "stage1_rgb": stage1_rgb,
        "stage2": stage2,
        "stage4": stage4,
        "stage4_mapped": stage4_mapped,
        "rgb_kmeans": (rgb_clustered, rgb_mapped),
        "onestage_labels": (one_clustered, one_mapped),
        "onestage": (onestage, onestage_mapped),
        "stage4_config": cfg4,
        "overlays": overlays,
    }


if __name__ == "__main__":
    run_cli(main)
