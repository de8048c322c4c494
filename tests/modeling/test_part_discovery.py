"""PartDiscovery + PART_HEAD_REGISTRY: the K-means and DFF baselines, NMF, and the perceptual loss (CPU, seconds)."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image
from pycocotools import mask as mask_util
from sklearn.metrics import adjusted_rand_score

from part_distillation.data.dataset_mappers import build_dataset_mapper
from part_distillation.structures.geometry import warp_to_view2
from part_distillation.engine import Trainer, load_cfg
from part_distillation.modeling.losses.perceptual import (
    PerceptualLoss,
    build_perceptual_network,
    imagenet_normalize,
)
from part_distillation.modeling.meta_arch.discovery import PartDiscovery
from part_distillation.modeling.part_heads import (
    PART_HEAD_REGISTRY,
    DFFHead,
    KMeansBaselineHead,
    PartHead,
    build_part_head,
)
from part_distillation.modeling.part_heads.baselines import canonical_part_order, nmf
from part_distillation.structures.masks import masks_to_grid
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT, train_frozen_backbone

KMEANS_CFG = os.path.join(REPO_ROOT, "configs", "discovery", "baselines", "kmeans_toyparts.yaml")
DFF_CFG = os.path.join(REPO_ROOT, "configs", "discovery", "baselines", "dff_toyparts.yaml")
CONFIGS = {"kmeans": KMEANS_CFG, "dff": DFF_CFG}
SIZE = 128  # the tiny toyparts images of conftest
K = 4


def _cfg(name, opts=()):
    # REQUIRE_FG_MASK False: the fixtures mix inputs with and without fg masks on purpose
    return load_cfg(
        CONFIGS[name],
        ["INPUT.PAIRED_VIEW.IMAGE_SIZE", str(SIZE), "MODEL.PART_DISCOVERY.REQUIRE_FG_MASK", "False", *opts],
    )


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in CONFIGS:
        model = build_model(_cfg(name))
        model.eval()
        out[name] = model
    return out


def _object_union(record):
    masks = [mask_util.decode(a["segmentation"]) for a in record["annotations"]]
    return np.logical_or.reduce(masks) if masks else np.zeros((record["height"], record["width"]), bool)


@pytest.fixture(scope="module")
def toyparts_inputs(datasets_root, tmp_path_factory):
    """The 6 toyparts val images through PairedViewDatasetMapper (eval); even ones carry the objects' union as
    ``fg_mask`` (written as ``fg_mask_file`` PNGs), odd ones have no mask (nor annotations)."""
    mask_dir = tmp_path_factory.mktemp("fg_masks")
    mapper = build_dataset_mapper(_cfg("kmeans"), is_train=False)
    inputs = []
    for i, record in enumerate(DatasetCatalog.get("toyparts_val")):
        record = dict(record)
        if i % 2 == 0:
            path = str(mask_dir / f"{i}.png")
            Image.fromarray(_object_union(record).astype(np.uint8) * 255).save(path)
            record["fg_mask_file"] = path
        else:
            record.pop("annotations")  # otherwise the mapper takes the annotations' union as the fg mask
        inputs.append(mapper(record))
    assert [("fg_mask" in x) for x in inputs] == [True, False] * 3
    return inputs


@pytest.fixture(scope="module")
def batch_outputs(models, toyparts_inputs):
    return {name: model(toyparts_inputs) for name, model in models.items()}


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def test_registry_lookup_and_unknown_name(models):
    assert PART_HEAD_REGISTRY.get("KMeansBaselineHead") is KMeansBaselineHead
    assert PART_HEAD_REGISTRY.get("DFFHead") is DFFHead
    cfg = _cfg("dff")
    shape = models["dff"].backbone.output_shape()
    head = build_part_head(cfg, shape)
    assert isinstance(head, DFFHead) and head.num_parts == K and head.feature_levels == ["res4"]
    assert isinstance(models["kmeans"], PartDiscovery) and isinstance(models["kmeans"].head, KMeansBaselineHead)
    cfg.MODEL.PART_DISCOVERY.HEAD = "NoSuchHead"
    with pytest.raises(
        ConfigError,
        match=r"MODEL.PART_DISCOVERY.HEAD='NoSuchHead' is not registered; use one of: .*DFFHead.*KMeansBaselineHead",
    ):
        build_part_head(cfg, shape)
    with pytest.raises(ConfigError, match="FEATURE_LEVELS has \\['res9'\\]"):
        build_part_head(_cfg("kmeans", ["MODEL.PART_DISCOVERY.FEATURE_LEVELS", "['res9']"]), shape)


# ------------------------------------------------------------------------------------------------
# PartDiscovery with the baseline heads on toyparts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kmeans", "dff"])
def test_baseline_outputs_are_canonical_and_deterministic(name, models, toyparts_inputs, batch_outputs):
    model = models[name]
    out = batch_outputs[name]
    assert len(out) == len(toyparts_inputs)
    for x, o in zip(toyparts_inputs, out):
        seg, probs = o["part_seg"], o["part_probs"]
        assert seg.shape == (SIZE, SIZE) and seg.dtype == torch.long
        assert probs.shape == (K + 1, SIZE, SIZE) and probs.dtype == torch.float32
        assert seg.min() >= 0 and seg.max() <= K
        assert torch.allclose(probs.sum(0), torch.ones(SIZE, SIZE), atol=1e-5)
        assert torch.equal(probs.argmax(0), seg)
        if "fg_mask" in x:  # background exactly outside the given mask, parts inside
            fg = x["fg_mask"]
            assert (seg[~fg] == 0).all() and (seg[fg] >= 1).all()
        else:  # no mask: the baselines put every pixel in a part
            assert (seg >= 1).all()
        assert len(seg[seg > 0].unique()) >= 2
    again = model(toyparts_inputs)
    for a, b in zip(out, again):
        assert torch.equal(a["part_seg"], b["part_seg"]) and torch.equal(a["part_probs"], b["part_probs"])


def test_kmeans_result_does_not_depend_on_the_batch(models, toyparts_inputs, batch_outputs):
    batch = batch_outputs["kmeans"]
    for i in (0, 3):
        alone = models["kmeans"]([toyparts_inputs[i]])[0]
        agree = (alone["part_seg"] == batch[i]["part_seg"]).float().mean()
        assert agree > 0.99


def test_output_at_the_requested_resolution(models, toyparts_inputs):
    x = dict(toyparts_inputs[0], height=96, width=160)
    o = models["dff"]([x])[0]
    assert o["part_seg"].shape == (96, 160) and o["part_probs"].shape == (K + 1, 96, 160)


def test_baselines_are_evaluation_only(models, toyparts_inputs):
    model = models["kmeans"]
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    try:
        assert not model.backbone.training  # a frozen backbone stays in eval mode
        with pytest.raises(ConfigError, match="nothing to train.*--eval-only"):
            model(toyparts_inputs[:1])
    finally:
        model.eval()


def test_configs_run_through_the_test_loader(datasets_root, models):
    """The shipped configs build the evaluation loader (PairedViewDatasetMapper, toyparts_val) that feeds the model."""
    cfg = _cfg("kmeans")
    assert cfg.TEST.EVALUATOR_TYPE == "part_nmi_ari" and cfg.INPUT.DATASET_MAPPER_NAME == "PairedViewDatasetMapper"
    assert cfg.MODEL.META_ARCHITECTURE == "PartDiscovery" and cfg.DATASETS.TEST == ("toyparts_val",)
    inputs = next(iter(Trainer.build_test_loader(cfg, "toyparts_val")))
    o = models["kmeans"](inputs)[0]
    assert o["part_seg"].shape == (inputs[0]["height"], inputs[0]["width"])


class _ToyEquivarianceHead(PartHead):
    """A minimal trainable head (1×1 conv on res3; equivariance between the paired views + an entropy term)."""

    @configurable
    def __init__(self, *, num_parts, feature_levels, input_shape):
        super().__init__(num_parts=num_parts, feature_levels=feature_levels, input_shape=input_shape)
        self.classifier = torch.nn.Conv2d(input_shape[feature_levels[0]].channels, num_parts + 1, 1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        pd = cfg.MODEL.PART_DISCOVERY
        return {"num_parts": pd.NUM_PARTS, "feature_levels": pd.FEATURE_LEVELS, "input_shape": input_shape}

    def _probs(self, features):
        return torch.softmax(self.classifier(features[self.feature_levels[0]]), dim=1)

    def losses(self, features, batch):
        p1 = self._probs(features)
        p2 = self._probs(batch.features_of(batch.images2.tensor))
        transforms = torch.stack([x["transform"] for x in batch.inputs])
        warped = warp_to_view2(p1, transforms, image_size=batch.padded_hw)
        inside = masks_to_grid(batch.valid2, p2.shape[-2:])[:, None].float()
        entropy = -(p1 * p1.clamp_min(1e-8).log()).sum(1).mean()
        return {"loss_toy_eqv": 2.0 * ((warped - p2) ** 2 * inside).mean(), "loss_toy_entropy": 0.1 * entropy}

    def inference(self, features, batch):
        return self._probs(features)


def test_a_trainable_head_trains_through_the_trainer(datasets_root, tmp_path):
    """The engine contract for learned heads: paired views in, weighted losses logged, frozen backbone untouched."""
    if "_ToyEquivarianceHead" not in PART_HEAD_REGISTRY:
        PART_HEAD_REGISTRY.register(_ToyEquivarianceHead)
    cfg = _cfg(
        "kmeans",
        [
            "MODEL.PART_DISCOVERY.HEAD",
            "_ToyEquivarianceHead",
            "MODEL.PART_DISCOVERY.FEATURE_LEVELS",
            "['res3']",
            "OUTPUT_DIR",
            str(tmp_path),
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.WARMUP_ITERS",
            "0",
            "SOLVER.BASE_LR",
            "0.01",
            "DATASETS.TEST",
            "()",
        ],
    )
    trainer = Trainer(cfg)
    model = trainer.model
    train_frozen_backbone(trainer, "head.classifier.weight")
    metrics = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert any({"loss_toy_eqv", "loss_toy_entropy", "total_loss"} <= set(m) for m in metrics)
    model.eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    out = model([mapper(DatasetCatalog.get("toyparts_val")[0])])[0]
    assert out["part_seg"].shape == (SIZE, SIZE) and out["part_seg"].max() <= K


# ------------------------------------------------------------------------------------------------
# Synthetic textures
# ------------------------------------------------------------------------------------------------
def _two_textures(size=SIZE):
    """Left half: horizontal black/white stripes (period 8); right half: a 4-px checkerboard; same mean grey."""
    yy, xx = np.mgrid[:size, :size]
    stripes = ((yy // 4) % 2) * 255
    checker = (((yy // 4) + (xx // 4)) % 2) * 255
    grey = np.where(xx < size // 2, stripes, checker).astype(np.uint8)
    image = torch.as_tensor(np.repeat(grey[None], 3, axis=0).copy())
    truth = (xx >= size // 2).astype(int)
    return image, truth


def test_kmeans_separates_two_textures():
    cfg = _cfg("kmeans", ["MODEL.PART_DISCOVERY.NUM_PARTS", "2", "MODEL.PART_DISCOVERY.BASELINE_LABEL_ORDER", "none"])
    model = build_model(cfg).eval()
    image, truth = _two_textures()
    seg = model([{"image": image, "height": SIZE, "width": SIZE}])[0]["part_seg"].numpy()
    inner = np.abs(np.arange(SIZE) - SIZE // 2) >= 12  # ignore the receptive-field band at the seam
    assert set(np.unique(seg)) == {1, 2}
    assert adjusted_rand_score(truth[:, inner].ravel(), seg[:, inner].ravel()) > 0.9
    # with a fg mask the same clustering happens inside it only
    fg = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    fg[16:112] = True
    seg_fg = model([{"image": image, "fg_mask": fg}])[0]["part_seg"].numpy()
    assert (seg_fg[~fg.numpy()] == 0).all() and (seg_fg[fg.numpy()] > 0).all()
    rows = fg.numpy()[:, 0]
    assert adjusted_rand_score(truth[rows][:, inner].ravel(), seg_fg[rows][:, inner].ravel()) > 0.9


def test_dff_background_threshold_without_fg_mask(toyparts_inputs):
    model = build_model(_cfg("dff", ["MODEL.PART_DISCOVERY.DFF.BG_THRESHOLD", "0.5"])).eval()
    no_mask, with_mask = model([toyparts_inputs[1], toyparts_inputs[0]])
    assert (no_mask["part_seg"] == 0).any() and (no_mask["part_seg"] > 0).any()
    fg = toyparts_inputs[0]["fg_mask"]  # a given mask decides the background instead of the threshold
    assert (with_mask["part_seg"][fg] > 0).all() and (with_mask["part_seg"][~fg] == 0).all()


def test_canonical_part_order():
    # 2×3 grid; cluster 0 in the bottom row, cluster 1 top-left, cluster 2 top-right (two cells), cluster 3 empty
    labels = torch.tensor([[1, 2, 2, 0, 0, 0]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert canonical_part_order(labels, valid, (2, 3), 4, "vertical").tolist() == [[1, 2, 0, 3]]
    assert canonical_part_order(labels, valid, (2, 3), 4, "area").tolist() == [[0, 2, 1, 3]]
    assert canonical_part_order(labels, valid, (2, 3), 4, "none").tolist() == [[0, 1, 2, 3]]


# ------------------------------------------------------------------------------------------------
# NMF
# ------------------------------------------------------------------------------------------------
def test_nmf_decreases_the_error_monotonically():
    gen = torch.Generator().manual_seed(0)
    # non-negative rank-5 data plus non-negative noise
    v = torch.rand(3, 120, 5, generator=gen, dtype=torch.float64) @ torch.rand(
        3, 5, 24, generator=gen, dtype=torch.float64
    )
    v = v + 0.05 * torch.rand(3, 120, 24, generator=gen, dtype=torch.float64)
    valid = torch.ones(3, 120, dtype=torch.bool)
    valid[2, 90:] = False  # a smaller problem padded to the batch
    w, h, errors = nmf(v, 5, valid, max_iter=120, tol=0.0, return_errors=True)
    assert errors.shape == (121, 3)
    steps = errors[1:] - errors[:-1]
    assert (steps <= 1e-12 * errors[0]).all(), steps.max()
    assert (errors[-1] < 0.2 * errors[0]).all()
    assert (w >= 0).all() and (h >= 0).all() and (w[2, 90:] == 0).all()
    # each problem is initialised alone: the same factors alone as in the batch
    w2, h2 = nmf(v[2:3, :90], 5, max_iter=120, tol=0.0)
    assert torch.allclose(w2[0], w[2, :90]) and torch.allclose(h2[0], h[2])
    # the tolerance stops early, at a multiple of the check period
    _, _, early = nmf(v, 5, valid, max_iter=200, tol=1e-2, check_every=10, return_errors=True)
    assert len(early) < 201 and (len(early) - 1) % 10 == 0
    with pytest.raises(ValueError, match="non-negative"):
        nmf(v - 1, 2)


# ------------------------------------------------------------------------------------------------
# Perceptual loss
# ------------------------------------------------------------------------------------------------
def _images(seed, n=2, size=32):
    gen = torch.Generator().manual_seed(seed)
    return imagenet_normalize(torch.rand(n, 3, size, size, generator=gen) * 255)


def test_perceptual_loss_efficientnet_fallback(caplog):
    cfg = load_cfg("")
    with caplog.at_level(logging.WARNING):
        loss = PerceptualLoss(cfg)
    assert "VGG19_WEIGHTS is empty" in caplog.text and "differ from the papers" in caplog.text
    x, y = _images(0), _images(1)
    assert loss(x, x).item() == 0.0
    pred = y.clone().requires_grad_(True)
    value = loss(pred, x)
    value.backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0
    # the frozen network is not part of the module tree, but moves with it
    assert len(loss.state_dict()) == 0 and len(list(loss.parameters())) == 0
    assert not any(p.requires_grad for p in loss.network.parameters())
    loss.to(torch.float64)
    assert next(loss.network.parameters()).dtype == torch.float64
    assert loss(x.double(), x.double()).item() == 0.0


@pytest.fixture(scope="module")
def random_vgg19(tmp_path_factory):
    """A randomly initialised torchvision VGG19 and a weights file of its ``features`` (what the loader needs)."""
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg19(weights=None).eval()
    path = str(tmp_path_factory.mktemp("vgg") / "vgg19_random.pth")
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    return vgg, path


def test_perceptual_loss_vgg19_from_a_weights_file(random_vgg19):
    vgg, path = random_vgg19
    cfg = load_cfg("", ["MODEL.PART_DISCOVERY.PERCEPTUAL.VGG19_WEIGHTS", path])
    loss = PerceptualLoss(cfg)
    assert len(loss.network.features) == 36  # up to relu5_4 (torchvision index 35), final pool dropped
    x, y = _images(0, n=1, size=16), _images(1, n=1, size=16)  # small: VGG19 is slow on 2 CPU cores
    assert loss(x, x).item() == 0.0
    # by hand, with the torchvision model the file came from: relu3_2 = features[:14], relu5_4 = features[:36]
    with torch.no_grad():
        expected = 0.33 * (vgg.features[:14](y) - vgg.features[:14](x)).abs().mean()
        expected += 1.0 * (vgg.features[:36](y) - vgg.features[:36](x)).abs().mean()
    assert torch.allclose(loss(y, x), expected, rtol=1e-5)
    # Choudhury's φ: relu3_2 ⊕ relu5_4 resized to the image: 256 + 512 channels
    assert loss.network.stacked(x, (16, 16), [0.33, 1.0]).shape == (1, 768, 16, 16)


def test_perceptual_config_errors(tmp_path, random_vgg19):
    key = "MODEL.PART_DISCOVERY.PERCEPTUAL.VGG19_WEIGHTS"
    with pytest.raises(ConfigError, match=key):
        build_perceptual_network(load_cfg("", [key, str(tmp_path / "missing.pth")]))
    (tmp_path / "notes.pth").write_text("not a state dict")
    with pytest.raises(ConfigError, match=f"{key}=.*notes.pth.*cannot be read"):
        build_perceptual_network(load_cfg("", [key, str(tmp_path / "notes.pth")]))
    with pytest.raises(ConfigError, match="relu6_1"):
        build_perceptual_network(
            load_cfg("", [key, random_vgg19[1], "MODEL.PART_DISCOVERY.PERCEPTUAL.LAYERS", "['relu6_1']"])
        )
    with pytest.raises(ConfigError, match="LAYER_WEIGHTS has 1 values for 2 LAYERS"):
        PerceptualLoss(load_cfg("", ["MODEL.PART_DISCOVERY.PERCEPTUAL.LAYER_WEIGHTS", "[1.0]"]))
