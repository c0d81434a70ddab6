"""MANIQA against PyTorch references with identical random weights.

Backbone: transformers' ViTModel (same block as timm's ViT: pre-norm, fused-qkv-equivalent
attention, erf GELU, LayerNorm eps 1e-6), whose weights are written out in timm's
`vit.blocks.N.attn.qkv` layout as MANIQA's state dict has them. Head: a PyTorch re-statement,
written here from the MANIQA paper and IIGROUP/MANIQA `models/maniqa.py` + `models/swin.py`, of
the transposed attention blocks, the Swin stages (shifted windows, -100 masks, relative position
bias, residual scale) and the weighted score; its state_dict (with the
`relative_position_index` / `attn_mask` buffers and the unused downsample conv) is the
published layout the converter reads. Tolerance: relative error <= 1e-4 (ours in float32, "highest"; reference in float64).
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel

from fluxir_convert.iqa import convert_iqa
from fluxir_jax.iqa import weights as iqa_weights
from fluxir_jax import cli
from fluxir_jax.errors import UserError
from fluxir_jax.iqa import maniqa

RTOL = 1e-4
TINY = maniqa.PRESETS["tiny"]
VIT_LAYERS = 4  # one more than MANIQA reads: block 3 must be ignored by the converter


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomize_(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and "bias_table" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / int(np.prod(p.shape[1:])) ** 0.5)
            elif "norm" in name and name.endswith("weight") or "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- PyTorch head re-statement


class RefTAB(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.c_q, self.c_k, self.c_v = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, n)
        self.norm_fact = n**-0.5

    def forward(self, x):  # x: B, C, N
        b, c, n = x.shape
        attn = (self.c_q(x) @ self.c_k(x).transpose(-2, -1) * self.norm_fact).softmax(-1)
        return (attn @ self.c_v(x)).transpose(1, 2).reshape(b, c, n) + x


def window_partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_reverse(win, ws, h, w):
    b = win.shape[0] // (h * w // ws // ws)
    return win.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class RefWindowAttention(nn.Module):
    def __init__(self, dim, ws, heads):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        ch, cw = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
        flat = torch.stack([ch, cw]).flatten(1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b_ // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c))


class RefMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefSwinBlock(nn.Module):
    def __init__(self, dim, res, heads, ws, shift, dim_mlp):
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefWindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, dim_mlp)
        if shift:
            img = torch.zeros(1, res, res, 1)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    img[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = window_partition(img, ws).view(-1, ws * ws)
            am = mw.unsqueeze(1) - mw.unsqueeze(2)
            am = am.masked_fill(am != 0, -100.0).masked_fill(am == 0, 0.0)
        else:
            am = None
        self.register_buffer("attn_mask", am)

    def forward(self, x):
        b, l, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        win = window_partition(h, self.ws).view(-1, self.ws * self.ws, c)
        win = self.attn(win, self.attn_mask).view(-1, self.ws, self.ws, c)
        h = window_reverse(win, self.ws, self.res, self.res)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(b, l, c)
        return x + self.mlp(self.norm2(x))


class RefBasicLayer(nn.Module):
    def __init__(self, dim, res, depth, heads, ws, dim_mlp):
        super().__init__()
        self.res = res
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList([RefSwinBlock(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2, dim_mlp)
                                     for i in range(depth)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        b, l, c = x.shape
        x = F.relu(self.conv(x.transpose(1, 2).reshape(b, c, self.res, self.res)))
        return x.flatten(2).transpose(1, 2)


class RefSwinTransformer(nn.Module):
    def __init__(self, cfg, dim):
        super().__init__()
        self.scale, self.res = cfg.scale, cfg.grid
        self.downsample = nn.Conv2d(dim, dim, 3, 2, 1)  # present in the checkpoint, unused
        self.layers = nn.ModuleList([RefBasicLayer(dim, cfg.grid, d, h, cfg.window_size, cfg.dim_mlp)
                                     for d, h in zip(cfg.depths, cfg.num_heads)])

    def forward(self, x):  # B, C, H, W
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


class RefHead(nn.Module):
    """MANIQA without its ViT: takes the concatenated block features [B, N, 4D]."""

    def __init__(self, cfg):
        super().__init__()
        n, e = cfg.grid**2, cfg.embed_dim
        self.g = cfg.grid
        self.tablock1 = nn.ModuleList([RefTAB(n) for _ in range(cfg.num_tab)])
        self.conv1 = nn.Conv2d(cfg.vit_dim * len(cfg.feature_blocks), e, 1, 1, 0)
        self.swintransformer1 = RefSwinTransformer(cfg, e)
        self.tablock2 = nn.ModuleList([RefTAB(n) for _ in range(cfg.num_tab)])
        self.conv2 = nn.Conv2d(e, e // 2, 1, 1, 0)
        self.swintransformer2 = RefSwinTransformer(cfg, e // 2)
        self.fc_score = nn.Sequential(nn.Linear(e // 2, e // 2), nn.ReLU(), nn.Dropout(0.1),
                                      nn.Linear(e // 2, cfg.num_outputs), nn.ReLU())
        self.fc_weight = nn.Sequential(nn.Linear(e // 2, e // 2), nn.ReLU(), nn.Dropout(0.1),
                                       nn.Linear(e // 2, cfg.num_outputs), nn.Sigmoid())

    def forward(self, x):
        b, g = x.shape[0], self.g
        x = x.transpose(1, 2)                      # b (h w) c -> b c (h w)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.reshape(b, -1, g, g)))
        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.reshape(b, -1, g, g)))
        x = x.flatten(2).transpose(1, 2)           # b c h w -> b (h w) c
        scores = []
        for i in range(b):
            f, w = self.fc_score(x[i]), self.fc_weight(x[i])
            scores.append((f * w).sum() / w.sum())
        return torch.stack(scores)


def hf_vit(seed: int = 0) -> ViTModel:
    cfg = ViTConfig(hidden_size=TINY.vit_dim, num_hidden_layers=VIT_LAYERS, num_attention_heads=TINY.vit_heads,
                    intermediate_size=TINY.vit_mlp, image_size=TINY.img_size, patch_size=TINY.patch_size,
                    num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    m = ViTModel(cfg, add_pooling_layer=False)
    randomize_(m, seed)
    return m.eval()


def timm_layout(vit: ViTModel) -> dict[str, torch.Tensor]:
    """HF ViT weights under timm's vit_base_patch8_224 names (as in MANIQA's state dict)."""
    s = vit.state_dict()
    out = {"vit.cls_token": s["embeddings.cls_token"], "vit.pos_embed": s["embeddings.position_embeddings"],
           "vit.patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "vit.patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "vit.norm.weight": s["layernorm.weight"], "vit.norm.bias": s["layernorm.bias"],
           "vit.head.weight": torch.randn(1000, TINY.vit_dim), "vit.head.bias": torch.randn(1000)}
    for i in range(VIT_LAYERS):
        h, t = f"layers.{i}.", f"vit.blocks.{i}."  # transformers 5 ViT names
        for wb in ("weight", "bias"):
            out[t + "attn.qkv." + wb] = torch.cat([s[h + f"attention.{n}_proj.{wb}"] for n in ("q", "k", "v")])
            for a, b in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[t + b + "." + wb] = s[h + a + "." + wb]
    return out


def ref_crop_scores(vit: ViTModel, head: RefHead, crops: np.ndarray) -> np.ndarray:
    """Reference crop scores, computed in float64 (the tiny random model's float32 rounding noise is
    ~3e-5 relative in either framework, so a float64 reference measures our error alone)."""
    vit, head = copy.deepcopy(vit).double(), copy.deepcopy(head).double()
    x = (torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).double() - 0.5) / 0.5
    hs = vit(pixel_values=x, output_hidden_states=True).hidden_states  # [0] = embeddings, [i + 1] = block i
    feats = torch.cat([hs[b + 1][:, 1:] for b in TINY.feature_blocks], dim=2)
    return head(feats).numpy()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    vit = hf_vit(0)
    head = RefHead(TINY)
    randomize_(head, 1)
    head.eval()
    sd = {**timm_layout(vit), **head.state_dict()}
    d = tmp_path_factory.mktemp("maniqa")
    torch.save(sd, d / "ckpt_tiny.pt")
    convert_iqa("maniqa", [d / "ckpt_tiny.pt"], d / "maniqa_tiny.safetensors", preset="tiny")
    return vit, head, sd, d / "ckpt_tiny.pt", d / "maniqa_tiny.safetensors"


def photos(h: int, w: int) -> np.ndarray:
    from skimage import data

    a = data.astronaut().astype(np.float32) / 255.0
    c = data.coffee().astype(np.float32) / 255.0
    return np.stack([a[90:90 + h, 200:200 + w], c[60:60 + h, 250:250 + w]])


def test_crop_positions():
    pos = maniqa.crop_positions(300, 400, 224, 20)
    assert sorted({y for y, _ in pos}) == [0, 25, 51, 76] and sorted({x for _, x in pos}) == [0, 44, 88, 132, 176]
    assert maniqa.crop_positions(224, 224, 224, 20) == [(0, 0)] * 20
    assert {y for y, _ in maniqa.crop_positions(224, 600, 224, 20)} == {0}  # one row when there is no vertical room
    with pytest.raises(UserError):
        maniqa.crop_positions(100, 300, 224, 20)


def test_maniqa_matches_torch_reference(tiny_ckpt):
    vit, head, _, _, conv_path = tiny_ckpt
    x = photos(40, 48)  # tiny crops are 32x32: a 2x2 grid of 4 crops at rows {0, 8}, cols {0, 16}
    pos = maniqa.crop_positions(40, 48, TINY.img_size, TINY.num_crops)
    assert pos == [(0, 0), (0, 16), (8, 0), (8, 16)]
    crops = np.stack([x[:, y:y + 32, c:c + 32] for y, c in pos], axis=1)
    with torch.no_grad():
        ref_crops = ref_crop_scores(vit, head, crops.reshape(-1, 32, 32, 3))
    ref = ref_crops.reshape(2, 4).mean(1)
    assert np.ptp(ref_crops) > 1e-3 * np.abs(ref_crops).max()  # crops score differently
    graphdef, state = maniqa.load_maniqa(str(conv_path))
    with jax.default_matmul_precision("highest"):
        model = jax.jit(lambda s, c: __import__("flax").nnx.merge(graphdef, s).crop_scores(c))
        got_crops = np.asarray(model(state, jnp.asarray(crops.reshape(-1, 32, 32, 3))))
        got = np.asarray(maniqa.make_maniqa(str(conv_path))(jnp.asarray(x)))
        from fluxir_jax.iqa.registry import get_metric

        via_registry = get_metric("maniqa", weights=str(conv_path))(x)
    assert rel_err(got_crops, ref_crops) <= RTOL
    assert rel_err(got, ref) <= RTOL
    np.testing.assert_allclose(via_registry, got, rtol=1e-6)


def test_converter_round_trip(tiny_ckpt, tmp_path):
    _, _, sd, pt_path, conv_path = tiny_ckpt
    from safetensors.torch import save_file

    st_path = tmp_path / "maniqa.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_path))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, wrapped)  # DataParallel-style, nested
    a = maniqa.load_maniqa(str(conv_path), preset="tiny")
    assert iqa_weights.read_converted(conv_path)[0] == "maniqa"
    wrapped_conv = tmp_path / "wrapped.safetensors"
    convert_iqa("maniqa", [wrapped], wrapped_conv, preset="tiny")
    for src in (st_path, wrapped_conv):   # a published state dict as .safetensors is read directly
        b = maniqa.load_maniqa(str(src), preset="tiny")
        assert b[0] == a[0]
        for u, v in zip(jax.tree.leaves(b[1]), jax.tree.leaves(a[1])):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # spot-check the mechanical layout walk
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in __import__("flax").nnx.to_flat_state(a[1])}
    np.testing.assert_array_equal(flat["vit.blocks.2.attn.qkv.kernel"], sd["vit.blocks.2.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(flat["conv1.kernel"], sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["fc_weight.fc3.bias"], sd["fc_weight.3.bias"].numpy())
    assert "vit.blocks.3.norm1.scale" not in flat
    assert cli.main(["convert-iqa", "maniqa", str(pt_path), "-o", str(tmp_path / "cli.safetensors"), "--preset", "tiny"]) == 0
    with pytest.raises(UserError, match=r"not PyTorch files; convert .*`fluxir convert-iqa maniqa ckpt_koniq10k\.pt -o"):
        maniqa.load_maniqa(str(pt_path), preset="tiny")


def test_wrong_architecture_names_first_bad_key(tiny_ckpt):
    _, _, sd, _, _ = tiny_ckpt
    np_sd = {k: v.numpy() for k, v in sd.items()}
    with pytest.raises(UserError, match=r"'vit\.cls_token' has shape \(1, 1, 32\)"):
        maniqa.params_from_published(np_sd, "tiny.pt", preset="koniq")
    bad = dict(np_sd)
    del bad["swintransformer2.layers.1.blocks.1.attn.relative_position_bias_table"]
    with pytest.raises(UserError, match=r"missing key 'swintransformer2\.layers\.1\.blocks\.1\.attn\.relative_position_bias_table'"):
        maniqa.params_from_published(bad, "bad.pt", preset="tiny")
    extra = dict(np_sd)
    extra["tablock1.2.c_q.weight"] = np_sd["tablock1.1.c_q.weight"]
    with pytest.raises(UserError, match=r"unexpected key 'tablock1\.2\.c_q\.weight'"):
        maniqa.params_from_published(extra, "extra.pt", preset="tiny")
    with pytest.raises(UserError, match=r"unexpected key 'visual\.conv1\.weight'"):
        maniqa.params_from_published({"visual.conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, "clip.pt",
                                              preset="tiny")


def test_koniq_preset_layout():
    shapes = iqa_weights.abstract_shapes(maniqa.abstract_model(maniqa.PRESETS["koniq"]))
    assert shapes["vit.pos_embed"][1] == (1, 785, 768)
    assert shapes["vit.patch_embed.proj.kernel"][1] == (8, 8, 3, 768)
    assert "vit.blocks.9.mlp.fc2.kernel" in shapes and "vit.blocks.10.norm1.scale" not in shapes
    assert shapes["tablock1.1.c_q.kernel"][1] == (784, 784)
    assert shapes["conv1.kernel"][1] == (1, 1, 3072, 768)
    assert shapes["swintransformer1.layers.1.blocks.1.attn.relative_position_bias_table"][1] == (49, 4)
    assert shapes["swintransformer2.layers.0.blocks.0.mlp.fc1.kernel"][1] == (384, 768)
    assert shapes["fc_score.fc3.kernel"][1] == (384, 1)
