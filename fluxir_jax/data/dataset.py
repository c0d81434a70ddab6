"""The on-disk paired LQ/HQ dataset: ArrayRecord shards + `dataset_info.json`.

Layout of a finished dataset directory::

    DIR/
      dataset_info.json                   counts, image sizes, byte sizes, config, code version
      shards/pairs-00000.array_record     ArrayRecord file (group_size:1), one record per example
      shards/pairs-00000.array_record.json  sidecar: ids and image sizes of that shard
      tfds/NAME/1.0.0/...                 the same examples as a TFDS dataset (ArrayRecord, no
                                          TensorFlow): see `fluxir_jax.data.tfds_source`
      ...                                 (the producer may add files, e.g. degrade_summary.json)

Record encoding (`FXPR`, version 1), one ArrayRecord record per example::

    offset 0   4 bytes   magic b"FXPR"
    offset 4   1 byte    format version (1)
    offset 5   4 bytes   header length N, unsigned little-endian
    offset 9   N bytes   header, UTF-8 JSON object:
                           id       str     unique example id
                           seed     int|null  the source seed (FluxGen sample seed / per-image seed)
                           hq_len   int     length of the HQ PNG bytes
                           lq_len   int|null  length of the LQ PNG bytes; null when the LQ is
                                            made on the fly at training time
                           hq_hw    [h, w]  HQ size, lq_hw [h, w] or null
                           iqa      object  IQA scores ({} when none)
                           params   object  degradation parameters ({} when none)
                           meta     object  anything else (source path, conversions...)
    offset 9+N          hq_len bytes  HQ PNG (RGB, 8 bit)
    then                lq_len bytes  LQ PNG (RGB, 8 bit), absent when lq_len is null

No TensorFlow is involved: shards are written and read with `array_record` directly. The TFDS
view (`tfds.builder_from_directory("DIR/tfds/NAME/1.0.0")`, `tfds.data_source("NAME",
split="train", data_dir="DIR/tfds")`) is written shard by shard with ours and finished on
`close()`; `dataset_info.json` names it under "tfds".

Writing is resumable and appears atomically: `DatasetWriter(out)` works in the sibling directory
`out.partial/`, writes each shard to a temporary name and renames it (with its sidecar) once it
is complete, and `close()` renames `out.partial/` to `out/`. Re-opening a writer on the same
`out` after an interruption resumes in `out.partial/`: finished shards are kept, half-written
temporary files are deleted, and `add()` skips ids that are already stored, so re-feeding the
same inputs neither duplicates nor loses an example.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import struct
import subprocess
import threading
from typing import Any, Iterator, Mapping

from fluxir_jax import fileio
from fluxir_jax.data.tfds_source import PAIRS_NAME, VIEW_DIR
from fluxir_jax.errors import UserError

MAGIC = b"FXPR"
FORMAT_VERSION = 1
INFO_NAME = "dataset_info.json"
SHARD_DIR = "shards"
SHARD_PREFIX = "pairs-"
SHARD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
_HEAD = struct.Struct("<4sBI")


RECORD_ENCODING = ("one ArrayRecord record per example: 4 bytes magic 'FXPR', 1 byte format version, "
                   "uint32 little-endian header length N, N bytes UTF-8 JSON header (fields in 'record_header'), "
                   "then hq_len bytes of HQ PNG and lq_len bytes of LQ PNG (none when lq_len is null)")
RECORD_HEADER_FIELDS = {
    "id": "unique example id (for `fluxir degrade`: the source image's path relative to --input)",
    "seed": "the seed the example came from (FluxGen sample seed, or the per-image degradation seed), or null",
    "hq_len": "length in bytes of the HQ PNG that follows the header",
    "lq_len": "length in bytes of the LQ PNG after it; null when the LQ is made at training time",
    "hq_hw": "[height, width] of the HQ image in pixels",
    "lq_hw": "[height, width] of the LQ image in pixels, or null",
    "iqa": "no-reference quality scores by metric name ({} when none were computed)",
    "params": "every sampled degradation choice by stage (blur1/2 kernels, resize1/2, noise1/2, jpeg1/2, "
              "final_order, final_resize, final_sinc, scale, gt_hw); {} when none",
    "meta": "anything else about the example (source path and size, conversion notes)",
}
INFO_FIELDS = {
    "format": "always 'fluxir-pairs'",
    "format_version": "version of this layout and of the record encoding",
    "record_encoding": "how one example is stored in a shard",
    "record_header": "the fields of each record's JSON header",
    "fields": "this description of the keys of dataset_info.json",
    "code_version": "fluxir-jax version (+ git commit) that wrote the dataset",
    "created": "UTC time (ISO 8601) the dataset was started",
    "updated": "UTC time (ISO 8601) it was last written",
    "complete": "true once the writer finished; an unfinished dataset lives in <name>.partial and resumes",
    "num_examples": "number of examples (records) over all shards",
    "num_with_lq": "number of examples with a stored LQ image",
    "has_lq": "true when every example has a stored LQ image",
    "sizes": "[min, max] of HQ/LQ heights and widths in pixels, and total_bytes of all shards",
    "shards": "shard files (relative paths) with their example and byte counts; each has a .json sidecar "
              "listing [id, hq_h, hq_w, lq_h, lq_w] per record",
    "config": "the resolved settings that produced the data (e.g. the degradation model), or null",
    "producer": "the command that wrote the dataset",
    "summary_file": "the producer's report in this directory (written, skipped and converted inputs)",
    "tfds": "the TFDS view of the same examples: data_dir (relative), name, version, split; null when not written",
}


@dataclasses.dataclass
class PairExample:
    """One stored example: PNG bytes plus everything needed to explain how it was made."""

    id: str
    hq_png: bytes
    lq_png: bytes | None = None
    seed: int | None = None
    iqa: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) read from a PNG's IHDR chunk, without decoding the image."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    w, h = struct.unpack(">II", data[16:24])
    return int(h), int(w)


def encode_example(ex: PairExample) -> bytes:
    """Serialise a `PairExample` into one `FXPR` v1 record (see the module docstring)."""
    if not isinstance(ex.id, str) or not ex.id:
        raise ValueError("example id must be a non-empty string")
    header = {
        "id": ex.id,
        "seed": None if ex.seed is None else int(ex.seed),
        "hq_len": len(ex.hq_png),
        "lq_len": None if ex.lq_png is None else len(ex.lq_png),
        "hq_hw": list(png_size(ex.hq_png)),
        "lq_hw": None if ex.lq_png is None else list(png_size(ex.lq_png)),
        "iqa": ex.iqa or {},
        "params": ex.params or {},
        "meta": ex.meta or {},
    }
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return b"".join([_HEAD.pack(MAGIC, FORMAT_VERSION, len(hb)), hb, ex.hq_png, ex.lq_png or b""])


def decode_header(record: bytes) -> tuple[dict, int]:
    """The header dict of a record and the offset where the HQ bytes start."""
    if len(record) < _HEAD.size:
        raise ValueError("record too short")
    magic, version, n = _HEAD.unpack_from(record, 0)
    if magic != MAGIC:
        raise ValueError(f"bad record magic {magic!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"record format version {version} is not supported (this code reads {FORMAT_VERSION})")
    start = _HEAD.size
    return json.loads(record[start : start + n].decode("utf-8")), start + n


def decode_example(record: bytes) -> PairExample:
    """Inverse of `encode_example`."""
    h, off = decode_header(record)
    hq = bytes(record[off : off + h["hq_len"]])
    off += h["hq_len"]
    lq = None if h["lq_len"] is None else bytes(record[off : off + h["lq_len"]])
    return PairExample(id=h["id"], hq_png=hq, lq_png=lq, seed=h["seed"], iqa=h["iqa"], params=h["params"], meta=h["meta"])


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    from fluxir_jax import __version__

    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain(x: Any) -> Any:
    """JSON round trip, so configs compare equal however they were built (tuples vs lists)."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def _read_shard_rows(path: pathlib.Path) -> list[list]:
    """[id, hq_h, hq_w, lq_h, lq_w] rows for every record of a shard (used when a sidecar is lost)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
    try:
        rows = []
        n = reader.num_records()
        for i in range(n):
            h, _ = decode_header(reader.read([i])[0])
            lq = h["lq_hw"] or [None, None]
            rows.append([h["id"], *h["hq_hw"], *lq])
        return rows
    finally:
        reader.close()


class DatasetWriter:
    """Appends `PairExample`s shard by shard; resumable; the dataset appears at `out` on `close()`.

        with DatasetWriter(out, config=cfg_dict, shard_size=128) as w:
            for ex in examples:
                w.add(ex)          # False when the id is already stored (resume)
            # on leaving the block normally: close() -> `out/` appears

    `config` is stored in `dataset_info.json`; resuming with a different config is a `UserError`.
    `tfds_name` names the TFDS view written beside the shards (None: no view); all examples of
    a dataset with a view must have an LQ image, or none.
    Leaving the block by an exception flushes the buffered examples as a shard but does not
    finish the dataset; the next writer on the same `out` resumes. `work_dir` is where extra
    files (a summary) may be written before `close()`.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        config: Mapping[str, Any] | None = None,
        shard_size: int = 128,
        info: Mapping[str, Any] | None = None,
        tfds_name: str | None = PAIRS_NAME,
    ):
        if shard_size < 1:
            raise UserError(f"shard_size must be at least 1, got {shard_size}")
        self.out = pathlib.Path(out).absolute()
        self.work_dir = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.shard_size = int(shard_size)
        self._lock = threading.Lock()
        self._buffer: list[tuple[bytes, list]] = []
        self._shards: list[dict] = []  # {"file", "num_examples", "bytes"}
        self._rows: list[list] = []  # [id, hq_h, hq_w, lq_h, lq_w] over all finished shards
        self._ids: set[str] = set()
        self._closed = False
        self.resumed_examples = 0

        if self.out.exists():
            if (self.out / INFO_NAME).is_file():
                raise UserError(f"{self.out} already holds a finished dataset; choose another output directory or remove it")
            if not self.out.is_dir() or any(self.out.iterdir()):
                raise UserError(f"output path {self.out} exists and is not an empty directory")
        shard_dir = self.work_dir / SHARD_DIR
        info_path = self.work_dir / INFO_NAME
        if self.work_dir.exists():
            old = self._load_info(info_path) if info_path.is_file() else None
            if old is not None and config is not None and old.get("config") is not None and _plain(old["config"]) != _plain(config):
                raise UserError(
                    f"cannot resume {self.work_dir}: it was started with a different config; "
                    f"use the same settings or remove it"
                )
            self._recover(shard_dir)
            self.resumed_examples = len(self._ids)
            self._created = (old or {}).get("created", _now())
            if config is None and old is not None:
                config = old.get("config")
        else:
            self._created = _now()
        shard_dir.mkdir(parents=True, exist_ok=True)
        self._view = None
        if tfds_name:
            from fluxir_jax.data.tfds_source import ViewWriter

            self._view = ViewWriter(self.work_dir, tfds_name, has_lq=(self._rows[0][3] is not None) if self._rows else None)
            self._view.recover(len(self._shards), self._shard_examples)
        self.config = _plain(dict(config)) if config is not None else None
        self.info_extra = dict(info or {})
        self._write_info(complete=False)

    # -- resume -------------------------------------------------------------------------------
    @staticmethod
    def _load_info(path: pathlib.Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _recover(self, shard_dir: pathlib.Path) -> None:
        """Keep finished shards, delete temporaries and orphan sidecars, reload the stored ids."""
        if not shard_dir.is_dir():
            return
        for p in shard_dir.iterdir():
            if fileio.is_temp(p.name):
                p.unlink()
        for side in shard_dir.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}{SIDECAR_SUFFIX}"):
            if not side.with_name(side.name[: -len(SIDECAR_SUFFIX)]).exists():
                side.unlink()  # sidecar renamed, shard not: the shard never finished
        for shard in sorted(shard_dir.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            side = shard.with_name(shard.name + SIDECAR_SUFFIX)
            rows = None
            if side.is_file():
                try:
                    rows = json.loads(side.read_text())["rows"]
                except (OSError, ValueError, KeyError):
                    rows = None
            if rows is None:
                rows = _read_shard_rows(shard)
                fileio.write_text(side, json.dumps({"rows": rows}))
            self._shards.append({"file": f"{SHARD_DIR}/{shard.name}", "num_examples": len(rows), "bytes": shard.stat().st_size})
            self._rows.extend(rows)
            self._ids.update(r[0] for r in rows)

    def _shard_examples(self, index: int) -> list[PairExample]:
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(self.work_dir / self._shards[index]["file"]), "readahead_buffer_size:0")
        try:
            return [decode_example(r) for r in reader.read_all()]
        finally:
            reader.close()

    # -- writing ------------------------------------------------------------------------------
    def __contains__(self, example_id: str) -> bool:
        return example_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_examples(self) -> int:
        """Examples stored or buffered so far (including those found on resume)."""
        return len(self._ids)

    def add(self, ex: PairExample) -> bool:
        """Buffer one example (a shard is written every `shard_size`); False if its id is stored."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        with self._lock:
            if ex.id in self._ids:
                return False
            rec = encode_example(ex)
            h, _ = decode_header(rec)
            lq = h["lq_hw"] or [None, None]
            self._buffer.append((rec, [ex.id, *h["hq_hw"], *lq]))
            self._ids.add(ex.id)
            if len(self._buffer) >= self.shard_size:
                self._flush_locked()
        return True

    def flush(self) -> None:
        """Write the buffered examples as one shard now (no-op when the buffer is empty)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buffer:
            return
        from array_record.python.array_record_module import ArrayRecordWriter

        shard_dir = self.work_dir / SHARD_DIR
        name = _shard_name(len(self._shards))
        final = shard_dir / name
        tmp = fileio.temp_path(final)
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        try:
            for rec, _ in self._buffer:
                writer.write(rec)
        finally:
            writer.close()
        if self._view is not None:  # the view's shard first: a view shard without ours is dropped on resume
            self._view.write_shard(len(self._shards), [decode_example(rec) for rec, _ in self._buffer])
        rows = [row for _, row in self._buffer]
        side = shard_dir / (name + SIDECAR_SUFFIX)
        fileio.write_text(side, json.dumps({"rows": rows}))  # sidecar first, then the shard
        os.replace(tmp, final)
        self._shards.append({"file": f"{SHARD_DIR}/{name}", "num_examples": len(rows), "bytes": final.stat().st_size})
        self._rows.extend(rows)
        self._buffer = []
        self._write_info(complete=False)

    def _write_info(self, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        rows = self._rows
        lq_rows = [r for r in rows if r[3] is not None]

        def span(vals):
            return [min(vals), max(vals)] if vals else None

        info = {
            "format": "fluxir-pairs",
            "format_version": FORMAT_VERSION,
            "record_encoding": RECORD_ENCODING,
            "record_header": RECORD_HEADER_FIELDS,
            "fields": INFO_FIELDS,
            "code_version": code_version(),
            "created": self._created,
            "updated": _now(),
            "complete": complete,
            "num_examples": len(rows),
            "num_with_lq": len(lq_rows),
            "has_lq": bool(rows) and len(lq_rows) == len(rows),
            "sizes": {
                "hq_height": span([r[1] for r in rows]),
                "hq_width": span([r[2] for r in rows]),
                "lq_height": span([r[3] for r in lq_rows]),
                "lq_width": span([r[4] for r in lq_rows]),
                "total_bytes": sum(s["bytes"] for s in self._shards),
            },
            "shards": list(self._shards),
            "config": self.config,
            "tfds": None if self._view is None else {"data_dir": VIEW_DIR, "name": self._view.name,
                                                     "version": self._view.version, "split": self._view.split},
            **self.info_extra,
            **_plain(dict(extra or {})),
        }
        fileio.write_text(self.work_dir / INFO_NAME, json.dumps(info, indent=1))

    def close(self, extra_info: Mapping[str, Any] | None = None) -> pathlib.Path:
        """Flush, mark the dataset complete and rename `out.partial/` to `out/`. Returns `out`."""
        if self._closed:
            return self.out
        with self._lock:
            self._flush_locked()
            if self._view is not None:
                self._view.finish([s["num_examples"] for s in self._shards],
                                  f"{self._view.name}: {len(self._rows)} examples written by fluxir-jax "
                                  f"{code_version()} (same examples and order as the dataset in ../../..)")
            self._write_info(complete=True, extra=extra_info)
            if self.out.is_dir():
                self.out.rmdir()  # an empty directory given as the output
            os.replace(self.work_dir, self.out)
            self._closed = True
        return self.out

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            try:
                self.flush()  # keep the finished examples for the resume
            except Exception:  # noqa: BLE001 - the original exception matters more
                pass


class PairedSource:
    """Random-access reader of a paired dataset (Grain `RandomAccessDataSource` protocol).

    `source[i]` is a dict: `index` (int, position in this source), `id`, `seed`, `hq_png`
    (bytes), `lq_png` (bytes or None), `iqa`, `params`, `meta`. Decoding happens in the Grain
    pipeline. Picklable (readers open lazily), so it can go to Grain worker processes.
    """

    def __init__(self, path: str | os.PathLike):
        p = pathlib.Path(path).absolute()
        info_path = p / INFO_NAME
        if not info_path.is_file():
            raise UserError(f"{p} is not a fluxir paired dataset (no {INFO_NAME})")
        try:
            self.info = json.loads(info_path.read_text())
        except ValueError:
            raise UserError(f"{info_path} is not valid JSON") from None
        if self.info.get("format") != "fluxir-pairs":
            raise UserError(f"{info_path} does not describe a fluxir paired dataset")
        if self.info.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{p}: dataset format version {self.info.get('format_version')} is not supported (this code reads {FORMAT_VERSION})")
        self.path = p
        self._files = [str(p / s["file"]) for s in self.info["shards"]]
        for f in self._files:
            if not os.path.isfile(f):
                raise UserError(f"{p}: shard {f} listed in {INFO_NAME} is missing")
        self._counts = [int(s["num_examples"]) for s in self.info["shards"]]
        self._len = sum(self._counts)
        self._source = None

    def _src(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            if not self._files:
                raise IndexError("empty dataset")
            self._source = ArrayRecordDataSource(self._files)
            if len(self._source) != self._len:
                raise UserError(f"{self.path}: shards hold {len(self._source)} records but {INFO_NAME} says {self._len}")
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len}")
        ex = decode_example(self._src()[i])
        return {
            "index": i, "id": ex.id, "seed": ex.seed, "hq_png": ex.hq_png, "lq_png": ex.lq_png,
            "iqa": ex.iqa, "params": ex.params, "meta": ex.meta,
        }

    def __iter__(self) -> Iterator[dict]:
        for i in range(self._len):
            yield self[i]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"PairedSource({str(self.path)!r}, num_examples={self._len})"
