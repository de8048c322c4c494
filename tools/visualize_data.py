#!/usr/bin/env python
"""Draw a registered dataset, a pseudo-label store, or what a training loader yields (like detectron2's
tools/visualize_data.py).

    python tools/visualize_data.py --dataset toyparts_parts_val --output-dir out/vis
    python tools/visualize_data.py --store pseudo_labels toyparts_train ranking --output-dir out/vis
    python tools/visualize_data.py --source dataloader --config-file
    configs/quick_schedules/stage2_proposals_toyparts.yaml --output-dir out/vis

``annotation`` (default) draws the records as stored (parts, objects outlined in white); ``dataloader``
draws the training mapper's output (after augmentation) of the config's DATASETS.TRAIN.
"""

import argparse
import itertools
import logging
import os
import sys

import cv2
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("part_distillation.visualize_data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["annotation", "dataloader"], default="annotation")
    p.add_argument("--config-file", default="", metavar="FILE", help="config (dataloader mode; its DATASETS.TRAIN)")
    p.add_argument("--dataset", default="", help="registered dataset name (annotation mode)")
    p.add_argument(
        "--store", nargs=3, metavar=("ROOT", "SOURCE", "STAGE"), help="a pseudo-label store (annotation mode)"
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num", type=int, default=20, help="images to draw (default 20)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def _write(path, rgb):
    from part_distillation.data.pseudo_labels import atomic_write_bytes

    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    atomic_write_bytes(path, png.tobytes())


def main(argv=None) -> list:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import BoxMode
    from detectron2.utils.logger import setup_logger

    import part_distillation.data.datasets  # noqa: F401  (lazy registrations)
    from part_distillation.data import build as data_build
    from part_distillation.data.pseudo_labels import (
        encode_mask,
        pseudo_label_dataset_name,
        register_pseudo_label_dataset,
    )
    from part_distillation.engine import check_runtime, load_cfg
    from part_distillation.utils.data_vis import draw_record, image_to_rgb
    from part_distillation.utils.errors import ConfigError

    args = parse_args(argv)
    if not logging.getLogger("part_distillation").handlers:
        setup_logger(name="part_distillation", abbrev_name="pd")
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    if args.source == "annotation":
        if args.store:
            root, source, stage = args.store
            name = register_pseudo_label_dataset(pseudo_label_dataset_name(source, stage), root, source, stage)
        else:
            name = args.dataset
        if name not in DatasetCatalog.list():
            raise ConfigError(
                f"--dataset {name!r} is not registered; give a registered name or --store ROOT SOURCE STAGE."
            )
        metadata = MetadataCatalog.get(name)
        for i, record in enumerate(tqdm(DatasetCatalog.get(name)[: args.num], desc=name, unit="img")):
            rgb = read_image(record["file_name"], format="RGB")
            path = os.path.join(
                args.output_dir, f"{i:05d}_{os.path.splitext(os.path.basename(record['file_name']))[0]}.png"
            )
            _write(path, draw_record(rgb, record, metadata, args.scale))
            written.append(path)
    else:
        if not args.config_file:
            raise ConfigError(
                "--source dataloader needs --config-file (its DATASETS.TRAIN and INPUT.DATASET_MAPPER_NAME)."
            )
        cfg = check_runtime(load_cfg(args.config_file, args.opts))
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.freeze()
        if cfg.DATASETS.PSEUDO_LABEL_ROOT:
            from part_distillation.data.pseudo_labels import register_all_pseudo_label_datasets

            register_all_pseudo_label_datasets(cfg.DATASETS.PSEUDO_LABEL_ROOT)
        loader = data_build.build_detection_train_loader(cfg)
        seen = 0
        for batch in tqdm(itertools.islice(loader, args.num), total=args.num, desc="batches", unit="batch"):
            for x in batch:
                if seen >= args.num:
                    break
                rgb = image_to_rgb(x["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
                record = {"height": rgb.shape[0], "width": rgb.shape[1], "annotations": []}
                inst = x.get("instances")
                if inst is not None and inst.has("gt_masks"):
                    masks = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
                    for m, c in zip(masks.numpy(), inst.gt_classes.tolist()):
                        ys, xs = m.nonzero()
                        box = (
                            [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                            if len(ys)
                            else [0.0] * 4
                        )
                        record["annotations"].append(
                            {
                                "segmentation": encode_mask(m),
                                "category_id": int(c),
                                "bbox": box,
                                "bbox_mode": BoxMode.XYXY_ABS,
                            }
                        )
                path = os.path.join(args.output_dir, f"{seen:05d}.png")
                _write(path, draw_record(rgb, record, MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), args.scale))
                written.append(path)
                seen += 1
    logger.info("Wrote %d pictures to %s", len(written), args.output_dir)
    return written


if __name__ == "__main__":
    from part_distillation.engine import run_cli

    run_cli(main)
