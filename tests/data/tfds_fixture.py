"""Helpers for TFDS tests: a tiny TFDS image dataset (ArrayRecord, no TensorFlow) and the view check."""
from __future__ import annotations

import io
import pathlib

import numpy as np


def make_image_dataset(data_dir: pathlib.Path, images: list[np.ndarray], name: str = "tiny_photos") -> None:
    """Prepare a TFDS dataset `name` (split `train`, feature `image` as PNG bytes) under `data_dir`."""
    import tensorflow_datasets as tfds
    from PIL import Image

    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        encoded.append(buf.getvalue())

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, data in enumerate(encoded):
                yield i, {"image": data, "label": f"photo {i}"}

    Builder.name = name
    Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def assert_view_matches(path: pathlib.Path, name: str) -> int:
    """The TFDS view of the dataset at `path` yields the examples of `PairedSource(path)`, in order,
    through `tfds.builder_from_directory` (bytes) and `tfds.data_source` (decoded pixels)."""
    import json

    import tensorflow_datasets as tfds
    from PIL import Image

    from fluxir_jax.data.dataset import PairedSource

    ours = list(PairedSource(path))
    builder = tfds.builder_from_directory(str(path / "tfds" / name / "1.0.0"))
    has_lq = "lq" in builder.info.features
    skip = {k: tfds.decode.SkipDecoding() for k in ("hq", "lq") if k in builder.info.features}
    view = builder.as_data_source(split="train", decoders=skip)
    assert len(view) == len(ours) and builder.info.splits["train"].num_examples == len(ours)
    for r, v in zip(ours, view):
        assert v["id"].decode() == r["id"] and int(v["seed"]) == (-1 if r["seed"] is None else r["seed"])
        assert v["hq"] == r["hq_png"] and (v["lq"] == r["lq_png"] if has_lq else r["lq_png"] is None)
        assert [json.loads(v[k]) for k in ("iqa", "params", "meta")] == [r["iqa"], r["params"], r["meta"]]
    decoded = tfds.data_source(name, split="train", data_dir=str(path / "tfds"))
    for k in (0, len(ours) - 1):
        assert np.array_equal(decoded[k]["hq"], np.asarray(Image.open(io.BytesIO(ours[k]["hq_png"]))))
    return len(ours)
