r"""Training-step throughput of one configuration, launched under torchrun.

    torchrun --nproc-per-node 4 benchmarks/train_throughput.py --config configs/resnet50_1m.yaml \
        --mode full --per-gpu-batch 256 --steps 20 --out rows.jsonl

``--mode full`` times the trainer's real step (backbone, feature gather, sharded head
loss, reduce-scatter, DDP all-reduce, both optimizers); ``--mode backbone`` times the same
backbone, DDP and optimizer with a stand-in loss on the embeddings and no head (a token
head of 8 classes per rank is built and never used), for the "backbone alone" figure
beside it. Each ``--variant`` (config overrides) is measured in
turn in the same process; after its timed steps a few more run with the communication
clock on (time and bytes per collective, the hidden share). Rank 0 appends one JSON row
per variant to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import SOCKET_ENV  # noqa: E402
from hydrahead.config import load_config  # noqa: E402
from hydrahead.data.build import batches  # noqa: E402
from hydrahead.distributed.setup import destroy_distributed, init_distributed  # noqa: E402
from hydrahead.train.trainer import Trainer  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def backbone_only_step(trainer: Trainer, inputs: torch.Tensor) -> None:
    trainer.backbone.train()
    with trainer._autocast():
        features = trainer.forward_backbone(inputs.contiguous(memory_format=trainer.memory_format))
    features.float().square().mean().backward()
    trainer.backbone_optim.step()
    trainer.backbone_optim.zero_grad(set_to_none=True)


def transport(backend: str) -> str:
    """How the ranks exchange data: gloo on CPU; NCCL's socket transport when P2P, SHM and IB are off."""
    if backend == "gloo":
        return "gloo"
    off = all(os.environ.get(key) == "1" for key in SOCKET_ENV)
    return "socket" if off else "nvlink"


def join_group(config: str, overrides: list[str], per_gpu_batch: int):
    """Join the process group; return it and the overrides every measured config shares
    (the global batch for this world size, no evaluation, no progress bar)."""
    probe = load_config(config, overrides)
    env = init_distributed(probe.dist.backend, probe.dist.timeout_s)
    global_batch = per_gpu_batch * env.world_size
    return env, [*overrides, f"train.global_batch={global_batch}", "train.eval_every=0", "log.progress=false"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=value`` (or a bare name: no overrides)."""
    name, _, rest = text.partition("=")
    return name, [item for item in rest.split(",") if item]


def measure(cfg, env, args, mode: str, variant: str) -> dict:
    """Time one configuration: ``--steps`` steps untimed, then ``--timed-steps`` with the comm clock on."""
    trainer = Trainer(cfg, env)
    trainer._set_learning_rates()  # the schedule's first step: throughput does not depend on it
    global_batch = cfg.train.global_batch
    data = batches(
        trainer.train_data,
        start_step=0,
        global_batch=global_batch,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
    )

    def step(timed=False):
        inputs, labels = next(data)
        if mode == "full":
            return trainer.train_step(inputs, labels, timed=timed, prefetch=data.prefetch)
        backbone_only_step(trainer, inputs)
        return {}

    for _ in range(args.warmup):
        step()
    synchronize(env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(env.device)
    elapsed = time.perf_counter() - start
    peak = torch.tensor([peak_memory_mib(env.device)], device=env.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the busiest rank
    comm = [step(timed=True) for _ in range(args.timed_steps)] if mode == "full" else []
    keys = sorted({k for r in comm for k in r if k.startswith(("ms_", "bytes_")) or k in ("comm_hidden", "head_ms")})
    # Rank 0's view; the medians over the timed steps.
    figures = {k: statistics.median(r[k] for r in comm if k in r) for k in keys}
    c = cfg.comm
    active = trainer.selector.last.get("active_classes") if mode == "full" and cfg.head.selection != "full" else None
    row = {
        "config": args.config,
        "variant": variant,
        "mode": mode,
        "world_size": env.world_size,
        "transport": transport(env.backend) if env.world_size > 1 else "none",
        "per_gpu_batch": args.per_gpu_batch,
        "global_batch": global_batch,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "num_classes": cfg.head.num_classes if mode == "full" else 0,
        "embed_dim": cfg.model.embed_dim,
        "head_selection": cfg.head.selection,
        "active_classes": active,
        "head_impl": cfg.head_impl,
        "head_weight_dtype": str(cfg.head_weight_dtype).removeprefix("torch."),
        "overlap": c.overlap,
        "micro_batches": c.micro_batches if c.overlap else 1,
        "grad_compression": c.grad_compression,
        "topk_density": c.topk_density if c.grad_compression == "topk" else None,
        "ms": elapsed / args.steps * 1e3,
        "samples_per_s": global_batch * args.steps / elapsed,
        "peak_mib": float(peak),
        "steps": args.steps,
        **figures,
    }
    data.close()
    trainer.selector.close()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--mode", choices=("full", "backbone"), default="full")
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps after those with the communication clock on")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=key=value,key=value: one more configuration measured in this process (repeatable)",
    )
    parser.add_argument("--out", required=True, help="JSON-lines file rank 0 appends its row to")
    parser.add_argument(
        "--repeat", type=int, default=0, help="which repeat of the same measurement this is (recorded in the row)"
    )
    parser.add_argument(
        "--scaling",
        choices=("weak", "strong"),
        default="weak",
        help="the study this run belongs to (recorded in the row): per-GPU batch fixed, or the global batch",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    env, base = join_group(args.config, args.overrides, args.per_gpu_batch)
    try:
        for variant, overrides in map(parse_variant, args.variant or ["default"]):
            if args.mode == "backbone":  # no head is trained: keep a token one out of the memory figure
                overrides = [
                    *overrides,
                    f"head.num_classes={8 * env.world_size}",
                    "head.selection=full",
                    "head.knn_fixed_size=false",
                ]
                warnings.filterwarnings("ignore", message="head.index_")  # the token head takes no index
            cfg = load_config(args.config, [*base, *overrides])
            row = {**measure(cfg, env, args, args.mode, variant), "repeat": args.repeat, "scaling": args.scaling}
            gc.collect()  # the variant's trainer goes before the next one is built
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            if env.is_main:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
