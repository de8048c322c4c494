"""Config keys of the part-discovery heads: paired-view and keypoint mappers, the PartDiscovery
meta-architecture and its heads (Choudhury et al. 2021, PartFormer, MPAE), the ViT backbone, and the
discovery protocol switches.

Every key says where its default comes from: "PartDistillation supp." is the supplementary
material of PartDistillation (Cho et al., CVPR 2023); "reference code" is the official implementation
(facebookresearch/PartDistillation; for the discovery heads subhc/unsup-parts, Jiahao-UTS/UnsupervisedPart
and Jiahao-UTS/MPAE); "M2F" is Mask2Former's COCO instance-segmentation recipe. Every key has a comment
right above it.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_discovery_config"]


def add_discovery_config(cfg: CN) -> None:
    """Add the discovery keys to ``cfg`` (in place)."""
    _add_view_mapper_config(cfg)
    _add_part_discovery_config(cfg)
    _add_choudhury21_config(cfg)
    _add_partformer_config(cfg)
    _add_mpae_config(cfg)
    _add_vit_backbone_config(cfg)
    _add_discovery_protocol_config(cfg)


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
    # Exchange part representations between the paired views (two-stream, the paper's Fig. 2); False = one-stream (Table
    # 7).
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
    # Plain ViT backbone loading DINO / DINOv2 checkpoints (backbone/vit.py; MODEL.BACKBONE.NAME
    # "build_dino_vit_backbone").
    cfg.MODEL.VIT = CN()
    # Defaults: DINOv2 ViT-B/14 with 4 registers (MPAE code). DINO ViT-S/8 (PartFormer code): PATCH_SIZE 8,
    # EMBED_DIM 384, DEPTH 12, NUM_HEADS 6, NUM_REGISTERS 0, LAYER_SCALE False, PRETRAIN_IMAGE_SIZE 224,
    # INTERPOLATE_OFFSET
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
    # Image side the checkpoint's pos_embed was trained for: its grid is this // PATCH_SIZE (DINOv2 518 → 37²; DINO
    # 224).
    cfg.MODEL.VIT.PRETRAIN_IMAGE_SIZE = 518
    # Pos-embed resize by the scale factor (n + offset) / N instead of to n (DINO and DINOv2 non-reg: 0.1; DINOv2 reg:
    # 0.0).
    cfg.MODEL.VIT.INTERPOLATE_OFFSET = 0.0
    # Antialiased bicubic pos-embed resize (DINOv2 reg models: True; DINO: False).
    cfg.MODEL.VIT.INTERPOLATE_ANTIALIAS = True
    # Backbone state dict (dinov2_vitb14_reg4_pretrain.pth, dino_deitsmall8_pretrain.pth, ...), loaded strictly, never
    # downloaded; "" = random init with a warning (tests only).
    cfg.MODEL.VIT.WEIGHTS = ""
    # Outputs, stride PATCH_SIZE: "vit" = final-norm patch tokens (DINOv2 x_norm_patchtokens; B and C use these),
    # "vit_keys" = last block's attention keys (Amir et al.'s DINO features).
    cfg.MODEL.VIT.OUT_FEATURES = ["vit"]


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
