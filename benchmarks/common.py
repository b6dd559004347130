"""Shared pieces of the benchmarks: timing, the matmul-rate floor, environment, results JSON."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cuda_time_ms(fn, *, warmup: int = 2, reps: int = 10) -> list[float]:
    """Milliseconds of each of ``reps`` calls, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def bf16_matmul_tflops(size: int = 8192, reps: int = 20) -> float:
    """Dense bf16 matmul rate on random data, measured now: the denominator of every floor."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = median(cuda_time_ms(lambda: a @ b, warmup=3, reps=reps))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def fp8_matmul_tflops(size: int = 8192, reps: int = 20) -> float:
    """Dense fp8 (e4m3 x e4m3, fp32 accumulation, bf16 out) matmul rate via torch._scaled_mm."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device="cuda")
    ms = median(cuda_time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), warmup=3, reps=reps))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def write_results(name: str, payload: dict) -> Path:
    """Write results JSON under benchmarks/results/ (or $HYDRAHEAD_RESULTS_DIR)."""
    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt
