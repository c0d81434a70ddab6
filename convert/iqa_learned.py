"""Weight converters for the learned no-reference IQA metrics: CLIP-IQA, MUSIQ, MANIQA.

Published layouts read (never downloaded; nothing arbitrary is unpickled):
    CLIP-IQA  an OpenAI/open_clip CLIP ResNet state dict (`visual.conv1.weight`, `visual.layer1.0...`,
              `visual.attnpool.*`, the text tower, `logit_scale`): OpenAI's TorchScript `RN50.pt`
              (read with `torch.jit.load`, whose restricted unpickler builds only tensors and
              TorchScript code), or a state dict in `.safetensors` / `.pt` / `.bin`
              (`torch.load(weights_only=True)`). The CLIP text tower runs here, once, in PyTorch
              (transformers `CLIPTextModelWithProjection`), to embed the prompt pairs.
    MUSIQ     the original Flax checkpoint `.npz` (keys `opt/target/...`, google-research/musiq).
    MANIQA    the PyTorch state dict of IIGROUP/MANIQA (`vit.*`, `tablock1.*`, `swintransformer1.*`,
              `fc_score.*`, ...), `.pt/.pth` (`weights_only=True`) or `.safetensors`.

Output: one `.safetensors` file whose keys are our NNX state paths (`visual.layer1.0.conv1.kernel`)
and whose metadata holds the metric name and its architecture config. The metric loaders
(`fluxir_jax.iqa.{clipiqa,musiq,maniqa}`) accept either that file or the published one.

Wrong architecture (a missing key, an unexpected key, a shape mismatch) raises `UserError`
naming the first bad key. Command line (`add_arguments`/`run`, registered by `convert.iqa`):

    fluxir convert-iqa clipiqa RN50.pt clipiqa_rn50.safetensors [--bpe VOCAB.txt.gz]
    fluxir convert-iqa musiq koniq_ckpt.npz musiq_koniq.safetensors [--preset koniq]
    fluxir convert-iqa maniqa ckpt_koniq10k.pt maniqa_koniq.safetensors [--preset koniq]
"""
from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import json
import os
import pathlib
import sys
import warnings
import zipfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from fluxir_jax.errors import UserError

FORMAT_KEY = "fluxir_metric"

# ----------------------------------------------------------------------------- reading files


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test/convert dependency
        raise UserError("reading PyTorch weight files needs PyTorch (pip install torch)") from e
    return torch


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _unwrap(obj: Any, path: pathlib.Path) -> Mapping[str, Any]:
    """A state dict, possibly nested under a conventional key, with DataParallel prefixes removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            for key in ("state_dict", "params", "params_ema", "model", "net"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "shape"):
            continue
        k = str(k)
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        if v.dtype.is_floating_point:
            v = v.float()
        return v.numpy()
    a = np.asarray(v)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {name: float32/int ndarray} from .safetensors, .npz, a torch state dict or a TorchScript archive."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"weight file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            # bf16 tensors need a framework that has them: torch when installed
            framework = "pt" if importlib.util.find_spec("torch") is not None else "numpy"
            with safe_open(str(p), framework=framework) as f:
                return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: _to_numpy(z[k]) for k in z.files}
        torch = _torch()
        if _is_torchscript(p):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = torch.jit.load(str(p), map_location="cpu").state_dict()
        else:
            try:
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling refusal is a user-file problem
                raise UserError(f"{p}: cannot read as a weights-only PyTorch state dict "
                                f"(a pickled full model must be re-saved as model.state_dict()): "
                                f"{str(e).splitlines()[0][:200]}") from None
        return {k: _to_numpy(v) for k, v in _unwrap(sd, p).items()}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: unreadable weight file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------- our converted format


def save_converted(path: str | os.PathLike, metric: str, config: Mapping[str, Any],
                   flat: Mapping[str, np.ndarray]) -> None:
    """Write {our state path: array} + metadata to `path` (.safetensors), atomically."""
    from safetensors.numpy import save_file

    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    save_file(arrays, str(tmp), metadata={FORMAT_KEY: metric, "config": json.dumps(dict(config))})
    os.replace(tmp, p)


def read_converted(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, np.ndarray]] | None:
    """(metric, config, flat) if `path` is a file written by `save_converted`, else None."""
    p = pathlib.Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if FORMAT_KEY not in meta:
                return None
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: unreadable safetensors file ({type(e).__name__})") from None
    return meta[FORMAT_KEY], json.loads(meta.get("config", "{}")), flat


def _load(metric: str, path: str | os.PathLike, convert_fn: Callable[[str], tuple[dict, dict]]):
    conv = read_converted(path)
    if conv is not None:
        name, cfg, flat = conv
        if name != metric:
            raise UserError(f"{path}: holds converted {name!r} weights, not {metric!r}")
        return cfg, flat
    return convert_fn(str(path))


# ----------------------------------------------------------------------------- NNX state assembly


def _path_str(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def build_state(abstract_model: Any, flat: Mapping[str, np.ndarray], source: str = "weights"):
    """(graphdef, state) of `abstract_model` (from nnx.eval_shape) filled from {path: array}.

    Every state path must be present with the right shape; extra keys are an error too.
    """
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract_state = nnx.split(abstract_model)
    fs = nnx.to_flat_state(abstract_state)
    out, seen = [], set()
    for path, var in fs:
        key = _path_str(path)
        want = var.get_value()
        if key not in flat:
            raise UserError(f"{source}: missing key {key!r}")
        arr = np.asarray(flat[key])
        if want.shape == () and arr.size == 1:  # safetensors stores scalars as [1]
            arr = arr.reshape(())
        if tuple(arr.shape) != tuple(want.shape):
            raise UserError(f"{source}: key {key!r} has shape {tuple(arr.shape)}, expected {tuple(want.shape)}")
        out.append((path, var.replace(jnp.asarray(arr, dtype=want.dtype))))
        seen.add(key)
    extra = [k for k in flat if k not in seen]
    if extra:
        raise UserError(f"{source}: unexpected key {extra[0]!r}")
    return graphdef, nnx.from_flat_state(out)


def abstract_shapes(abstract_model: Any) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """{our key: (path, shape)} of an abstract NNX model, in state order."""
    from flax import nnx

    _, st = nnx.split(abstract_model)
    return {_path_str(p): (tuple(p), tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(st)}


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_to_ours(sd: Mapping[str, np.ndarray], ours: Mapping[str, tuple[tuple[Any, ...], tuple[int, ...]]],
                  source: str, prefix: str = "", rename: Callable[[str], str] | None = None,
                  ignore: Callable[[str], bool] = lambda k: False) -> dict[str, np.ndarray]:
    """Mechanical torch -> NNX walk: conv OIHW -> HWIO, Linear W -> W.T, BN/LN weight -> scale.

    `ours` is {our key: (path, shape)}; the torch key of each is `prefix` + the path with the
    leaf renamed (kernel/scale -> weight, mean -> running_mean, var -> running_var), optionally
    passed through `rename`. Keys are checked in the file's order: the first unexpected key
    (not `ignore`d) or shape mismatch raises; then the first missing key.
    """
    wanted: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for key, (path, shape) in ours.items():
        leaf = str(path[-1])
        tkey = (prefix + ".".join(str(p) for p in path[:-1]) + "." + _TORCH_LEAF.get(leaf, leaf)).lstrip(".")
        if rename is not None:
            tkey = rename(tkey)
        wanted[tkey] = (key, leaf, tuple(shape))
    out = {}
    for tkey, v in sd.items():
        if tkey not in wanted:
            if not ignore(tkey) and not tkey.endswith("num_batches_tracked"):
                raise UserError(f"{source}: unexpected key {tkey!r} (wrong architecture?)")
            continue
        key, leaf, shape = wanted[tkey]
        a = np.asarray(v, np.float32)
        if leaf == "kernel" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif leaf == "kernel" and a.ndim == 2:
            a = a.T
        if tuple(a.shape) != shape:
            raise UserError(f"{source}: key {tkey!r} has shape {tuple(np.shape(v))}, "
                            f"which does not fit {shape} (wrong architecture?)")
        out[key] = a
    for tkey, (key, _, _) in wanted.items():
        if key not in out:
            raise UserError(f"{source}: missing key {tkey!r} (wrong architecture?)")
    return {k: out[k] for k in ours}


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
    torch = _torch()
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
    return {"visual": _config_dict(vcfg)}, flat


def _config_dict(x: Any) -> dict[str, Any]:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(x).items()}


def load_clipiqa_weights(path: str | os.PathLike, bpe_path: str | os.PathLike | None = None,
                         preset: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat) from a converted CLIP-IQA file or a published CLIP state dict."""
    return _load("clipiqa", path, lambda p: convert_clipiqa_state_dict(read_tensors(p), p, bpe_path, preset))


def convert_clipiqa(src: str | os.PathLike, dst: str | os.PathLike, bpe_path: str | os.PathLike | None = None,
                    preset: str | None = None) -> None:
    cfg, flat = convert_clipiqa_state_dict(read_tensors(src), str(src), bpe_path, preset)
    save_converted(dst, "clipiqa", cfg, flat)


# ----------------------------------------------------------------------------- MUSIQ


def convert_musiq_tensors(tensors: Mapping[str, np.ndarray], source: str = "weights",
                          preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Original MUSIQ Flax checkpoint (`opt/target/...` npz keys) -> (config, {our key: array}).

    Optimizer state (`opt/state/...`) and an empty/unused `pre_logits` are ignored.
    """
    from fluxir_jax.iqa import musiq

    if preset not in musiq.PRESETS:
        raise UserError(f"unknown MUSIQ preset {preset!r} (known: {', '.join(musiq.PRESETS)})")
    cfg = musiq.PRESETS[preset]
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in tensors) else ""
    ours = abstract_shapes(musiq.abstract_model(cfg))
    wanted = {prefix + key.replace(".", "/"): (key, shape) for key, (_, shape) in ours.items()}
    out = {}
    for k, v in tensors.items():
        if k not in wanted:
            rest = k[len(prefix):] if k.startswith(prefix) else k
            if (prefix and not k.startswith(prefix)) or rest.startswith("pre_logits/"):
                continue
            raise UserError(f"{source}: unexpected key {k!r} (not a MUSIQ {preset} checkpoint?)")
        key, shape = wanted[k]
        a = np.asarray(v, np.float32)
        if tuple(a.shape) != tuple(shape):
            raise UserError(f"{source}: key {k!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                            f"(not a MUSIQ {preset} checkpoint?)")
        out[key] = a
    for k, (key, _) in wanted.items():
        if key not in out:
            raise UserError(f"{source}: missing key {k!r} (not a MUSIQ {preset} checkpoint?)")
    return cfg.to_dict(), {k: out[k] for k in ours}


def load_musiq_weights(path: str | os.PathLike, preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat) from a converted MUSIQ file or an original `.npz` checkpoint."""
    return _load("musiq", path, lambda p: convert_musiq_tensors(read_tensors(p), p, preset))


def convert_musiq(src: str | os.PathLike, dst: str | os.PathLike, preset: str = "koniq") -> None:
    cfg, flat = convert_musiq_tensors(read_tensors(src), str(src), preset)
    save_converted(dst, "musiq", cfg, flat)


# ----------------------------------------------------------------------------- MANIQA


def convert_maniqa_state_dict(sd: Mapping[str, np.ndarray], source: str = "weights",
                              preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """IIGROUP/MANIQA state dict -> (config, {our key: array}).

    Ignored: ViT blocks after the last feature block, `vit.norm`, `vit.fc_norm`, `vit.head`,
    the unused `swintransformer*.downsample` conv, and the `relative_position_index` /
    `attn_mask` buffers (recomputed).
    """
    import re

    from fluxir_jax.iqa import maniqa

    if preset not in maniqa.PRESETS:
        raise UserError(f"unknown MANIQA preset {preset!r} (known: {', '.join(maniqa.PRESETS)})")
    cfg = maniqa.PRESETS[preset]
    used = cfg.vit_depth_used

    def ignore(k: str) -> bool:
        m = re.match(r"vit\.blocks\.(\d+)\.", k)
        if m:
            return int(m.group(1)) >= used
        return (k.startswith(("vit.norm.", "vit.fc_norm.", "vit.head.", "swintransformer1.downsample.",
                              "swintransformer2.downsample."))
                or k.endswith((".relative_position_index", ".attn_mask")))

    def rename(k: str) -> str:
        return re.sub(r"^(fc_score|fc_weight)\.fc(\d+)\.", r"\1.\2.", k)

    ours = abstract_shapes(maniqa.abstract_model(cfg))
    return cfg.to_dict(), torch_to_ours(sd, ours, source, rename=rename, ignore=ignore)


def load_maniqa_weights(path: str | os.PathLike, preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat) from a converted MANIQA file or an IIGROUP/MANIQA state dict."""
    return _load("maniqa", path, lambda p: convert_maniqa_state_dict(read_tensors(p), p, preset))


def convert_maniqa(src: str | os.PathLike, dst: str | os.PathLike, preset: str = "koniq") -> None:
    cfg, flat = convert_maniqa_state_dict(read_tensors(src), str(src), preset)
    save_converted(dst, "maniqa", cfg, flat)


# ----------------------------------------------------------------------------- command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("metric", choices=["clipiqa", "musiq", "maniqa"])
    ap.add_argument("src", help="published weight file")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--preset", default=None, help="architecture preset (default: inferred / the paper's)")
    ap.add_argument("--bpe", default=None, help="CLIP BPE vocabulary (clipiqa; default: from open-clip-torch)")


def run(args: argparse.Namespace) -> int:
    """Convert one published weight file; raises UserError on a bad one."""
    if args.metric == "clipiqa":
        convert_clipiqa(args.src, args.dst, bpe_path=args.bpe, preset=args.preset)
    elif args.metric == "musiq":
        convert_musiq(args.src, args.dst, preset=args.preset or "koniq")
    else:
        convert_maniqa(args.src, args.dst, preset=args.preset or "koniq")
    print(f"wrote {args.dst}")
    return 0
