"""CLIP-IQA against PyTorch references with identical random weights.

Image tower: open_clip's own `ModifiedResNet` (loaded from the open-clip-torch wheel without
importing the package `__init__`, which needs torchvision). Text tower: an independent
re-statement of OpenAI CLIP's `encode_text` written here with torch.nn.functional (the converter
uses transformers' CLIPTextModelWithProjection). Tolerance: relative error ||a-b||/||b|| <= 1e-4
in float32 under "highest" matmul precision.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from fluxir_convert import clipiqa_text, torch_read
from fluxir_convert.iqa import convert_iqa
from fluxir_jax.iqa import weights as iqa_weights
from fluxir_jax import cli
from fluxir_jax.errors import UserError
from fluxir_jax.iqa import clipiqa

RTOL = 1e-4
TINY = clipiqa.PRESETS["tiny"]
TEXT_WIDTH, TEXT_LAYERS = 64, 2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _open_clip_modified_resnet():
    """open_clip.modified_resnet, imported from the wheel with a stub for its torchvision-only utils."""
    if "open_clip.modified_resnet" in sys.modules:
        return sys.modules["open_clip.modified_resnet"]
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open-clip-torch must be installed (pip install --no-deps open-clip-torch)"
    d = os.path.dirname(spec.origin)
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [d]
        pkg.__spec__ = spec
        sys.modules["open_clip"] = pkg
    utils = types.ModuleType("open_clip.utils")
    utils.freeze_batch_norm_2d = utils.feature_take_indices = None  # used only by lock()/forward_intermediates
    sys.modules.setdefault("open_clip.utils", utils)
    s = importlib.util.spec_from_file_location("open_clip.modified_resnet", os.path.join(d, "modified_resnet.py"))
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    sys.modules["open_clip.modified_resnet"] = m
    return m


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer random (zero inits hide bugs); BN variances positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.ndim >= 2:
                fan_in = int(np.prod(t.shape[1:]))
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            elif name.endswith("bn1.weight") or name.endswith("bn2.weight") or name.endswith("bn3.weight") \
                    or name.endswith("downsample.1.weight"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def tiny_visual(seed: int = 0) -> torch.nn.Module:
    m = _open_clip_modified_resnet()
    net = m.ModifiedResNet(list(TINY.layers), TINY.output_dim, TINY.heads, TINY.image_size, TINY.width)
    randomize_(net, seed)
    with torch.no_grad():
        net.attnpool.positional_embedding.mul_(3.0)  # make the positional embedding matter
    return net.eval()


def tiny_text_sd(seed: int = 1, embed: int = TINY.output_dim) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = TEXT_WIDTH
    r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"token_embedding.weight": r(49408, w, scale=0.5), "positional_embedding": r(77, w, scale=0.1),
          "ln_final.weight": 1 + r(w, scale=0.1), "ln_final.bias": r(w, scale=0.1),
          "text_projection": r(w, embed, scale=w**-0.5), "logit_scale": torch.tensor(np.log(4.0), dtype=torch.float32)}
    for i in range(TEXT_LAYERS):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(w, scale=0.1), p + "ln_1.bias": r(w, scale=0.1),
                   p + "attn.in_proj_weight": r(3 * w, w, scale=w**-0.5), p + "attn.in_proj_bias": r(3 * w, scale=0.1),
                   p + "attn.out_proj.weight": r(w, w, scale=w**-0.5), p + "attn.out_proj.bias": r(w, scale=0.1),
                   p + "ln_2.weight": 1 + r(w, scale=0.1), p + "ln_2.bias": r(w, scale=0.1),
                   p + "mlp.c_fc.weight": r(4 * w, w, scale=w**-0.5), p + "mlp.c_fc.bias": r(4 * w, scale=0.1),
                   p + "mlp.c_proj.weight": r(w, 4 * w, scale=(4 * w) ** -0.5), p + "mlp.c_proj.bias": r(w, scale=0.1)})
    return sd


def ref_encode_text(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP encode_text (causal transformer, QuickGELU, pooled at argmax id) in plain torch."""
    w = sd["token_embedding.weight"].shape[1]
    heads = max(w // 64, 1)
    L = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    mask = torch.full((L, L), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x, (w,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def full_state_dict(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    sd.update(tiny_text_sd())
    return sd


def photo_batch(h: int, w: int) -> np.ndarray:
    from skimage import data

    a = data.astronaut().astype(np.float32) / 255.0
    c = data.coffee().astype(np.float32) / 255.0
    return np.stack([a[100:100 + h, 150:150 + w], c[50:50 + h, 200:200 + w]])


def torch_normalize(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    mean = torch.tensor(clipiqa.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clipiqa.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (t - mean) / std


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    visual = tiny_visual()
    sd = full_state_dict(visual)
    d = tmp_path_factory.mktemp("clip")
    torch.save(sd, d / "tiny_clip.pt")
    convert_iqa("clipiqa", [d / "tiny_clip.pt"], d / "tiny_clipiqa.safetensors")
    return visual, sd, d / "tiny_clip.pt", d / "tiny_clipiqa.safetensors"


def test_tokenizer_matches_known_clip_ids():
    ids = clipiqa_text.clip_tokenize(["a photo of a cat", "Good photo."])
    assert ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert ids[0, 8:].sum() == 0
    assert ids[1, :5].tolist() == [49406, 886, 1125, 269, 49407]


def test_text_features_match_reference_encode_text():
    sd = tiny_text_sd()
    texts = [t for pair in clipiqa.PROMPT_SETS["ensemble"] for t in pair]
    ids = clipiqa_text.clip_tokenize(texts)
    got = clipiqa_text.clip_text_features({k: v.numpy() for k, v in sd.items()}, ids)
    with torch.no_grad():
        ref = ref_encode_text(sd, torch.from_numpy(ids)).numpy()
    assert got.shape == (10, TINY.output_dim)
    assert rel_err(got, ref) <= 1e-5


def test_image_tower_matches_open_clip_with_positional_embedding(tiny_ckpt):
    visual, sd, _, _ = tiny_ckpt
    cfg = clipiqa.CLIPIQAConfig(visual=TINY)
    flat = iqa_weights.torch_to_ours(
        {k: v.numpy() for k, v in sd.items()},
        {k: v for k, v in iqa_weights.abstract_shapes(clipiqa.abstract_model(cfg)).items() if k.startswith("visual.")},
        "test", ignore=lambda k: not k.startswith("visual."))
    model = clipiqa.ModifiedResNet(TINY, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.from_flat_state(
        [(tuple(int(p) if p.isdigit() else p for p in k.split(".")[1:]), jnp.asarray(v)) for k, v in flat.items()]))
    x = photo_batch(64, 64)
    with torch.no_grad():
        ref = visual(torch_normalize(x)).numpy()
    xn = (x - np.array(clipiqa.OPENAI_CLIP_MEAN, np.float32)) / np.array(clipiqa.OPENAI_CLIP_STD, np.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda m, v: m(v, use_pos_embedding=True))(model, xn)
    assert rel_err(got, ref) <= RTOL
    with pytest.raises(UserError, match="positional embedding"):
        model(xn[:, :48], use_pos_embedding=True)


@pytest.mark.parametrize("prompts", ["ensemble", "original"])
def test_clipiqa_score_matches_torch_reference(tiny_ckpt, prompts):
    visual, sd, _, path = tiny_ckpt  # the converted file (conversion itself: see the round-trip test)
    x = photo_batch(75, 90)  # not a multiple of 32: exercises the floor pooling and the dropped pos-embedding
    # Reference: open_clip's tower with its positional embedding zeroed == CLIP-IQA's pos_embedding=False.
    ref_visual = tiny_visual()
    with torch.no_grad():
        ref_visual.attnpool.positional_embedding.zero_()
        feats = ref_visual(torch_normalize(x))
        pairs = clipiqa.PROMPT_SETS[prompts]
        ids = torch.from_numpy(clipiqa_text.clip_tokenize([t for p in pairs for t in p]))
        text = ref_encode_text(sd, ids)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = sd["logit_scale"].exp() * feats @ text.T
        ref = logits.view(len(x), len(pairs), 2).softmax(-1)[..., 0].mean(-1).numpy()
    assert np.all((ref > 0.02) & (ref < 0.98)), ref  # informative (unsaturated) probabilities
    scorer = clipiqa.make_clipiqa(str(path), prompts=prompts)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(scorer(jnp.asarray(x)))
        graphdef, state = clipiqa.load_clipiqa(str(path), prompts=prompts)
        model = nnx.merge(graphdef, state)
        got_feats = np.asarray(model.image_features(jnp.asarray(x)))
        from fluxir_jax.iqa.registry import get_metric

        via_registry = get_metric("clipiqa" if prompts == "ensemble" else "clipiqa-original", weights=str(path))(x)
    np.testing.assert_allclose(via_registry, got, rtol=1e-6)
    assert got.shape == (2,)
    assert rel_err(got_feats / np.linalg.norm(got_feats, axis=-1, keepdims=True), feats.numpy()) <= RTOL
    assert rel_err(got, ref) <= RTOL


def test_converter_round_trip_published_formats(tiny_ckpt, tmp_path):
    visual, sd, pt_path, conv_path = tiny_ckpt
    # open_clip / HF hub layout as safetensors
    from safetensors.torch import save_file

    st_path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(st_path))
    # OpenAI's RN50.pt is a TorchScript archive with fp16 weights: build one with the same names
    ts_path = tmp_path / "RN50_like.pt"
    holder = torch.nn.Module()
    for k, v in sd.items():
        *parents, leaf = k.split(".")
        mod = holder
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if v.dtype.is_floating_point:
            mod.register_parameter(leaf, torch.nn.Parameter(v.half().float(), requires_grad=False))
        else:
            mod.register_buffer(leaf, v)
    holder.forward = types.MethodType(lambda self, x: x * self.logit_scale, holder)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(holder, torch.ones(2)), str(ts_path))

    meta = iqa_weights.read_converted(conv_path)
    assert meta is not None and meta[0] == "clipiqa" and tuple(meta[1]["visual"]["layers"]) == TINY.layers
    ref_state = clipiqa.load_clipiqa(str(conv_path))[1]
    st_conv = tmp_path / "from_safetensors.safetensors"
    convert_iqa("clipiqa", [st_path], st_conv)
    st = clipiqa.load_clipiqa(str(st_conv))[1]
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ts_conv = tmp_path / "from_torchscript.safetensors"
    convert_iqa("clipiqa", [ts_path], ts_conv)
    ts_state = clipiqa.load_clipiqa(str(ts_conv))[1]  # fp16-rounded weights: close, not equal
    for a, b in zip(jax.tree.leaves(ts_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-3)
    # command line
    out2 = tmp_path / "cli.safetensors"
    assert cli.main(["convert-iqa", "clipiqa", str(pt_path), "-o", str(out2)]) == 0
    assert iqa_weights.read_converted(out2)[0] == "clipiqa"


def st_published(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip_published.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ckpt[1].items()}, str(path))
    return path


def test_wrong_architecture_names_first_bad_key(tiny_ckpt, tmp_path):
    _, sd, _, _ = tiny_ckpt
    np_sd = {k: v.numpy() for k, v in sd.items()}
    bad = dict(np_sd)
    del bad["visual.layer2.0.bn1.running_var"]
    with pytest.raises(UserError, match=r"'visual\.layer2\.0\.bn1\.running_var'"):
        clipiqa_text.convert_clipiqa_state_dict(bad, "bad.pt")
    with pytest.raises(UserError, match=r"'visual\.conv1\.weight' has shape"):
        clipiqa_text.convert_clipiqa_state_dict(np_sd, "tiny.pt", preset="RN50")
    extra = dict(np_sd)
    extra["visual.layer4.1.conv1.weight"] = np_sd["visual.layer4.0.conv1.weight"]
    with pytest.raises(UserError, match=r"unexpected key 'visual\.layer4\.1\.conv1\.weight'"):
        clipiqa_text.convert_clipiqa_state_dict(extra, "deeper.pt", preset="tiny")
    with pytest.raises(UserError, match=r"'visual\.layer1\.0\.conv1\.weight'"):
        clipiqa_text.convert_clipiqa_state_dict({"vit.cls_token": np.zeros((1, 1, 8), np.float32)}, "maniqa.pt")
    p = tmp_path / "pickled_model.pt"
    torch.save(torch.nn.Linear(2, 2), p)  # a whole pickled module, not a state dict
    with pytest.raises(UserError, match="weights_only"):
        torch_read.read_tensors(p)
    with pytest.raises(UserError, match="not found"):
        clipiqa.load_clipiqa(str(tmp_path / "nope.pt"))
    assert cli.main(["convert-iqa", "clipiqa", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.safetensors")]) == 2
    # a published file (PyTorch or an unconverted state dict) is refused with the command that converts it
    _, _, pt_path, _ = tiny_ckpt
    for published in (pt_path, st_published(tiny_ckpt, tmp_path)):
        with pytest.raises(UserError, match=r"fluxir convert-iqa clipiqa RN50\.pt -o clipiqa_rn50\.safetensors"):
            clipiqa.load_clipiqa(str(published))
    with pytest.raises(UserError, match="prompt set"):
        clipiqa.CLIPIQAConfig(prompts="bogus")


def test_rn50_preset_matches_open_clip_layout():
    m = _open_clip_modified_resnet()
    with torch.device("meta"):
        net = m.ModifiedResNet([3, 4, 6, 3], 1024, 32, 224, 64)
    sd = {f"visual.{k}": np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in net.state_dict().items()}
    assert clipiqa_text.clip_visual_config(sd) == dict(layers=(3, 4, 6, 3), width=64, heads=32, output_dim=1024,
                                                      image_size=224)
    cfg = clipiqa.CLIPIQAConfig(visual=clipiqa.PRESETS["RN50"])
    ours = {k: v for k, v in iqa_weights.abstract_shapes(clipiqa.abstract_model(cfg)).items() if k.startswith("visual.")}
    flat = iqa_weights.torch_to_ours(sd, ours, "RN50")
    assert len(flat) == len(ours)
    n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.endswith((".mean", ".var")))
    assert n_params == sum(p.numel() for p in net.parameters())  # 38.3M, open_clip's count
