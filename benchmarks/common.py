"""Shared pieces of the benchmarks: timing, the matmul-rate floor, environment, results JSON."""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# NCCL over TCP sockets only: the stand-in for a network between nodes.
SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1"}


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


def kernel_times_ms(fn, *, reps: int = 3) -> dict[str, float]:
    """GPU time a call of ``fn`` spends in each kernel, copy and fill, by name (the
    profiler's sums over ``reps`` calls after one untimed, divided by ``reps``), largest
    first. Kernels that overlap on two streams each count in full."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {event.key: event.device_time_total / reps / 1e3 for event in prof.key_averages()}
    return dict(sorted(((k, v) for k, v in times.items() if v > 0), key=lambda kv: -kv[1]))


def kernel_busy_ms(fn, *, reps: int = 3) -> float:
    """GPU time of the kernels, copies and fills one call of ``fn`` runs (``kernel_times_ms``
    summed): against the call's span timed by ``cuda_time_ms``, the rest is the GPU
    waiting, mostly for the host to queue work. Kernels that overlap on two streams count
    twice."""
    return sum(kernel_times_ms(fn, reps=reps).values())


@contextlib.contextmanager
def host_sync_log(package: str = "hydrahead"):
    """Count the host-device synchronisations made inside, by the innermost line of
    ``package`` that asked for them: yields a Counter of "path:line (function)" -> count.

    Uses torch's sync debug mode (CUDA only): every op that waits for the device on the
    host (``.item()``, ``bool(t)``, ``nonzero``, ``unique``, blocking copies) warns.
    """
    found: collections.Counter = collections.Counter()
    marker = os.sep + package + os.sep

    def record(message, category, filename, lineno, file=None, line=None):
        # torch's words for a sync; its notice that the debug mode is a prototype also says
        # "synchronizing" (once per process) and is not one
        if "called a synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if marker in f.filename]
        where = frames[-1] if frames else traceback.extract_stack()[-3]
        short = where.filename[where.filename.rfind(marker) + 1 :] if marker in where.filename else where.filename
        found[f"{short}:{where.lineno} ({where.name})"] += 1

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def copy_bandwidth_gbps(device: torch.device, size: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy of ``size`` bytes (read + write counted)."""
    if device.type != "cuda":
        size = 64 << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = median(cuda_time_ms(lambda: dst.copy_(src), warmup=2, reps=10))
    else:
        ms = median(cpu_time_ms(lambda: dst.copy_(src), warmup=1, reps=3))
    return 2 * size / (ms * 1e-3) / 1e9


def cpu_time_ms(fn, *, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def bf16_matmul_tflops(size: int = 8192, reps: int = 20) -> float:
    """Dense bf16 matmul rate on random data, measured now: the denominator of every floor."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = median(cuda_time_ms(lambda: a @ b, warmup=3, reps=reps))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def matmul_tflops(device: torch.device | str, size: int = 8192) -> float:
    """The rate a floor is stated at on ``device``: bf16 on a GPU, fp32 on a CPU (timed on the host clock)."""
    if torch.device(device).type == "cuda":
        return bf16_matmul_tflops(size)
    import time

    size = min(size, 1024)
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / median(times[1:]) / 1e12


def backbone_forward_flops(cfg) -> float:
    """FLOPs of one sample's forward pass through the config's backbone (torch's FLOP counter, meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hydrahead.models import backbone_from_config

    model = backbone_from_config(cfg).to("meta").eval()
    side = cfg.data.image_size
    shape = (1, cfg.model.input_dim) if model.input_kind == "features" else (1, 3, side, side)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(*shape, device="meta"))
    return float(counter.get_total_flops())


def fp8_matmul_tflops(size: int = 8192, reps: int = 20) -> float:
    """Dense fp8 (e4m3 x e4m3, fp32 accumulation, bf16 out) matmul rate via torch._scaled_mm."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device="cuda")
    ms = median(
        cuda_time_ms(
            lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), warmup=3, reps=reps
        )
    )
    return 2 * size**3 / (ms * 1e-3) / 1e12


def launcher(nproc: int, env: dict, torchrun_args=()) -> tuple[list[str], dict]:
    """(what goes between the interpreter and the script, the environment) to start a
    script as ``nproc`` ranks: torchrun for several, or where ``torchrun_args`` ask it for
    something (restarts); for one, the script alone (it forms a world of one, and
    torchrun's own start costs seconds), with a surrounding launcher's variables dropped
    from ``env`` so that it cannot try to rendezvous."""
    if nproc > 1 or torchrun_args:
        return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *torchrun_args], env
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return [], {key: value for key, value in env.items() if key not in drop}


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
