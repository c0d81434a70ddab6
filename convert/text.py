"""Text conditioning for FLUX: T5 hidden states and CLIP pooled vectors, computed in PyTorch.

FLUX reads two text encodings (BFL `flux/modules/conditioner.py::HFEmbedder`, same as the
diffusers FluxPipeline):
  * T5 (`T5EncoderModel`): tokens padded/truncated to `max_length` (512 for dev, 256 for
    schnell), no attention mask, `last_hidden_state` [L, d_model]  -> the transformer's `txt`;
  * CLIP (`CLIPTextModel`): tokens padded/truncated to 77, `pooler_output` [hidden] -> `y`.
Both run here once, offline, in PyTorch from local `transformers` folders (nothing is
downloaded; `.bin` pickles are refused: safetensors only). FluxIR needs only the empty
prompt, which `fluxir convert --t5 DIR --clip DIR` stores in the checkpoint
(`text/empty.npz`); `fluxir encode-prompts` encodes a list of prompts to an .npz.

A model folder may carry its tokenizer files; if it does not (a diffusers pipeline's
`text_encoder_2/`), the sibling `tokenizer_2/` (T5) or `tokenizer/` (CLIP) is used.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from fluxir_jax.errors import UserError

CLIP_LEN = 77


def default_text_len(guidance_embed: bool) -> int:
    """BFL's T5 length: 512 for flux-dev (guidance-distilled), 256 for flux-schnell."""
    return 512 if guidance_embed else 256


def _tokenizer_dir(model_dir: pathlib.Path, sibling: str) -> pathlib.Path:
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
    if any((model_dir / n).is_file() for n in names):
        return model_dir
    alt = model_dir.parent / sibling
    if alt.is_dir():
        return alt
    raise UserError(f"{model_dir}: no tokenizer files here or in ../{sibling}")


def _load(kind: str, model_dir, dtype: str):
    import torch
    import transformers

    model_dir = pathlib.Path(model_dir)
    flag = "--t5" if kind == "t5" else "--clip"
    if not model_dir.is_dir():
        raise UserError(f"{flag} {model_dir}: not a directory")
    cls = transformers.T5EncoderModel if kind == "t5" else transformers.CLIPTextModel
    types = ("t5", "umt5") if kind == "t5" else ("clip", "clip_text_model")
    tok_dir = _tokenizer_dir(model_dir, "tokenizer_2" if kind == "t5" else "tokenizer")
    tf_logging = transformers.utils.logging
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        if config.model_type not in types:
            raise UserError(f"{flag} {model_dir}: a {config.model_type!r} model, expected {' or '.join(types)}; "
                            f"cannot load a {cls.__name__}")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        model, info = cls.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), use_safetensors=True,
                                          output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {model_dir}: cannot load a {cls.__name__} and tokenizer ({first})") from None
    finally:
        tf_logging.set_verbosity(verbosity)
        tf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if "embed_tokens" not in k)
    bad = missing or sorted(info.get("mismatched_keys", ()))
    if bad:
        raise UserError(f"{flag} {model_dir}: not a complete {cls.__name__} checkpoint (no weights for {bad[0]!r})")
    return tokenizer, model.eval()


def _tokens(tokenizer, prompts: Sequence[str], length: int):
    return tokenizer(
        list(prompts), truncation=True, max_length=length, padding="max_length",
        return_length=False, return_overflowing_tokens=False, return_tensors="pt",
    )["input_ids"]


def encode(prompts: Sequence[str], *, t5_dir, clip_dir, text_len: int, dtype: str = "float32",
           batch_size: int = 8) -> dict[str, np.ndarray]:
    """{"txt": [N, text_len, d_model] (T5), "y": [N, hidden] (CLIP pooled)} float32 numpy arrays."""
    import torch

    prompts = list(prompts)
    out: dict[str, np.ndarray] = {}
    for kind, folder in (("t5", t5_dir), ("clip", clip_dir)):
        tokenizer, model = _load(kind, folder, dtype)
        length = text_len if kind == "t5" else min(CLIP_LEN, model.config.max_position_embeddings)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                ids = _tokens(tokenizer, prompts[i:i + batch_size], length)
                res = model(input_ids=ids, attention_mask=None, output_hidden_states=False)
                value = res.last_hidden_state if kind == "t5" else res.pooler_output
                chunks.append(value.float().numpy())
        out["txt" if kind == "t5" else "y"] = np.concatenate(chunks, axis=0).astype(np.float32)
        del model, tokenizer
    return out


def empty(t5_dir, clip_dir, text_len: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Empty-prompt embeddings: `txt` (T5) [text_len, d_model] and `y` (CLIP pooled) [hidden]."""
    e = encode([""], t5_dir=t5_dir, clip_dir=clip_dir, text_len=text_len, dtype=dtype)
    return e["txt"][0], e["y"][0]

