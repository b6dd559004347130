"""What a run reports: metrics.jsonl, a console line, a progress bar, TensorBoard scalars.

Only rank 0 writes. Training rows carry ``step``, ``loss``, ``lr``, ``samples_per_s``
and more; evaluation rows carry ``eval_``-prefixed keys and never a bare ``loss``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after ``last_step``: a resumed run rewrites the steps its checkpoint did not keep."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if row.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: bool,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._bar = None
        self._writer = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        if progress:
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "log.tensorboard=true but tensorboard is not installed "
                    "(pip install hydrahead[tensorboard]); skipping it",
                    file=sys.stderr,
                )
            else:
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, row["step"])

    def log_train(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values, "time": time.time()}
        self._write(row)
        line = (
            f"step {step} | loss {values['loss']:.4f} | lr {values['lr']:.4g} | "
            f"{values['samples_per_s']:,.0f} samples/s | head {values['head_ms']:.1f} ms | "
            f"peak {values['peak_mem_mib']:,.0f} MiB"
        )
        self.message(line)

    def log_eval(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        assert all(key.startswith("eval_") for key in values), "evaluation metrics must be eval_-prefixed"
        self._write({"step": step, **values, "time": time.time()})
        self.message(f"eval @ step {step} | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
