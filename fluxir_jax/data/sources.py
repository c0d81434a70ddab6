"""The image sources the training pipeline reads: our dataset directories and TFDS datasets."""
from __future__ import annotations

from typing import Any

from fluxir_jax.data.dataset import PairedSource
from fluxir_jax.data.tfds_source import TFDS_PREFIX, TfdsSource, parse_spec


def open_source(spec: str, data_dir: str | None = None) -> Any:
    """A `PairedSource` for a dataset directory, a `TfdsSource` for `tfds:NAME:SPLIT` (a TFDS
    dataset in ArrayRecord format under `data_dir`, "" or None: TFDS's default)."""
    if spec.startswith(TFDS_PREFIX):
        return TfdsSource(*parse_spec(spec), data_dir=data_dir or None)
    return PairedSource(spec)
