"""The rehearsal of the paper-scale path (GETTING_STARTED.md "ImageNet-21K"), in miniature, with the real configs.

A miniature ImageNet-21K folder (synset sub-folders of generated images, a manifest from
datasets/prepare_image_list.py, WordNet-filtered by tools/wordnet_filter.py) runs through configs/stage0..4*.yaml —
the files a user runs — with only sizes overridden on the command line (iterations, image size, the backbone:
EfficientNet-Lite0 for the absent Swin-L weights), chained by the configs' own default paths
(output/stage0_instance/..., output/stage2_proposals/...), then stage 4 is evaluated zero-shot on a PartImageNet-layout
and a Pascal-Part-layout dataset. Stage 0 trains on toyparts, the miniature's stand-in for COCO.
"""

import json
import math
import os

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from PIL import Image
from pycocotools import mask as mask_util

from conftest import REPO_ROOT

CFG = {
    name: os.path.join(REPO_ROOT, "configs", f"{name}.yaml")
    for name in (
        "stage0_instance",
        "stage1_pixel_grouping",
        "stage2_proposals",
        "stage3_ranking",
        "stage4_distillation",
    )
}
# The miniature's classes: 4 object synsets and 2 the paper's WordNet filter removes (food, tree).
KEPT = {"n02084071": "dog", "n02121808": "domestic cat", "n02691156": "airplane", "n02958343": "car"}
REMOVED = ("n07707451", "n13104059")  # vegetable (food subtree), tree
SIZE = 96

# Only sizes: the backbone (Swin-L weights are absent), widths, queries, iterations, image size, batch.
SIZES = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.BACKBONE.NAME",
    "build_efficientnet_lite0_backbone",
    "MODEL.BACKBONE.FREEZE_AT",
    "2",
    "MODEL.EFFICIENTNET.NORM",
    "FrozenBN",
    "MODEL.PIXEL_MEAN",
    "[127.0, 127.0, 127.0]",
    "MODEL.PIXEL_STD",
    "[128.0, 128.0, 128.0]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "64",
    "MODEL.SEM_SEG_HEAD.MASK_DIM",
    "64",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
    "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM",
    "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
    "10",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "128",
    "MODEL.MASK_FORMER.DEC_LAYERS",
    "3",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "0",
    "SOLVER.BASE_LR",
    "0.0003",
    "INPUT.IMAGE_SIZE",
    str(SIZE),
    "INPUT.MIN_SIZE_TEST",
    str(SIZE),
    "INPUT.MAX_SIZE_TEST",
    str(SIZE),
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SEED",
    "0",
]


def _images_from_toyparts(d2root):
    """Toyparts train images (objects on a background) to fill the synset folders."""
    return [r["file_name"] for r in DatasetCatalog.get("toyparts_train")]


def _write_imagenet(d2root, toy_images):
    train = os.path.join(d2root, "imagenet_21k", "train")
    codes = sorted(KEPT) + list(REMOVED)
    for c, code in enumerate(codes):
        for i in range(2):
            dst = os.path.join(train, code, f"{code}_{i}.JPEG")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.open(toy_images[(2 * c + i) % len(toy_images)]).convert("RGB").save(dst)
    return train


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_part_imagenet(d2root, toy_images):
    """PartImageNet layout: val images of two ImageNet-1K synsets (Chihuahua → dog, tabby → domestic cat)."""
    from part_distillation.data.datasets.part_imagenet import PART_IMAGENET_PART_CLASSES

    pin = os.path.join(d2root, "part_imagenet")
    images, annotations = [], []
    for i, code in enumerate(("n02085620", "n02123045")):
        name = f"{code}_{i}.JPEG"
        path = os.path.join(pin, "images", "val", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.open(toy_images[i]).convert("RGB").resize((64, 64)).save(path)
        images.append({"id": i, "file_name": name, "height": 64, "width": 64})
        for k, (y0, y1) in enumerate(((8, 30), (30, 56))):  # quadruped head / body
            m = np.zeros((64, 64), bool)
            m[y0:y1, 12:52] = True
            annotations.append(
                {
                    "id": 10 * i + k,
                    "image_id": i,
                    "category_id": k,
                    "iscrowd": 0,
                    "area": int(m.sum()),
                    "bbox": [12, y0, 40, y1 - y0],
                    "segmentation": _rle(m),
                }
            )
    categories = [
        {"id": i, "name": n, "supercategory": n.split(" ")[0]} for i, n in enumerate(PART_IMAGENET_PART_CLASSES)
    ]
    os.makedirs(os.path.join(pin, "annotations"), exist_ok=True)
    with open(os.path.join(pin, "annotations", "val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _write_pascal_part(d2root, toy_images):
    """Pascal-Part layout (ImageSets + Annotations_Part .mat + JPEGImages): one dog with head and torso."""
    import scipy.io

    base = os.path.join(d2root, "pascal_part")
    for sub in ("ImageSets/Main", "Annotations_Part", "JPEGImages"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "Main", "val.txt"), "w") as f:
        f.write("2008_000004\n")
    Image.open(toy_images[2]).convert("RGB").resize((64, 48)).save(os.path.join(base, "JPEGImages", "2008_000004.jpg"))
    obj = np.zeros((48, 64), np.uint8)
    obj[6:44, 8:56] = 1
    head, torso = np.zeros_like(obj), np.zeros_like(obj)
    head[6:20, 8:56], torso[20:44, 8:56] = 1, 1
    parts = np.zeros((1, 2), dtype=[("part_name", "O"), ("mask", "O")])
    for j, (n, m) in enumerate((("head", head), ("torso", torso))):
        parts[0, j]["part_name"], parts[0, j]["mask"] = n, m
    objects = np.zeros((1, 1), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    objects[0, 0]["class"], objects[0, 0]["class_ind"], objects[0, 0]["mask"], objects[0, 0]["parts"] = (
        "dog",
        12,
        obj,
        parts,
    )
    scipy.io.savemat(
        os.path.join(base, "Annotations_Part", "2008_000004.mat"),
        {"anno": {"imname": "2008_000004", "objects": objects}},
    )


def _args(config, opts, eval_only=False):
    from part_distillation.engine import default_argument_parser

    argv = ["--config-file", CFG[config]] + (["--eval-only"] if eval_only else []) + list(opts)
    return default_argument_parser().parse_args(argv)


def _finite(results):
    """Every number of ``results`` finite."""
    values = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            values.append(float(x))

    walk(results)
    return values and all(math.isfinite(v) for v in values)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_paper_path_rehearsal(datasets_root, tmp_path, monkeypatch, repo_script):
    from part_distillation.data.datasets.imagenet import register_imagenet
    from part_distillation.data.datasets.part_imagenet import register_part_imagenet
    from part_distillation.data.datasets.pascal_part import register_pascal_part
    from part_distillation.data.object_classes import read_store_classes
    from part_distillation.data.pseudo_labels import PseudoLabelReader, decode_mask

    d2root = tmp_path / "d2"
    d2root.mkdir()
    # toyparts from the session fixture + the miniature ImageNet-21K / PartImageNet / Pascal-Part of this test
    os.symlink(os.path.join(datasets_root, "toyparts"), d2root / "toyparts")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2root))
    monkeypatch.chdir(tmp_path)  # the configs' relative output/ and pseudo_labels/ land here
    toy = _images_from_toyparts(str(d2root))
    train_root = _write_imagenet(str(d2root), toy)
    _write_part_imagenet(str(d2root), toy)
    _write_pascal_part(str(d2root), toy)
    for version in ("21k",):
        register_imagenet(version)
    register_part_imagenet()
    register_pascal_part()

    # manifest of every image, then the WordNet filter → the manifest imagenet_21k_train reads
    prepare = repo_script("datasets/prepare_image_list.py")
    manifest_all = str(d2root / "imagenet_21k" / "manifest_all.tsv")
    assert prepare.main(["--root", train_root, "--out", manifest_all, "--no-progress"]) == 0
    wordnet_filter = repo_script("tools/wordnet_filter.py")
    sel = wordnet_filter.main(
        wordnet_filter.parse_args(
            [
                "--manifest",
                manifest_all,
                "--out",
                str(d2root / "imagenet_21k" / "train_manifest.tsv"),
                "--num-classes",
                "0",
            ]
        )
    )
    assert sel["selected"] == sorted(KEPT)  # the food and tree synsets are gone

    train_net = repo_script("tools/train_net.py")
    make_pseudo_labels = repo_script("tools/make_pseudo_labels.py")
    rank_parts = repo_script("tools/rank_parts.py")

    # stage 0 (the COCO instance model's stand-in: toyparts objects)
    coco = [
        "DATASETS.TRAIN",
        "('toyparts_train',)",
        "DATASETS.TEST",
        "('toyparts_val',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "5",
        "MODEL.WEIGHTS",
        "",
    ]  # COCO → toyparts; Lite0 brings its weights
    res0 = train_net.main(_args("stage0_instance", SIZES + coco + ["SOLVER.MAX_ITER", "100"]))
    assert os.path.isfile("output/stage0_instance/model_final.pth") and os.path.isfile(
        "output/stage0_instance/config.yaml"
    )

    # stage 1: objects of the stage-0 model (as documented), every object with its image's synset class
    low = ["MODEL.PIXEL_GROUPING.OBJECT_SCORE_THRESH", "0.0"]  # a 100-iteration detector's scores are low
    make_pseudo_labels.main(
        make_pseudo_labels.parse_args(
            ["--config-file", CFG["stage1_pixel_grouping"], "--shard-size", "4"] + SIZES + low
        )
    )
    codes = read_store_classes("pseudo_labels/imagenet_21k_train/grouping")["class_codes"]
    assert codes == sorted(KEPT)
    records = list(PseudoLabelReader("pseudo_labels", "imagenet_21k_train", "grouping"))
    assert len(records) == 2 * len(KEPT)
    objects = [(r, o) for r in records for o in r["objects"]]
    assert objects and all(codes[o["category_id"]] == r["class_code"] for r, o in objects)
    areas = [float(decode_mask(o["segmentation"]).mean()) for _, o in objects]
    assert max(areas) > 0.05, areas  # stage 2 trains on objects over 5 % of the image

    # stage 2, the verbatim command (its defaults: the stage-0 checkpoint for the frozen backbone and encoder)
    res2 = train_net.main(_args("stage2_proposals", SIZES + ["SOLVER.MAX_ITER", "80"]))
    s0, s2 = _state("output/stage0_instance/model_final.pth"), _state("output/stage2_proposals/model_final.pth")
    frozen = [k for k in s2 if k.startswith("backbone.") or ".pixel_decoder.transformer.encoder." in k]
    assert frozen and all(torch.equal(s2[k], s0[k]) for k in frozen)  # loaded from stage 0, not random

    # stage 3 (the stage-2 checkpoint by default), inside the stage-1 objects: one prototype set per synset
    rank_parts.main(rank_parts.parse_args(["--config-file", CFG["stage3_ranking"], "--shard-size", "4"] + SIZES))
    assert read_store_classes("pseudo_labels/imagenet_21k_train/ranking")["class_codes"] == codes
    ranked = list(PseudoLabelReader("pseudo_labels", "imagenet_21k_train", "ranking"))
    assert all(codes[o["category_id"]] == r["class_code"] for r in ranked for o in r["objects"])
    protos = torch.load("output/stage3_ranking/prototypes.pth", weights_only=True)
    assert protos["prototypes"].shape[0] == len(KEPT)

    # stage 4 (INIT_FROM the stage-2 checkpoint), zero-shot on PartImageNet through the synset map (1K → 21K)
    res4 = train_net.main(_args("stage4_distillation", SIZES + ["SOLVER.MAX_ITER", "20"]))
    s4 = _state("output/stage4_distillation/model_final.pth")
    assert s4["part_classifier.weight.weight"].shape[0] == len(KEPT)  # one classifier per synset class
    frozen4 = [k for k in s4 if k.startswith("backbone.") or ".pixel_decoder.transformer.encoder." in k]
    assert frozen4 and all(torch.equal(s4[k], s2[k]) for k in frozen4)
    # stage 0's COCO AP (APl/APs and per-class AP are NaN where the tiny split has no such object)
    assert all(math.isfinite(res0["segm"][k]) for k in ("AP", "AP50", "AP75"))
    assert _finite(res2) and _finite(res4)
    assert "AR@200" in json.dumps(res2) and "C-mIoU" in json.dumps(res4)

    # zero-shot on Pascal-Part: the dog's class name → its synset → the model's "dog" classifier
    res_pascal = train_net.main(
        _args(
            "stage4_distillation",
            SIZES
            + [
                "MODEL.WEIGHTS",
                "output/stage4_distillation/model_final.pth",
                "DATASETS.TEST",
                "('pascal_part_parts_val',)",
                "OUTPUT_DIR",
                "output/stage4_pascal",
            ],
            eval_only=True,
        )
    )
    assert _finite(res_pascal) and res_pascal["part_miou_clustered"]["num_objects"] == 1  # the dog was evaluated


def test_supervised_baselines_as_the_paper_defines_them(datasets_root, tmp_path, monkeypatch, repo_script):
    """The plain class-specific Mask2Former (mIoU of its own part labels inside GT objects) and the class-agnostic
    proposal model trained on GT parts (AR@k), from their PartImageNet configs with sizes and data swapped in."""
    monkeypatch.chdir(tmp_path)
    train_net = repo_script("tools/train_net.py")
    data = [
        "DATASETS.TRAIN",
        "('toyparts_parts_train',)",
        "DATASETS.TEST",
        "('toyparts_parts_val',)",
        "MODEL.WEIGHTS",
        "",
    ]
    base = os.path.join(REPO_ROOT, "configs", "baselines")
    from part_distillation.engine import default_argument_parser

    def run(config, extra):
        args = default_argument_parser().parse_args(
            ["--config-file", os.path.join(base, config)] + SIZES + data + extra
        )
        return train_net.main(args)

    res = run("supervised_m2f_part_imagenet.yaml", ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19", "SOLVER.MAX_ITER", "10"])
    assert _finite(res) and res["part_miou_direct"]["num_objects"] > 0
    model = torch.load("output/baselines/supervised_m2f_part_imagenet/model_final.pth", weights_only=False)["model"]
    assert model["sem_seg_head.predictor.class_embed.weight"].shape[0] == 20  # 19 part classes + no-object
    res = run("supervised_agnostic_part_imagenet.yaml", ["SOLVER.MAX_ITER", "10"])
    assert _finite(res) and "AR@200" in res["part_proposals"]
