"""Profile the trainer's step: where the time of a few steps goes, by operator.

    torchrun --nproc-per-node 2 benchmarks/profile_step.py --config configs/resnet50_1m.yaml comm.overlap=true

Builds the trainer from the config and overrides, runs ``--warmup`` steps, then profiles
``--steps`` steps with torch.profiler (CPU and CUDA activity). Rank 0 prints the operators
with the most device time and the most host time, and the wall time per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hydrahead.config import load_config  # noqa: E402
from hydrahead.data.build import batches  # noqa: E402
from benchmarks.train_throughput import join_group  # noqa: E402
from hydrahead.distributed.setup import destroy_distributed  # noqa: E402
from hydrahead.train.trainer import Trainer  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    env, shared = join_group(args.config, args.overrides, args.per_gpu_batch)
    try:
        cfg = load_config(args.config, shared)
        global_batch = cfg.train.global_batch
        trainer = Trainer(cfg, env)
        trainer._set_learning_rates()
        data = batches(trainer.train_data, start_step=0, global_batch=global_batch, rank=env.rank, world_size=env.world_size, device=env.device)
        for _ in range(args.warmup):
            trainer.train_step(*next(data), timed=False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                trainer.train_step(*next(data), timed=False)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        if env.is_main:
            table = prof.key_averages()
            if env.device.type == "cuda":
                print(table.table(sort_by="cuda_time_total", row_limit=args.rows))
            print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            print(f"{wall_ms:.1f} ms per step (profiled)")
        data.close()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
