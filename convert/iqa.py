"""`fluxir convert-iqa`: published IQA metric weights -> one `.safetensors` file the metrics read.

    metric     published file(s)
    lpips      LPIPS v0.1 heads `alex.pth` + torchvision AlexNet `alexnet-owt-7be5be79.pth`
    lpips-vgg  LPIPS v0.1 heads `vgg.pth` + torchvision VGG16 `vgg16-397923af.pth`
    dists      DISTS_pytorch `weights.pt` + torchvision VGG16
    clipiqa    OpenAI `RN50.pt` (TorchScript) or an open_clip RN50 state dict
    musiq      google-research/musiq Flax checkpoint `.npz` (koniq, spaq, ava presets)
    maniqa     IIGROUP/MANIQA state dict (koniq, kadid, pipal presets)

Files are read by `torch_read.read_tensors` (nothing arbitrary is unpickled) and mapped by the
library's key maps (`fluxir_jax.iqa.classic_weights`, `.musiq`, `.maniqa`, `.weights`); CLIP-IQA
also runs the CLIP text tower once (`clipiqa_text`). The output's keys are our NNX state paths
and its metadata holds the metric and its architecture config (`fluxir_jax.iqa.weights`).
Weights for the wrong architecture raise `UserError` naming the first bad key.

    fluxir convert-iqa lpips alex.pth alexnet-owt-7be5be79.pth -o lpips_alex.safetensors
    fluxir convert-iqa clipiqa RN50.pt -o clipiqa_rn50.safetensors [--bpe bpe_simple_vocab_16e6.txt.gz]
    fluxir convert-iqa musiq koniq_ckpt.npz -o musiq_koniq.safetensors [--preset koniq]
"""
from __future__ import annotations

import os
from typing import Sequence

from fluxir_jax.errors import UserError

METRICS = ("lpips", "lpips-vgg", "dists", "clipiqa", "musiq", "maniqa")
PathLike = str | os.PathLike


def convert_iqa(metric: str, sources: Sequence[PathLike], out: PathLike, *, preset: str | None = None,
                bpe_path: PathLike | None = None, overwrite: bool = False) -> None:
    """Convert the published file(s) of `metric` to `out` (written atomically)."""
    from fluxir_jax.iqa import classic_weights, maniqa, musiq
    from fluxir_jax.iqa.weights import flat_params, save_converted

    from .torch_read import read_merged

    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    sources = [str(s) for s in sources]
    many = metric in ("lpips", "lpips-vgg", "dists")
    if not many and len(sources) != 1:
        raise UserError(f"{metric} converts one file, got {len(sources)}")
    if preset is not None and metric not in ("clipiqa", "musiq", "maniqa"):
        raise UserError(f"{metric} has no --preset")
    sd = read_merged(sources)
    source = ", ".join(sources)
    if metric in ("lpips", "lpips-vgg"):
        net = "alex" if metric == "lpips" else "vgg"
        cfg, flat = {"net": net}, flat_params(classic_weights.lpips_params_from_state_dict(sd, net))
    elif metric == "dists":
        cfg, flat = {}, flat_params(classic_weights.dists_params_from_state_dict(sd))
    elif metric == "clipiqa":
        from .clipiqa_text import convert_clipiqa_state_dict

        cfg, flat = convert_clipiqa_state_dict(sd, source, bpe_path, preset)
    elif metric == "musiq":
        cfg, flat = musiq.params_from_published(sd, source, preset or "koniq")
    else:
        cfg, flat = maniqa.params_from_published(sd, source, preset or "koniq")
    save_converted(out, metric, cfg, flat, overwrite=overwrite)


def run(args) -> int:
    convert_iqa(args.metric, args.sources, args.out, preset=args.preset, bpe_path=args.bpe, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert-iqa", help="convert published LPIPS/DISTS/CLIP-IQA/MUSIQ/MANIQA weights",
                       description="Convert a metric's published weight file(s) (PyTorch, TorchScript or Flax "
                                   ".npz) to one .safetensors file that `fluxir eval --weights METRIC=FILE` reads "
                                   "without PyTorch.")
    p.add_argument("metric", choices=METRICS, help="which metric the files belong to")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="published weight file(s); LPIPS and DISTS take the heads/alpha-beta file and the "
                        "torchvision backbone")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--preset", default=None,
                   help="architecture preset (clipiqa: inferred from the file; musiq, maniqa: koniq)")
    p.add_argument("--bpe", default=None,
                   help="CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz (clipiqa; default: open-clip-torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)
