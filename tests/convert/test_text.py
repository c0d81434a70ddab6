"""Text embeddings: `convert --t5 --clip` and `encode-prompts` against direct transformers calls.

Tiny random T5EncoderModel / CLIPTextModel with real tokenizers built here: a sentencepiece
unigram model trained on a few sentences (pad 0, eos 1, unk 2) for T5, and a byte-level BPE
vocabulary (256 byte symbols, their end-of-word forms, a few merges) for CLIP. Stored
embeddings must equal a direct computation exactly (same float32 PyTorch ops).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from fluxir_convert.clipiqa_text import _bytes_to_unicode
from fluxir_jax import checkpoint
from tests.convert.test_convert import build_pipeline, run_cli
from tests.models import flux_reference as fr

CORPUS = ["a photo of a cat", "a dog on the grass", "high quality image of mountains", "the sun sets over the sea",
          "a red car in the city", "portrait of an old man with a hat"]
PROMPTS = ["", "a photo of a cat", "the sun sets over the sea, high quality"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import sentencepiece as spm
    import transformers

    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    # T5: sentencepiece unigram model trained here
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=proto, vocab_size=60, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", hard_vocab_limit=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    t5_tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (0, 1, 2)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    fr.randomize_torch_(t5, 11)
    t5.save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    # CLIP: byte-level BPE vocabulary written here
    chars = list(_bytes_to_unicode().values())  # the GPT-2/CLIP byte alphabet
    merges = [("a", "t"), ("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "f</w>")]
    bpe = {c: i for i, c in enumerate(chars)}
    bpe.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for a, b in merges:
        bpe[a + b] = len(bpe)
    bpe["<|startoftext|>"] = len(bpe)
    bpe["<|endoftext|>"] = len(bpe)
    clip_tok = transformers.CLIPTokenizer(vocab=bpe, merges=merges)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=bpe["<|startoftext|>"], eos_token_id=bpe["<|endoftext|>"],
        pad_token_id=bpe["<|endoftext|>"])).eval()
    fr.randomize_torch_(clip, 12)
    clip.save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    return dict(root=root, t5=t5, clip=clip, t5_tok=t5_tok, clip_tok=clip_tok)


def direct(enc, prompts, t5_len):
    """The reference computation, straight from the in-memory models and tokenizers (BFL HFEmbedder)."""
    with torch.no_grad():
        ids = enc["t5_tok"](prompts, max_length=t5_len, padding="max_length", truncation=True, return_tensors="pt")
        t5 = enc["t5"](input_ids=ids["input_ids"]).last_hidden_state.numpy()
        ids = enc["clip_tok"](prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
        clip = enc["clip"](input_ids=ids["input_ids"]).pooler_output.numpy()
    return t5, clip


def test_convert_stores_empty_prompt_embeddings(encoders, tmp_path):
    build_pipeline(tmp_path / "pipe")
    out = tmp_path / "ckpt"
    rc, stdout, err = run_cli(["convert", str(tmp_path / "pipe" / "transformer"), "-o", str(out), "--no-progress",
                               "--t5", str(encoders["root"] / "t5"), "--clip", str(encoders["root"] / "clip"),
                               "--text-len", "24"])
    assert rc == 0, err
    stored = checkpoint.load_text_embeddings(out)
    t5, clip = direct(encoders, [""], 24)
    assert stored["computed"] and stored["txt"].shape == (24, 32) and stored["y"].shape == (32,)
    assert np.array_equal(stored["txt"], t5[0]) and np.array_equal(stored["y"], clip[0])
    meta = json.loads((out / "config.json").read_text())["text"]["empty"]
    assert meta["computed"] is True and meta["text_len"] == 24 and meta["txt_shape"] == [24, 32]

    # the default conditioning for sampling comes from these stored embeddings
    from fluxir_jax import sampling

    cond = sampling.empty_conditioning(out, 2, 4, 6, guidance=3.5)
    assert cond.txt.shape == (2, 24, 32) and cond.y.shape == (2, 32) and cond.img_ids.shape == (2, 6, 3)
    assert np.array_equal(np.asarray(cond.txt[1]), t5[0]) and np.array_equal(np.asarray(cond.y[0]), clip[0])
    assert np.asarray(cond.guidance).tolist() == [3.5, 3.5] and cond.txt_ids.shape == (2, 24, 3)
    model = checkpoint.load_flux(out)
    from flax import nnx

    graphdef, state = nnx.split(model)
    z = sampling.sample(sampling.FluxVelocity(graphdef), state, np.array([1, 2]), 4, 6, cond, num_steps=2)
    assert z.shape == (2, 4, 6, 16) and np.isfinite(np.asarray(z)).all()


def test_encode_prompts(encoders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "emb.npz"
    argv = ["encode-prompts", "--t5", str(encoders["root"] / "t5"), "--clip", str(encoders["root"] / "clip"),
            "--prompts", str(prompts), "-o", str(out), "--text-len", "16"]
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    t5, clip = direct(encoders, PROMPTS, 16)
    with np.load(out) as z:
        assert list(z["prompts"]) == PROMPTS
        assert z["txt"].shape == (3, 16, 32) and np.array_equal(z["txt"], t5)
        assert np.array_equal(z["y"], clip)
    rc, _, err = run_cli(argv)  # exists, no --overwrite
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    # the former spelling of --text-len still works (not listed in --help)
    old = ["encode-prompts", "--t5", str(encoders["root"] / "t5"), "--clip", str(encoders["root"] / "clip"),
           "--prompts", str(prompts), "--out", str(tmp_path / "old.npz"), "--t5-len", "16"]
    assert run_cli(old)[0] == 0
    with np.load(tmp_path / "old.npz") as z:
        assert np.array_equal(z["txt"], t5)


def test_zero_embeddings_are_refused_for_sampling(tmp_path):
    from fluxir_jax import sampling
    from fluxir_jax.errors import UserError

    build_pipeline(tmp_path / "pipe")
    out = tmp_path / "ckpt"
    rc, _, err = run_cli(["convert", str(tmp_path / "pipe" / "transformer"), "-o", str(out), "--no-progress"])
    assert rc == 0, err
    with pytest.raises(UserError, match="not computed.*--t5 DIR --clip DIR"):
        sampling.empty_conditioning(out, 1, 4, 4)
    cond = sampling.empty_conditioning(out, 1, 4, 4, allow_zeros=True)
    assert cond.txt.shape[0] == 1 and not np.asarray(cond.txt).any() and cond.guidance is None


def test_text_errors(encoders, tmp_path):
    build_pipeline(tmp_path / "pipe")
    src = str(tmp_path / "pipe" / "transformer")
    t5, clip = str(encoders["root"] / "t5"), str(encoders["root"] / "clip")
    cases = [
        (["--t5", t5], "go together"),
        (["--t5", clip, "--clip", clip], "cannot load a T5EncoderModel"),
        (["--t5", t5, "--clip", str(tmp_path / "nowhere")], "not a directory"),
    ]
    for extra, expect in cases:
        rc, _, err = run_cli(["convert", src, "-o", str(tmp_path / "out"), "--no-progress", *extra])
        assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
