"""CLIP-IQA conversion: an OpenAI/open_clip CLIP ResNet state dict -> our CLIP-IQA weights.

The image tower's weights are renamed (`fluxir_jax.iqa.weights.torch_to_ours`); the text tower
runs here, once, in PyTorch (transformers `CLIPTextModelWithProjection` with OpenAI CLIP's BPE
vocabulary), to embed the prompt pairs, whose L2-normalised embeddings are stored beside the
image tower so that scoring needs only JAX.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping

import numpy as np

from fluxir_jax.errors import UserError

from .torch_read import torch_module


# ----------------------------------------------------------------------------- CLIP tokenizer + text tower

CLIP_CONTEXT_LENGTH = 77
SOT_TOKEN, EOT_TOKEN = 49406, 49407


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def default_bpe_path() -> pathlib.Path:
    """CLIP's BPE merges as shipped in the open-clip-torch wheel (located without importing open_clip)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ValueError, ImportError):
        spec = None
    dirs = [pathlib.Path(spec.origin).parent] if spec is not None and spec.origin else []
    mod = sys.modules.get("open_clip")
    dirs += [pathlib.Path(d) for d in getattr(mod, "__path__", [])]
    for d in dirs:
        p = d / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    raise UserError("CLIP BPE vocabulary not found: pip install --no-deps open-clip-torch, or pass --bpe PATH "
                    "(bpe_simple_vocab_16e6.txt.gz)")


def clip_tokenizer(bpe_path: str | os.PathLike | None = None):
    """transformers CLIPTokenizer with OpenAI CLIP's 49408-token vocabulary."""
    p = pathlib.Path(bpe_path) if bpe_path else default_bpe_path()
    return _clip_tokenizer(str(p))


@functools.lru_cache(maxsize=2)
def _clip_tokenizer(path: str):
    from transformers import CLIPTokenizer

    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"CLIP BPE vocabulary not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def clip_tokenize(texts: Iterable[str], bpe_path: str | os.PathLike | None = None,
                  context_length: int = CLIP_CONTEXT_LENGTH) -> np.ndarray:
    """OpenAI `clip.tokenize`: [SOT, bpe..., EOT] zero-padded to `context_length`, int64 [T, ctx]."""
    tok = clip_tokenizer(bpe_path)
    texts = list(texts)
    out = np.zeros((len(texts), context_length), np.int64)
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        if ids[0] != SOT_TOKEN or ids[-1] != EOT_TOKEN:
            raise UserError(f"CLIP tokenizer gave unexpected ids for {t!r}: {ids}")
        if len(ids) > context_length:
            raise UserError(f"prompt {t!r} is longer than {context_length} tokens")
        out[i, : len(ids)] = ids
    return out


def clip_text_features(sd: Mapping[str, np.ndarray], token_ids: np.ndarray, source: str = "weights") -> np.ndarray:
    """OpenAI CLIP `encode_text` with transformers' CLIPTextModelWithProjection: [T, ctx] -> [T, E] float32.

    The text tower weights are read from the OpenAI/open_clip state dict names
    (`token_embedding`, `positional_embedding`, `transformer.resblocks.*`, `ln_final`,
    `text_projection`); pooling at the first EOT token (the highest id, as OpenAI's argmax).
    """
    torch = torch_module()
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        if k not in sd:
            raise UserError(f"{source}: missing key {k!r} (not a CLIP state dict with its text tower)")
    width = sd["token_embedding.weight"].shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    cfg = CLIPTextConfig(
        vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width,
        num_hidden_layers=layers, num_attention_heads=max(width // 64, 1),
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=sd["text_projection"].shape[1],
        bos_token_id=SOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=0, attention_dropout=0.0,
    )
    hf: dict[str, np.ndarray] = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": np.asarray(sd["text_projection"]).T,
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        try:
            wq, wk, wv = np.split(np.asarray(sd[src + "attn.in_proj_weight"]), 3, axis=0)
            bq, bk, bv = np.split(np.asarray(sd[src + "attn.in_proj_bias"]), 3, axis=0)
            for n, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
                hf[dst + f"self_attn.{n}_proj.weight"], hf[dst + f"self_attn.{n}_proj.bias"] = w, b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                hf[dst + b + ".weight"] = sd[src + a + ".weight"]
                hf[dst + b + ".bias"] = sd[src + a + ".bias"]
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r} (CLIP text tower)") from None
    model = CLIPTextModelWithProjection(cfg).eval().float()
    want = model.state_dict()
    tensors = {}
    for k, v in hf.items():
        t = torch.as_tensor(np.asarray(v, np.float32))
        if k not in want or tuple(want[k].shape) != tuple(t.shape):
            raise UserError(f"{source}: CLIP text tower weight for {k!r} has shape {tuple(t.shape)} "
                            f"(wrong architecture?)")
        tensors[k] = t
    missing = [k for k in want if k not in tensors and not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{source}: CLIP text tower is missing {missing[0]!r}")
    model.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        out = model(input_ids=ids).text_embeds
    return out.float().numpy()


# ----------------------------------------------------------------------------- CLIP-IQA


def clip_visual_config(sd: Mapping[str, np.ndarray], source: str = "weights") -> dict[str, Any]:
    """Infer the ModifiedResNet sizes from an OpenAI/open_clip state dict (as open_clip does)."""
    for k in ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding", "visual.attnpool.c_proj.weight"):
        if k not in sd:
            raise UserError(f"{source}: missing key {k!r} (not a CLIP ResNet state dict)")
    layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
    width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
    grid = int(round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
    return dict(layers=layers, width=width, heads=width * 32 // 64,
                output_dim=int(sd["visual.attnpool.c_proj.weight"].shape[0]), image_size=grid * 32)


def convert_clipiqa_state_dict(sd: Mapping[str, np.ndarray], source: str = "weights",
                               bpe_path: str | os.PathLike | None = None,
                               preset: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """OpenAI/open_clip CLIP ResNet state dict -> (config, {our key: array}) incl. prompt embeddings."""
    from fluxir_jax.iqa import clipiqa
    from fluxir_jax.iqa.weights import abstract_shapes, config_dict, torch_to_ours

    if preset is not None:
        if preset not in clipiqa.PRESETS:
            raise UserError(f"unknown CLIP ResNet preset {preset!r} (known: {', '.join(clipiqa.PRESETS)})")
        vcfg = clipiqa.PRESETS[preset]
    else:
        vcfg = clipiqa.CLIPResNetConfig(**clip_visual_config(sd, source))
    cfg = clipiqa.CLIPIQAConfig(visual=vcfg)
    ours = {k: v for k, v in abstract_shapes(clipiqa.abstract_model(cfg)).items() if k.startswith("visual.")}
    flat = torch_to_ours(sd, ours, source, prefix="", ignore=lambda k: not k.startswith("visual."))
    if "logit_scale" not in sd:
        raise UserError(f"{source}: missing key 'logit_scale'")
    flat["logit_scale"] = np.exp(np.asarray(sd["logit_scale"], np.float32)).reshape(())
    texts = [t for pairs in clipiqa.PROMPT_SETS.values() for pair in pairs for t in pair]
    ctx = int(sd["positional_embedding"].shape[0]) if "positional_embedding" in sd else CLIP_CONTEXT_LENGTH
    f = clip_text_features(sd, clip_tokenize(texts, bpe_path, context_length=ctx), source)
    if f.shape[-1] != vcfg.output_dim:
        raise UserError(f"{source}: text embedding width {f.shape[-1]} != image embedding width {vcfg.output_dim}")
    f = (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float32)
    start = 0
    for name, pairs in clipiqa.PROMPT_SETS.items():
        flat[f"text_features.{name}"] = f[start:start + 2 * len(pairs)].reshape(len(pairs), 2, -1)
        start += 2 * len(pairs)
    return {"visual": config_dict(vcfg)}, flat
