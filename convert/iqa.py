"""IQA weight converters: one door to the published metric weights.

    metric    published file(s)                                   converter
    LPIPS     lpips v0.1 heads + torchvision AlexNet/VGG16         convert.iqa_classic (read at load)
    DISTS     DISTS_pytorch `weights.pt` + torchvision VGG16       convert.iqa_classic (read at load)
    CLIP-IQA  OpenAI `RN50.pt` / open_clip RN50 state dict         convert.iqa_learned -> .safetensors
    MUSIQ     google-research/musiq Flax `.npz`                    convert.iqa_learned -> .safetensors
    MANIQA    IIGROUP/MANIQA state dict                            convert.iqa_learned -> .safetensors

Files are read with safetensors, numpy, `torch.load(weights_only=True)` or (OpenAI's TorchScript
CLIP only) `torch.jit.load`; nothing arbitrary is unpickled. LPIPS and DISTS are small and mapped
each time `get_metric` loads them; the learned metrics are converted once with

    fluxir convert-iqa {clipiqa,musiq,maniqa} SRC DST.safetensors [--preset P] [--bpe VOCAB]

and `get_metric(name, weights=...)` accepts either the converted or the published file.
Weights for the wrong architecture raise `UserError` naming the first bad key (exit code 2).
"""
from __future__ import annotations

from convert.iqa_classic import (
    dists_params_from_state_dict,
    dists_state_dict_from_params,
    lpips_params_from_state_dict,
    lpips_state_dict_from_params,
    read_state_dict,
)
from convert.iqa_learned import (
    convert_clipiqa,
    convert_maniqa,
    convert_musiq,
    load_clipiqa_weights,
    load_maniqa_weights,
    load_musiq_weights,
    read_converted,
    read_tensors,
)


__all__ = [
    "read_state_dict", "lpips_params_from_state_dict", "lpips_state_dict_from_params",
    "dists_params_from_state_dict", "dists_state_dict_from_params", "read_tensors", "read_converted",
    "convert_clipiqa", "convert_musiq", "convert_maniqa",
    "load_clipiqa_weights", "load_musiq_weights", "load_maniqa_weights", "register",
]


def register(sub) -> None:
    from convert import iqa_learned

    p = sub.add_parser("convert-iqa", help="convert published CLIP-IQA / MUSIQ / MANIQA weights",
                       description=__doc__.split("\n")[0])
    iqa_learned.add_arguments(p)
    p.set_defaults(func=iqa_learned.run)
