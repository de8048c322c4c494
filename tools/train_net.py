#!/usr/bin/env python
"""Train or evaluate any stage/head of part_distillation; the config decides which.

python tools/train_net.py --config-file configs/quick_schedules/stage0_instance_toyparts.yaml
python tools/train_net.py --config-file CONFIG --num-gpus 8 [--resume] [KEY VALUE ...]
python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
"""

from detectron2.checkpoint import DetectionCheckpointer

from part_distillation.engine import Trainer, default_argument_parser, launch_main, run_worker, setup_cfg
from part_distillation.utils.compat import quiet_upstream_warnings

quiet_upstream_warnings()  # upstream deprecation warnings at every step would bury the log


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def checked_main(args):
    return run_worker(main, args)


def cli():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    return launch_main(main, args)


if __name__ == "__main__":
    cli()
