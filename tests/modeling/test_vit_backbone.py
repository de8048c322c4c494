"""The DINO / DINOv2 ViT backbone: shapes, position-embedding resizing, strict loading of both key layouts (CPU)."""

import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from part_distillation.engine import load_cfg
from part_distillation.modeling.backbone.vit import DinoViT, build_dino_vit_backbone, load_vit_weights
from part_distillation.utils.errors import ConfigError

from conftest import REPO_ROOT

MPAE_BASE = os.path.join(REPO_ROOT, "configs", "discovery", "mpae", "Base-MPAE.yaml")
D, DEPTH, HEADS, P, PRE = 32, 2, 2, 4, 32  # a tiny ViT: width 32, 2 blocks, patch 4, pos grid 8×8


def _tiny(**kw):
    args = dict(patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, pretrain_image_size=PRE, layer_scale=False)
    args.update(kw)
    return DinoViT(**args)


def _checkpoint(layout: str, registers: int = 0, gen=None):
    """A random state dict written with the published key names (independent of DinoViT's own names).

    DINO (facebookresearch/dino ``vision_transformer.py``): cls_token, pos_embed, patch_embed.proj, blocks.<i>.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm. DINOv2 (``dinov2/models/vision_transformer.py``,
    block_chunks=0)
    adds register_tokens, blocks.<i>.ls1.gamma / ls2.gamma and mask_token.
    """
    gen = gen or torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    n = (PRE // P) ** 2
    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + n, D),
        "patch_embed.proj.weight": r(D, 3, P, P),
        "patch_embed.proj.bias": r(D),
        "norm.weight": r(D),
        "norm.bias": r(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": r(D),
                b + "norm1.bias": r(D),
                b + "attn.qkv.weight": r(3 * D, D),
                b + "attn.qkv.bias": r(3 * D),
                b + "attn.proj.weight": r(D, D),
                b + "attn.proj.bias": r(D),
                b + "norm2.weight": r(D),
                b + "norm2.bias": r(D),
                b + "mlp.fc1.weight": r(4 * D, D),
                b + "mlp.fc1.bias": r(4 * D),
                b + "mlp.fc2.weight": r(D, 4 * D),
                b + "mlp.fc2.bias": r(D),
            }
        )
        if layout == "dinov2":
            sd.update({b + "ls1.gamma": r(D), b + "ls2.gamma": r(D)})
    if layout == "dinov2":
        sd["mask_token"] = r(1, D)
        if registers:
            sd["register_tokens"] = r(1, registers, D)
    return sd


def test_output_shapes_and_keys():
    model = _tiny(num_registers=2, out_features=("vit", "vit_keys")).eval()
    assert model.size_divisibility == P
    assert model.output_shape() == {"vit": ShapeSpec(channels=D, stride=P), "vit_keys": ShapeSpec(channels=D, stride=P)}
    x = torch.randn(2, 3, 24, 40)  # non-square: a 6×10 grid
    captured = {}
    model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    out = model(x)
    assert out["vit"].shape == (2, D, 6, 10) and out["vit_keys"].shape == (2, D, 6, 10)
    # vit_keys = the last block's keys (middle third of qkv) of the patch tokens, after cls + 2 registers
    keys = model.blocks[-1].attn.qkv(captured["x"])[..., D : 2 * D][:, 3:]
    torch.testing.assert_close(out["vit_keys"], keys.transpose(1, 2).reshape(2, D, 6, 10))
    with pytest.raises(ConfigError, match="OUT_FEATURES"):
        _tiny(out_features=("res4",))


def test_pos_embed_interpolation():
    model = _tiny()
    assert model.interpolate_pos_embed((8, 8)) is model.pos_embed  # the pretraining grid: untouched
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.arange(D, dtype=torch.float32)  # the same vector at every patch
    for offset, antialias in ((0.0, False), (0.1, False), (0.0, True)):
        model.interpolate_offset, model.interpolate_antialias = offset, antialias
        pos = model.interpolate_pos_embed((3, 5))  # non-square, smaller and larger than 8 per axis
        assert pos.shape == (1, 1 + 15, D)
        torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])  # cls position kept
        # bicubic resizing of a constant field is that constant
        torch.testing.assert_close(pos[0, 1:], torch.arange(D, dtype=torch.float32).expand(15, D))
    assert model.interpolate_pos_embed((12, 10)).shape == (1, 121, D)
    assert model(torch.randn(1, 3, 48, 40))["vit"].shape == (1, D, 12, 10)


@pytest.mark.parametrize("layout", ["dino", "dinov2"])
def test_strict_load_of_published_layouts(layout, tmp_path):
    regs = 4 if layout == "dinov2" else 0
    sd = _checkpoint(layout, regs)
    path = str(tmp_path / f"{layout}.pth")
    torch.save(sd, path)
    model = _tiny(num_registers=regs, layer_scale=layout == "dinov2")
    load_vit_weights(model, path)
    own = model.state_dict()
    assert "mask_token" not in own  # DINOv2's pretraining-only token is dropped
    for k, v in sd.items():
        if k != "mask_token":
            assert torch.equal(own[k], v), k
    # a DINO training checkpoint: {"teacher": {"backbone.…", "head.…"}} is unwrapped the same way
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(2, 2)}}
    torch.save(wrapped, path)
    other = _tiny(num_registers=regs, layer_scale=layout == "dinov2")
    load_vit_weights(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in own.items())


def test_load_errors_are_clear(tmp_path):
    path = str(tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=r"MODEL.VIT.WEIGHTS=.*no such file"):
        load_vit_weights(_tiny(), str(tmp_path / "nope.pth"))
    # a DINOv2 file into a DINO-configured model: unexpected LayerScale / registers, named with the fix
    torch.save(_checkpoint("dinov2", registers=4), path)
    with pytest.raises(ConfigError, match=r"unexpected \[.*ls1.gamma.*LAYER_SCALE True.*NUM_REGISTERS"):
        load_vit_weights(_tiny(), path)
    # a missing tensor
    sd = _checkpoint("dino")
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, path)
    with pytest.raises(ConfigError, match=r"MODEL.VIT.WEIGHTS.*missing \['blocks.1.mlp.fc2.bias'\]"):
        load_vit_weights(_tiny(), path)
    # a wrong shape (another patch size)
    torch.save(_checkpoint("dino"), path)
    with pytest.raises(ConfigError, match=r"wrong shape.*patch_embed.proj.weight"):
        load_vit_weights(_tiny(patch_size=8, pretrain_image_size=64), path)
    torch.save({"not": "tensors"}, path)
    with pytest.raises(ConfigError, match="MODEL.VIT.WEIGHTS"):
        load_vit_weights(_tiny(), path)


def test_built_from_config(tmp_path):
    """The MPAE base config's VIT section + overrides → build_backbone, filled from MODEL.VIT.WEIGHTS."""
    path = str(tmp_path / "v2.pth")
    sd = _checkpoint("dinov2", registers=4)
    torch.save(sd, path)
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "MODEL.VIT.PATCH_SIZE",
        str(P),
        "MODEL.VIT.EMBED_DIM",
        str(D),
        "MODEL.VIT.DEPTH",
        str(DEPTH),
        "MODEL.VIT.NUM_HEADS",
        str(HEADS),
        "MODEL.VIT.PRETRAIN_IMAGE_SIZE",
        str(PRE),
        "MODEL.VIT.WEIGHTS",
        path,
    ]
    cfg = load_cfg(MPAE_BASE, opts)
    assert cfg.MODEL.BACKBONE.NAME == "build_dino_vit_backbone" and cfg.MODEL.VIT.NUM_REGISTERS == 4
    backbone = build_backbone(cfg)
    assert isinstance(backbone, DinoViT)
    assert torch.equal(backbone.register_tokens, sd["register_tokens"])
    cfg.MODEL.VIT.WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="MODEL.VIT.WEIGHTS"):
        build_dino_vit_backbone(cfg, ShapeSpec(channels=3))
