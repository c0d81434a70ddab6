"""Write fluxir checkpoints: parameter trees to Orbax (OCDBT + zarr3) one tensor slice at a time.

The one writer of the checkpoint format `fluxir_jax.checkpoint` reads: `fluxir convert`
(leaves read from PyTorch files) and `fluxir init` (random leaves) both hand it lazy trees,
and `write_checkpoint` adds config.json and text/empty.npz and renames the finished directory
into place. It needs no PyTorch.

Orbax saves a whole pytree per call, which would need every converted tensor in host memory
at once (and a scanned FLUX block parameter alone, e.g. single_blocks/linear1/kernel
[38, 3072, 21504] bf16, is 5 GB). Instead the leaves handed to Orbax are `LazyArray`
placeholders: shape, dtype and a list of pieces (one per layer of a stacked parameter, or the
whole array), each produced on demand by a callback that reads and converts the source
tensors. A custom Orbax `TypeHandler` (`StreamingArrayHandler`, a NumpyHandler subclass)
opens the TensorStore spec Orbax's numpy handler would, and writes the pieces in order as
two worker threads produce them, keeping a bounded number of bytes in flight, so host memory
stays around a few layers whatever the model size.

Everything else is standard Orbax: `CompositeCheckpointHandler` items saved by
`PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)`, so the tree metadata, OCDBT
manifests and the per-item layout are Orbax's own, and standard calls restore it, e.g.
`ocp.StandardCheckpointer().restore(dir / "transformer", abstract_tree)` (with or without
target shardings). Leaves are recorded as `np.ndarray` values. Stacked parameters are stored
with one zarr chunk per layer, and large parameters are also split where the sharding rules
shard them (`fluxir_jax.chunking`: the `embed` dimension into up to 16 chunks for FSDP, the
`mlp` one into up to 8 for tensor parallelism), so restoring a slice, the first N layers, or
an FSDP shard reads only the chunks it needs. Pieces are still produced one layer at a time;
TensorStore splits each layer into its chunks as it writes it. Chunks are plain little-endian bytes:
no compression (weights do not compress) and no one-chunk `sharding_indexed` wrapper, both of
which cost throughput for nothing; TensorStore reads any zarr3 codec chain, so restores are
unaffected. Chunks are written without per-write fsync; `sync_tree` syncs the finished
directory once before it is renamed into place.

Memory: at most `workers` pieces being produced (each with its per-thread read scratch),
plus the writes in flight (`inflight_bytes`, and always the newest one). glibc is asked to
return freed buffers to the OS (a fixed mmap threshold, and `malloc_trim` as writes
complete): without that, buffers freed by other threads stay in the process and the peak
grows several-fold. Measured on the flux1-dev shapes (23.8 GB bf16): 1.0 GiB above the
interpreter's baseline; see bench/convert_memory.py.

Uses two Orbax internals (`ts_utils.build_array_write_spec`, `ocdbt_utils`) that the numpy
handler itself uses; pinned by `constraints.txt` (orbax-checkpoint 0.12.8).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import threading
import time
import uuid
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class Piece:
    """Part of a LazyArray: `index` None (whole array) or a layer index along axis 0."""

    index: int | None
    produce: Callable[[], np.ndarray]


class LazyArray:
    """A leaf whose data is produced piece by piece while it is written."""

    def __init__(self, shape: Sequence[int], dtype, pieces: Sequence[Piece], stacked: bool,
                 axes: Sequence | None = None, chunks: Sequence[int] | None = None):
        from fluxir_jax import chunking

        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.pieces = list(pieces)
        self.stacked = stacked
        self.axes = None if axes is None else tuple(axes)
        if chunks is None:
            chunks = chunking.chunk_shape(self.shape, self.dtype.itemsize, self.axes, stacked)
        self.chunks = tuple(int(c) for c in chunks)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The zarr chunk shape (`fluxir_jax.chunking`: per layer, and split where the rules shard)."""
        return self.chunks

    def __repr__(self) -> str:
        return f"LazyArray({list(self.shape)}, {self.dtype.name}, {len(self.pieces)} pieces)"


class ScratchBuffers:
    """Per-thread reusable read buffers (grown to the largest tensor a thread has read).

    Reading each tensor into a fresh array costs page faults on every page, which on some
    virtual machines is most of a conversion's CPU time (measured here: 1.4 s of system time
    per 0.7 GB read into new arrays, 0.1 s into a reused buffer).
    """

    ROUND = 2**20

    def __init__(self):
        self._local = threading.local()

    def __call__(self, nbytes: int) -> np.ndarray:
        """This thread's uint8 scratch buffer, at least `nbytes` long (valid until its next use)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            self._local.buf = None
            buf = self._local.buf = np.empty(-(-max(nbytes, 1) // self.ROUND) * self.ROUND, np.uint8)
        return buf[:nbytes]


_LOCK = threading.Lock()  # one item streams at a time (Orbax commits items from separate threads)


def _handler_class():
    from orbax.checkpoint import future, type_handlers
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingArrayHandler(type_handlers.NumpyHandler):
        """Serialises LazyArray leaves piece by piece; reads back as plain numpy arrays."""

        def __init__(self, inflight_bytes: int, workers: int, progress: Callable[[int], None] | None):
            super().__init__(deepcopy_host_arrays=False)
            self.inflight_bytes = inflight_bytes
            self.workers = workers
            self._since_trim = 0
            self.trim_bytes = inflight_bytes // 4
            self.progress = progress or (lambda n: None)
            self._contexts: dict = {}

        def _spec(self, value: LazyArray, info, arg) -> dict:
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
            ).json
            if not info.use_zarr3 or "metadata" not in spec:
                raise RuntimeError("StreamingArrayHandler expects zarr3 without dtype casting")
            chunk = list(value.chunk_shape)
            spec["metadata"]["chunk_grid"]["configuration"]["chunk_shape"] = chunk
            # one zarr chunk per key without Orbax's one-inner-chunk `sharding_indexed` wrapper: the
            # wrapper buys nothing here and costs half the write throughput
            spec["metadata"]["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]
            return spec

        def _context(self, parent):
            # no fsync per chunk (concurrent synced OCDBT writes run at a third of the disk's speed);
            # `save` fsyncs every file once before the checkpoint is committed
            if parent not in self._contexts:
                self._contexts[parent] = ts.Context({"file_io_sync": False}, parent=parent)
            return self._contexts[parent]

        async def _finish_write(self, entry) -> int:
            wfut, n = entry
            await wfut
            self.progress(n)
            self._since_trim += n
            if self._since_trim >= self.trim_bytes:
                self._since_trim = 0
                trim_heap()
            return n

        async def _stream(self, values, infos, args):
            """Produce pieces on `workers` threads (in order, `workers` ahead) and write them as they come."""
            jobs = [(value, info, arg, piece) for value, info, arg in zip(values, infos, args) for piece in value.pieces]
            loop = asyncio.get_running_loop()
            stores: dict[int, object] = {}
            with _LOCK, concurrent.futures.ThreadPoolExecutor(self.workers, "fluxir-writer") as pool:
                produced: collections.deque = collections.deque()
                pending: collections.deque = collections.deque()
                inflight = 0
                for job in jobs[: self.workers]:
                    produced.append((job, loop.run_in_executor(pool, job[3].produce)))
                next_job = len(produced)
                try:
                    while produced:
                        (value, info, arg, piece), fut = produced.popleft()
                        arr = await fut
                        if next_job < len(jobs):
                            job = jobs[next_job]
                            produced.append((job, loop.run_in_executor(pool, job[3].produce)))
                            next_job += 1
                        want = value.shape[1:] if piece.index is not None else value.shape
                        if arr.shape != want or arr.dtype != value.dtype:
                            raise RuntimeError(f"{info.name}: piece {piece.index} is {arr.dtype}{list(arr.shape)}, "
                                               f"expected {value.dtype}{list(want)}")
                        if id(value) not in stores:
                            await info.await_path_creation()
                            stores[id(value)] = await ts.open(ts.Spec(self._spec(value, info, arg)), create=True,
                                                              open=True, context=self._context(info.ts_context))
                        store = stores[id(value)]
                        target = store if piece.index is None else store[piece.index]
                        # the piece is never touched again, so TensorStore may keep it instead of copying it
                        pending.append((target.write(arr, can_reference_source_data_indefinitely=True), arr.nbytes))
                        inflight += arr.nbytes
                        del arr
                        while len(pending) > 1 and inflight > self.inflight_bytes:  # the newest keeps going
                            inflight -= await self._finish_write(pending.popleft())
                    while pending:
                        await self._finish_write(pending.popleft())
                finally:
                    for _, fut in produced:
                        fut.cancel()

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(self._stream(values, infos, args),
                                                                 name="streaming_array_handler")]

    return StreamingArrayHandler


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """glibc only: give free heap memory back to the OS (TensorStore's many mid-size buffers
    otherwise leave hundreds of MB of freed-but-kept arena memory: measured 0.5 GB after a
    3.9 GB conversion, 0.03 GB after a trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_freed_buffers_to_os() -> None:
    """glibc only: a fixed 4 MiB mmap threshold, so freed tensor buffers return to the OS at once.

    By default glibc raises its mmap threshold each time a large block is freed, after which
    tensor-sized buffers come from per-thread arenas; with reader, writer and TensorStore
    threads all allocating, freed layers then stay in the process as fragmented arena memory
    (measured: peak RSS 2.7x higher on the 1.2 GB test checkpoint). No-op elsewhere.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD (fixing it also disables the dynamic adjustment)


def sync_tree(root) -> None:
    """fsync every file and directory under `root` (chunks are written without per-write syncs)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(directory, items: Mapping[str, Mapping], *, inflight_bytes: int = 64 * 2**20, workers: int = 2,
         progress: Callable[[int], None] | None = None) -> None:
    """Save `{item: nested dict of LazyArray}` as an Orbax composite checkpoint at `directory`.

    `directory` must be absolute and must not exist; Orbax writes to a temporary sibling and
    renames it into place when every item is committed.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    from fluxir_jax.checkpoint import quiet_orbax

    release_freed_buffers_to_os()
    handler = _handler_class()(inflight_bytes, workers, progress)
    registry = type_handlers.create_type_handler_registry((LazyArray, handler))
    with quiet_orbax():  # "no jax.Array handler" is intended: every leaf is a LazyArray
        handlers = {
            name: ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False,
                                              type_handler_registry=registry)
            for name in items
        }
        checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))
        try:
            checkpointer.save(directory, ocp.args.Composite(**{k: ocp.args.PyTreeSave(v) for k, v in items.items()}))
        finally:
            checkpointer.close()


# ----------------------------------------------------------------------------- whole checkpoints

TEXT_FILE = "text/empty.npz"


class Progress:
    """A tqdm byte counter on stderr (or nothing), called with the bytes written so far."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            file=sys.stderr, smoothing=0.1)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def remove(path: pathlib.Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_checkpoint(out, trees: Mapping[str, Mapping], config: dict, text: Mapping[str, np.ndarray] | None = None,
                     *, progress: bool = True, desc: str = "write") -> tuple[int, float]:
    """Write a whole checkpoint at `out` (absolute; replaced only once the new one is complete).

    `trees`: {item: nested dict of LazyArray}; `config`: the config.json content; `text`: the
    arrays of text/empty.npz (or None). Everything goes to a hidden sibling that is fsynced
    and renamed to `out`; on any failure nothing is left (missing parent directories created
    here are removed again). Callers check whether `out` may be replaced. Returns (bytes of
    parameters written, seconds).
    """
    out = pathlib.Path(out)
    created: list[pathlib.Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = out.parent / f".{out.name}.writing-{uuid.uuid4().hex[:8]}"
    total = sum(leaf.nbytes for tree in trees.values() for leaf in iter_leaves(tree))
    bar = None
    ok = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = Progress(total, progress, desc)
        t0 = time.time()
        save(tmp, trees, progress=bar)
        bar.close()
        if text is not None:
            (tmp / TEXT_FILE).parent.mkdir(parents=True)
            with open(tmp / TEXT_FILE, "wb") as f:
                np.savez(f, **text)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        sync_tree(tmp)
        if out.exists():  # overwrite: swap, then delete the old one
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            remove(old)
        else:
            os.rename(tmp, out)
        ok = True
        return total, time.time() - t0
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            remove(tmp)
            for leftover in out.parent.glob(f"{tmp.name}*"):
                remove(leftover)
            for d in created:
                shutil.rmtree(d, ignore_errors=True)


def iter_leaves(tree):
    """The leaves of a nested dict."""
    if isinstance(tree, Mapping):
        for v in tree.values():
            yield from iter_leaves(v)
    else:
        yield tree
