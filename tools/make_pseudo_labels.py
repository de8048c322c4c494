#!/usr/bin/env python
"""Stage 1: label a dataset with part segments (pixel grouping + dense CRF) into a pseudo-label store.

    python tools/make_pseudo_labels.py --config-file configs/quick_schedules/stage1_pixel_grouping_toyparts.yaml
    python tools/make_pseudo_labels.py --config-file configs/stage1_pixel_grouping.yaml --num-gpus 8 --resume

The model runs through detectron2's ``inference_on_dataset`` with a writer-"evaluator", so labelling is
distributed like evaluation: rank r of W labels shards r, r+W, ... of DATASETS.TEST[0] and writes them
atomically to ``DATASETS.PSEUDO_LABEL_ROOT/<dataset>/<stage>``; ``--resume`` keeps finished shards.
At the end rank 0 prints a summary, evaluates AR@k of the pseudo-parts against GT parts when
MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET names a dataset with part annotations, and ``--vis N`` renders
N overlays to OUTPUT_DIR/vis.
"""
import json
import logging
import os

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn

from part_distillation.data import build_labelling_loader
from part_distillation.data.build import check_dataset_names
from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.data.pseudo_labels import PseudoLabelReader, PseudoLabelWriter, decode_mask
from part_distillation.engine import default_argument_parser, launch_main, setup_cfg
from part_distillation.evaluation.proposal_ar import ProposalAREvaluator
from part_distillation.evaluation.pseudo_label_writer import PseudoLabelWriterEvaluator
from part_distillation.utils.errors import ConfigError
from part_distillation.utils.visualization import render_pseudo_labels
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log

logger = logging.getLogger("part_distillation.make_pseudo_labels")

# Config groups that change the labels; only these define a store's identity for --resume.
_LABEL_KEYS = ("MODEL", "INPUT", "DATASETS.TEST")


class SkipAwareModel(nn.Module):
    """Runs the model on the readable inputs of a batch; skipped inputs get an empty output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        keep = [x for x in batched_inputs if not x.get("skipped")]
        outputs = iter(self.model(keep) if keep else [])
        return [{} if x.get("skipped") else next(outputs) for x in batched_inputs]


def label_config(cfg) -> dict:
    """The part of the config that determines the labels (not OUTPUT_DIR, logging, ...)."""
    out = {}
    for key in _LABEL_KEYS:
        node = cfg
        for k in key.split("."):
            node = node[k]
        out[key] = json.loads(json.dumps(node, default=list))  # CfgNode/tuples → plain JSON
    return out


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--stage", default="grouping", help="store name of this labelling stage")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard (fixed per store; a multiple of the batch)"
    )
    parser.add_argument("--vis", type=int, default=0, help="render this many overlays to OUTPUT_DIR/vis")
    return parser.parse_args(argv)


def evaluate_store_ar(reader: PseudoLabelReader, parts_dataset: str) -> dict:
    """AR@k of the stored part segments against the GT parts of the same images."""
    evaluator = ProposalAREvaluator(parts_dataset, distributed=False)
    evaluator.reset()
    gt_ids = {r["image_id"] for r in DatasetCatalog.get(parts_dataset)}
    for record in reader:
        if record["image_id"] not in gt_ids:
            raise ConfigError(
                f"MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET={parts_dataset!r} has no image {record['image_id']!r} of the "
                "labelled dataset; name the part view of the same images (e.g. toyparts_parts_train for toyparts_train) "
                "or set it to \"\" to skip the evaluation."
            )
        parts = [p for obj in record["objects"] for p in obj["parts"]]
        h, w = record["height"], record["width"]
        masks = (
            torch.from_numpy(np.stack([decode_mask(p["segmentation"]) for p in parts]))
            if parts
            else torch.zeros((0, h, w), dtype=torch.bool)
        )
        scores = torch.tensor([p["score"] for p in parts], dtype=torch.float32)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": Instances((h, w), pred_masks=masks, scores=scores)}])
    return evaluator.evaluate()["part_proposals"]


def main(args):
    cfg = setup_cfg(args)
    dataset_name = cfg.DATASETS.TEST[0]
    check_dataset_names([dataset_name], "DATASETS.TEST")
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:  # e.g. a Mask2Former checkpoint: its backbone.* tensors load into our backbone
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    batch = cfg.MODEL.PIXEL_GROUPING.IMS_PER_BATCH
    if args.shard_size % batch:
        raise ConfigError(
            f"--shard-size {args.shard_size} must be a multiple of MODEL.PIXEL_GROUPING.IMS_PER_BATCH={batch}, so "
            "that resumed and multi-process runs batch images exactly as one uninterrupted run does."
        )
    dicts = DatasetCatalog.get(dataset_name)
    writer = PseudoLabelWriter(
        cfg.DATASETS.PSEUDO_LABEL_ROOT, dataset_name, args.stage, shard_size=args.shard_size,
        config=label_config(cfg), num_images=len(dicts), resume=args.resume,
    )  # fmt: skip
    indices = writer.pending_indices(rank=comm.get_rank(), world_size=comm.get_world_size())
    logger.info("Rank %d labels %d of %d images of %s", comm.get_rank(), len(indices), len(dicts), dataset_name)
    loader = build_labelling_loader(
        dicts, indices, build_dataset_mapper(cfg, is_train=False),
        batch_size=batch, num_workers=cfg.DATALOADER.NUM_WORKERS,
    )  # fmt: skip
    results = inference_on_dataset(SkipAwareModel(model), loader, PseudoLabelWriterEvaluator(writer, cfg.DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION))
    if not comm.is_main_process():
        return {}
    summary = results["pseudo_labels"]
    reader = PseudoLabelReader(cfg.DATASETS.PSEUDO_LABEL_ROOT, dataset_name, args.stage)
    rows = [[k, v] for k, v in summary.items() if k not in ("skipped_files",)]
    if cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET:
        ar = evaluate_store_ar(reader, cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET)
        summary["ar"] = ar
        rows += [[f"{k} ({cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET})", f"{ar[k]:.2f}"] for k in ar if "-" not in k and k.startswith("AR@")]
    if args.vis:
        vis_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
        os.makedirs(vis_dir, exist_ok=True)
        for i, record in zip(range(args.vis), reader):
            render_pseudo_labels(record, os.path.join(vis_dir, f"{i:04d}.png"))
        rows.append(["overlays", vis_dir])
    print(tabulate(rows, headers=["pseudo-labels", "value"], tablefmt="pipe"))
    return summary


def cli():
    return launch_main(main, parse_args())


if __name__ == "__main__":
    cli()
