"""Training observability: one record per logged step to stdout, metrics.jsonl and TensorBoard.

Only process 0 writes. TensorBoard events come from tensorboardX (no TensorFlow needed).
MFU = model FLOPs per step (the step's matmul/conv FLOPs traced without remat, so recomputation
is not counted as useful work) / (step time x devices x per-device peak), with the peak from
`PEAK_TFLOPS` by device kind (bf16 dense) or the `peak_tflops` config override.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

# bf16 dense peak TFLOP/s per chip, by substring of jax.Device.device_kind (lower case)
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
    ("h200", 989.0),
    ("h100", 989.0),
    ("a100", 312.0),
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Per-device peak TFLOP/s (None when unknown, e.g. CPU, and not overridden)."""
    if override > 0:
        return float(override)
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return None


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX.writer imports torch when it
    can (only to accept torch tensors): ~3 s of every training run's start-up, for logging floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


TB_FLUSH_SECS = 2


class MetricsLogger:
    """Writes records (dicts with a `step`) to stdout, run_dir/metrics.jsonl and run_dir/events/."""

    def __init__(self, run_dir: pathlib.Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        # flush_secs: tensorboardX's writer thread drains its queue to disk only every flush_secs (default
        # 120 s; `flush()` does not drain it), so a live TensorBoard would lag the run by up to 2 minutes
        self.tb = _summary_writer()(str(run_dir / "events"), flush_secs=TB_FLUSH_SECS)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", file=sys.stderr,
                            dynamic_ncols=True, disable=None)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if echo:
            line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
