"""Profile the trainer's step: where the time of a few steps goes, by operator.

    torchrun --nproc-per-node 2 benchmarks/profile_step.py --config configs/resnet50_1m.yaml comm.overlap=true

Builds the trainer from the config and overrides, runs ``--warmup`` steps, then profiles
``--steps`` steps with torch.profiler (CPU and CUDA activity). Rank 0 prints the operators
with the most device time and the most host time, the step's phases (the trainer's
``hydrahead::`` ranges: host time against the device time of the kernels each launched,
NCCL apart), and the wall time per step.

  --syncs        one more step with torch's sync debug mode: every host-device
                 synchronisation, counted by the hydrahead line that asked for it. Each
                 one drains the GPU's queue, so the device idles while the host catches up.
  --trace PATH   rank 0's Chrome trace of the profiled steps (gzipped if PATH ends in .gz);
                 every rank's when PATH holds "{rank}".

On a GPU it also prints where the device sat idle: per step (from one backbone_forward
range to the next, so --steps N gives N - 1 windows), the union of kernels and copies
against the window, and each idle gap charged to the innermost hydrahead:: range the
host was in when the gap began (the host work the GPU waited for).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import host_sync_log  # noqa: E402
from benchmarks.train_throughput import join_group  # noqa: E402
from hydrahead.config import load_config  # noqa: E402
from hydrahead.data.build import batches  # noqa: E402
from hydrahead.distributed.setup import destroy_distributed  # noqa: E402
from hydrahead.train.trainer import Trainer  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("--syncs", action="store_true", help="count host-device synchronisations in one more step")
    parser.add_argument(
        "--trace",
        metavar="PATH",
        help="write rank 0's Chrome trace here (.json or .json.gz; {rank} in it: every rank's)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    env, shared = join_group(args.config, args.overrides, args.per_gpu_batch)
    try:
        cfg = load_config(args.config, shared)
        global_batch = cfg.train.global_batch
        trainer = Trainer(cfg, env)
        trainer._set_learning_rates()
        data = batches(
            trainer.train_data,
            start_step=0,
            global_batch=global_batch,
            rank=env.rank,
            world_size=env.world_size,
            device=env.device,
        )
        for _ in range(args.warmup):
            trainer.train_step(*next(data), timed=False, prefetch=data.prefetch)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                trainer.train_step(*next(data), timed=False, prefetch=data.prefetch)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        syncs = None
        if args.syncs and env.device.type == "cuda":
            with host_sync_log() as syncs:
                trainer.train_step(*next(data), timed=False, prefetch=data.prefetch)
                torch.cuda.synchronize()
        write_own = args.trace and (env.is_main or "{rank}" in args.trace)
        trace = exported_trace(prof) if write_own or (env.is_main and env.device.type == "cuda") else None
        if write_own:
            write_trace(trace, args.trace.format(rank=env.rank))
        if env.is_main:
            table = prof.key_averages()
            if env.device.type == "cuda":
                print(table.table(sort_by="cuda_time_total", row_limit=args.rows))
            print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            print_phases(prof, args.steps)
            if env.device.type == "cuda":
                print_idle(gpu_idle_by_range(trace["traceEvents"]))
            if syncs is not None:
                print(f"\nhost-device synchronisations in one step: {sum(syncs.values())}")
                for where, count in syncs.most_common():
                    print(f"  {count:3d}  {where}")
            print(f"{wall_ms:.1f} ms per step (profiled)")
        data.close()
    finally:
        destroy_distributed()


def _kernel_us(event, nccl: bool) -> float:
    """Device time of the kernels ``event`` and its descendants launched (NCCL ones or the rest)."""
    own = sum(k.duration for k in getattr(event, "kernels", []) if ("nccl" in k.name.lower()) == nccl)
    return own + sum(_kernel_us(child, nccl) for child in event.cpu_children)


def print_phases(prof, steps: int) -> None:
    """Per step: each ``hydrahead::`` range's host time and the device time of what it launched."""
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.name.startswith("hydrahead::") and event.device_type == DeviceType.CPU:
            host = event.time_range.elapsed_us()
            sums = totals.setdefault(event.name, [0.0, 0.0, 0.0])
            sums[0] += host
            sums[1] += _kernel_us(event, nccl=False)
            sums[2] += _kernel_us(event, nccl=True)
    print(f"\n{'phase (ms per step)':<32}{'host':>9}{'device':>9}{'nccl':>9}")
    for name, (host, device, nccl) in totals.items():
        per_step = [value / steps / 1e3 for value in (host, device, nccl)]
        print(f"{name.removeprefix('hydrahead::'):<32}" + "".join(f"{ms:9.2f}" for ms in per_step))


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # what keeps the GPU busy in a Chrome trace


def exported_trace(prof) -> dict:
    """The profile as a Chrome trace (the profiler's own export, through a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def gpu_idle_by_range(events: list[dict], step_range: str = "hydrahead::backbone_forward") -> dict | None:
    """Per step window (one ``step_range`` start to the next): the device's busy and idle
    ms, and the idle ms charged to the innermost ``hydrahead::`` range the host was in when
    each gap began. None without two windows or any device activity."""
    ranges = [
        e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("hydrahead::")
    ]
    starts = sorted(e["ts"] for e in ranges if e["name"] == step_range)
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    if len(starts) < 2 or not device:
        return None
    busy = idle = 0.0
    by_range: collections.Counter = collections.Counter()
    for first, stop in zip(starts, starts[1:]):
        merged: list[list[float]] = []
        for a, b in (interval for interval in device if first <= interval[0] < stop):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        busy += sum(b - a for a, b in merged)
        for (_, gap_start), (gap_end, _) in zip(merged, merged[1:]):
            idle += gap_end - gap_start
            inside = [e for e in ranges if e["ts"] <= gap_start < e["ts"] + e["dur"]]
            where = (
                max(inside, key=lambda e: e["ts"])["name"].removeprefix("hydrahead::") if inside else "(between ranges)"
            )
            by_range[where] += gap_end - gap_start
    steps = len(starts) - 1
    return {
        "steps": steps,
        "window_ms": (starts[-1] - starts[0]) / steps / 1e3,
        "busy_ms": busy / steps / 1e3,
        "idle_ms": idle / steps / 1e3,
        "idle_by_range": {k: v / steps / 1e3 for k, v in by_range.most_common()},
    }


def print_idle(idle: dict | None) -> None:
    if idle is None:
        print("\nGPU idle: no two step windows with device activity in the profile")
        return
    print(
        f"\nGPU per step ({idle['steps']} window(s)): {idle['window_ms']:.1f} ms, busy {idle['busy_ms']:.1f}, "
        f"idle {idle['idle_ms']:.1f}; idle that began while the host was in:"
    )
    for where, ms in idle["idle_by_range"].items():
        print(f"  {where:<24}{ms:8.2f}")


def write_trace(trace: dict, path: str) -> None:
    """The trace as JSON, gzipped if ``path`` ends in .gz."""
    with gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w") as f:
        json.dump(trace, f)


if __name__ == "__main__":
    main()
