"""Training-step throughput of one configuration, launched under torchrun.

    torchrun --nproc-per-node 4 benchmarks/train_throughput.py --config configs/resnet50_1m.yaml \\
        --mode full --per-gpu-batch 256 --steps 20 --out rows.jsonl

``--mode full`` times the trainer's real step (backbone, feature gather, sharded head
loss, reduce-scatter, DDP all-reduce, both optimizers); ``--mode backbone`` times the same
backbone, DDP and optimizer with a stand-in loss on the embeddings and no head, for the
"backbone alone" figure beside it. Rank 0 appends one JSON row to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hydrahead.config import load_config  # noqa: E402
from hydrahead.data.build import batches  # noqa: E402
from hydrahead.distributed.setup import destroy_distributed, init_distributed  # noqa: E402
from hydrahead.train.trainer import Trainer  # noqa: E402


def backbone_only_step(trainer: Trainer, inputs: torch.Tensor) -> None:
    trainer.backbone.train()
    with trainer._autocast():
        features = trainer.forward_backbone(inputs.contiguous(memory_format=trainer.memory_format))
    features.float().square().mean().backward()
    trainer.backbone_optim.step()
    trainer.backbone_optim.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--mode", choices=("full", "backbone"), default="full")
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--out", required=True, help="JSON-lines file rank 0 appends its row to")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    probe = load_config(args.config, args.overrides)
    env = init_distributed(probe.dist.backend, probe.dist.timeout_s)
    try:
        global_batch = args.per_gpu_batch * env.world_size
        cfg = load_config(args.config, [*args.overrides, f"train.global_batch={global_batch}", "train.eval_every=0", "log.progress=false"])
        trainer = Trainer(cfg, env)
        trainer._set_learning_rates()  # the schedule's first step: throughput does not depend on it
        data = batches(trainer.train_data, start_step=0, global_batch=global_batch, rank=env.rank, world_size=env.world_size, device=env.device)

        def step():
            inputs, labels = next(data)
            if args.mode == "full":
                trainer.train_step(inputs, labels, timed=False)
            else:
                backbone_only_step(trainer, inputs)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20], device=env.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if env.is_main:
            row = {
                "mode": args.mode, "world_size": env.world_size, "per_gpu_batch": args.per_gpu_batch,
                "global_batch": global_batch, "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
                "num_classes": cfg.head.num_classes if args.mode == "full" else 0, "embed_dim": cfg.model.embed_dim,
                "head_selection": cfg.head.selection, "head_weight_dtype": str(cfg.head_weight_dtype).removeprefix("torch."),
                "ms": elapsed / args.steps * 1e3, "samples_per_s": global_batch * args.steps / elapsed,
                "peak_mib": float(peak), "steps": args.steps,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
