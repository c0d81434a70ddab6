"""TFDS (tensorflow-datasets, ArrayRecord format, no TensorFlow) on both sides of our datasets.

Writing: every dataset `DatasetWriter` makes (the `pool/` and `pairs/` of `fluxir gen`, the output
of `fluxir degrade`) also carries a TFDS view of the same examples, written shard by shard next to
our own shards and finished with the TFDS metadata on `close()`::

    DIR/tfds/NAME/1.0.0/dataset_info.json, features.json       TFDS metadata
    DIR/tfds/NAME/1.0.0/NAME-train.array_record-00000 ...       one file per shard of DIR/shards/

    tfds.builder_from_directory("DIR/tfds/NAME/1.0.0").as_data_source("train")
    tfds.data_source("NAME", split="train", data_dir="DIR/tfds")

NAME is `fluxir_pairs` (pairs, `fluxir degrade`) or `fluxir_pool` (the FluxGen pool). The
examples, in the same order as `PairedSource`: `id` (text), `seed` (int64, -1 when none), `hq`
(PNG image, byte-identical to `hq_png`), `lq` (PNG image; only when the dataset stores LQ
images), `iqa`, `params`, `meta` (JSON text). Pass `decoders={"hq": tfds.decode.SkipDecoding()}`
to get the PNG bytes instead of decoded arrays.

Why a view beside the `FXPR` shards rather than TFDS as the only format: a TFDS dataset fixes
its features up front (our records may or may not hold an LQ), its `dataset_info.json` is a
different schema under the same name as ours, and our format is what the resumable writer,
header-only reads (`fluxgen_select.read_headers`) and every existing dataset rely on. The view
costs a second copy of the image bytes.

Reading: `TfdsSource(name, split, data_dir)` (or `fluxir_jax.data.sources.open_source`) gives a random-access source of `PairedSource` records
(`index`, `id`, `seed`, `hq_png`, `lq_png`, `iqa`, `params`, `meta`; the image entries hold the
encoded bytes, PNG or JPEG) for either a dataset directory or `tfds:NAME:SPLIT` - any TFDS
dataset prepared in ArrayRecord format under `data_dir` (e.g. `tfds:div2k/bicubic_x4:train`).
Its HQ image is the feature `hq`, `hr` or `image` (or its only image feature), its LQ `lq` or
`lr` when present. SPLIT may be a TFDS slice (`train[:100]`).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Iterator

from fluxir_jax import fileio
from fluxir_jax.errors import UserError

TFDS_PREFIX = "tfds:"
VIEW_DIR = "tfds"
VIEW_VERSION = "1.0.0"
VIEW_SPLIT = "train"
PAIRS_NAME, POOL_NAME = "fluxir_pairs", "fluxir_pool"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
HQ_KEYS, LQ_KEYS = ("hq", "hr", "image"), ("lq", "lr")


# ----------------------------------------------------------------------------- writing the view


def view_features(has_lq: bool):
    import numpy as np
    import tensorflow_datasets as tfds

    f = tfds.features
    image = lambda: f.Image(shape=(None, None, 3), encoding_format="png")  # noqa: E731
    feats = {"id": f.Text(), "seed": f.Scalar(np.int64), "hq": image(), "iqa": f.Text(), "params": f.Text(),
             "meta": f.Text()}
    if has_lq:
        feats["lq"] = image()
    return f.FeaturesDict(feats)


def _view_record(ex) -> dict:
    rec = {"id": ex.id, "seed": -1 if ex.seed is None else int(ex.seed), "hq": ex.hq_png,
           "iqa": json.dumps(ex.iqa or {}, sort_keys=True), "params": json.dumps(ex.params or {}, sort_keys=True),
           "meta": json.dumps(ex.meta or {}, sort_keys=True)}
    if ex.lq_png is not None:
        rec["lq"] = ex.lq_png
    return rec


class ViewWriter:
    """The TFDS view of one dataset under construction (`root` = its work directory)."""

    def __init__(self, root: pathlib.Path, name: str, has_lq: bool | None = None):
        self.name, self.version, self.split = name, VIEW_VERSION, VIEW_SPLIT
        self.dir = root / VIEW_DIR / name / VIEW_VERSION
        self.has_lq = has_lq
        self._features = None

    def shard_path(self, index: int) -> pathlib.Path:
        return self.dir / f"{self.name}-{VIEW_SPLIT}.array_record-{index:05d}"

    def features(self):
        if self._features is None:
            self._features = view_features(bool(self.has_lq))
        return self._features

    def write_shard(self, index: int, examples: Iterable) -> None:
        """Write view shard `index` (temp file + rename); every example must agree on having an LQ."""
        from array_record.python.array_record_module import ArrayRecordWriter

        examples = list(examples)
        if self.has_lq is None and examples:
            self.has_lq = examples[0].lq_png is not None
        if any((ex.lq_png is not None) != self.has_lq for ex in examples):
            raise ValueError("every example of a dataset must have an LQ image, or none (the TFDS view has fixed features)")
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.shard_path(index)
        tmp = fileio.temp_path(final)
        feats = self.features()
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        try:
            for ex in examples:
                writer.write(feats.serialize_example(_view_record(ex)))
        finally:
            writer.close()
        os.replace(tmp, final)

    def recover(self, num_shards: int, read_shard) -> None:
        """After a resume with `num_shards` finished shards: drop temporaries and view shards of
        unfinished shards, rewrite missing ones from `read_shard(index)` (the examples of a shard)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if fileio.is_temp(p.name):
                    p.unlink()
                elif p.name.startswith(f"{self.name}-{VIEW_SPLIT}.") and int(p.name.rsplit("-", 1)[1]) >= num_shards:
                    p.unlink()
        for k in range(num_shards):
            if not self.shard_path(k).is_file():
                self.write_shard(k, read_shard(k))

    def finish(self, shard_lengths: list[int], description: str) -> None:
        """Write `dataset_info.json` and `features.json`: from here TFDS reads the view."""
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import naming
        from tensorflow_datasets.core import splits as splits_lib

        self.dir.mkdir(parents=True, exist_ok=True)
        template = naming.ShardedFileTemplate(data_dir=self.dir, template=FILE_TEMPLATE, dataset_name=self.name,
                                              split=VIEW_SPLIT, filetype_suffix="array_record")
        ident = tfds.core.DatasetIdentity(name=self.name, version=tfds.core.Version(VIEW_VERSION), data_dir=str(self.dir),
                                          module_name=__name__)
        info = tfds.core.DatasetInfo(builder=ident, features=self.features(), description=description)
        info.set_file_format("array_record")
        num_bytes = sum(self.shard_path(k).stat().st_size for k in range(len(shard_lengths)))
        info.set_splits(splits_lib.SplitDict([splits_lib.SplitInfo(
            name=VIEW_SPLIT, shard_lengths=list(shard_lengths), num_bytes=num_bytes, filename_template=template)]))
        info.write_to_directory(str(self.dir))


# ----------------------------------------------------------------------------- reading any TFDS dataset


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME:SPLIT` (or `tfds:NAME:SPLIT`) -> (NAME, SPLIT); NAME may hold a config and a version."""
    s = spec.removeprefix(TFDS_PREFIX)
    head, bracket, slicing = s.partition("[")  # a slice such as train[:10%] may hold colons
    name, sep, split = head.rpartition(":")
    split += bracket + slicing
    if not sep or not name or not split:
        raise UserError(f"TFDS dataset {spec!r} is not of the form NAME:SPLIT (e.g. div2k/bicubic_x4:train)")
    return name, split


def _open_builder(name: str, data_dir: str | None):
    from tensorflow_datasets.core import read_only_builder, registered

    where = data_dir or "the default TFDS data_dir"
    if data_dir and not pathlib.Path(data_dir).is_dir():
        raise UserError(f"TFDS data_dir not found: {data_dir}")
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir or None)
    except (registered.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"TFDS dataset {name} not found in {where} ({first})") from None
    fmt = builder.info.file_format
    if fmt is None or getattr(fmt, "value", fmt) != "array_record":
        raise UserError(f"TFDS dataset {name} in {where} is stored as {getattr(fmt, 'value', fmt)}; only ArrayRecord "
                        f"datasets are read (no TensorFlow): prepare it with file_format='array_record'")
    return builder


class TfdsSource:
    """Random access to a TFDS ArrayRecord dataset as `PairedSource` records (see the module docstring).

    Picklable (the data source opens lazily), for Grain and `fluxir degrade` worker processes.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        builder = _open_builder(name, self.data_dir)
        base_split = split.split("[", 1)[0]
        if base_split not in builder.info.splits:
            raise UserError(f"TFDS dataset {name} has no split {base_split!r} (it has: {', '.join(sorted(builder.info.splits))})")
        images = [k for k, v in builder.info.features.items() if type(v).__name__ == "Image"]
        self.hq_key = next((k for k in HQ_KEYS if k in images), images[0] if len(images) == 1 else None)
        if self.hq_key is None:
            raise UserError(f"TFDS dataset {name}: no HQ image feature ({'/'.join(HQ_KEYS)}, or a single image feature); "
                            f"it has {', '.join(builder.info.features.keys())}")
        self.lq_key = next((k for k in LQ_KEYS if k in images and k != self.hq_key), None)
        self.is_view = self.hq_key == "hq" and {"id", "seed", "iqa", "params", "meta"} <= set(builder.info.features.keys())
        self._builder = builder
        self._source = None
        self._len = len(self._src())
        self.info = {"has_lq": self.lq_key is not None, "num_examples": self._len,
                     "tfds": {"name": name, "split": split, "data_dir": self.data_dir}}

    def _src(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            if self._builder is None:
                self._builder = _open_builder(self.name, self.data_dir)
            skip = {k: tfds.decode.SkipDecoding() for k in (self.hq_key, self.lq_key) if k}
            self._source = self._builder.as_data_source(split=self.split, decoders=skip)
        return self._source

    def __len__(self) -> int:
        return self._len

    def example_id(self, index: int) -> str:
        """The id of a record of a TFDS dataset that is not our view: `SPLIT/INDEX` (8 digits)."""
        return f"{self.split}/{index:08d}"

    def __getitem__(self, index) -> dict:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len}")
        rec = self._src()[i]
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        out = {"index": i, "hq_png": bytes(rec[self.hq_key]), "lq_png": bytes(rec[self.lq_key]) if self.lq_key else None}
        if self.is_view:
            seed = int(rec["seed"])
            out.update(id=text(rec["id"]), seed=None if seed < 0 else seed, iqa=json.loads(text(rec["iqa"])),
                       params=json.loads(text(rec["params"])), meta=json.loads(text(rec["meta"])))
        else:
            out.update(id=self.example_id(i), seed=None, iqa={}, params={},
                       meta={"source": f"{TFDS_PREFIX}{self.name}:{self.split}", "tfds_index": i})
        return out

    def __iter__(self) -> Iterator[dict]:
        for i in range(self._len):
            yield self[i]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = state["_builder"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r}, num_examples={self._len})"


_CACHE: dict[tuple, TfdsSource] = {}


def cached_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
    """One `TfdsSource` per (name, split, data_dir) in this process (worker processes reuse it)."""
    key = (name, split, data_dir)
    if key not in _CACHE:
        _CACHE[key] = TfdsSource(name, split, data_dir)
    return _CACHE[key]
