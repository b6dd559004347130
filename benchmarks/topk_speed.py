"""What each backbone gradient exchange costs in compute and in bytes, on one GPU, and the
step it makes on a slow link.

    python benchmarks/topk_speed.py                                 # ResNet-50 and ViT-B/16, 256 images at 224 px
    python benchmarks/topk_speed.py --densities 0.001,0.01 --gbit 25 --workers 8
    python benchmarks/topk_speed.py --dry-run                       # CPU, tiny models: checks the flow

For each backbone, a training step (bf16 autocast on GPU; a cross-entropy over a random
1,000-way projection of the embedding) runs under DDP on a 1-rank process group with each
exchange's real hook (hydrahead.comm.compression): ``dense`` (fp32 all-reduce), ``bf16``,
``powersgd`` (PyTorch's hooks) and top-k at each density, selecting ``exact`` (torch.topk
per tensor) or ``sampled`` (a threshold from 1% of each tensor), and with
``--momentum-correction`` sampled top-k with DGC's velocities too (and the weight decay
that moves with them, ``--weight-decay``). Measured on the device:

    fwd_ms, bwd_ms   forward; backward including the hook's work (the 1-rank collective is a copy)
    hook_ms          bwd_ms - the dense step's bwd_ms: what the exchange adds to the backward
    select_ms        top-k: building one worker's messages for all buckets alone (residual
                     added, entries chosen, residual cleared, message packed), after a few
                     steps so the residuals are real; select_share = select_ms / dense bwd_ms;
                     host_syncs: the host-device synchronisations that packing asked for
                     (host_sync_sites: where, by line)
    bytes            what one worker hands to its collectives per step (the trainer's counter)

and modelled from them for W workers (``--workers``) on a link of ``--gbit`` Gbit/s:

    link_ms          bytes / bandwidth
    wire_ms          bytes each worker moves: 2 (W-1)/W x bytes for a ring all-reduce (dense,
                     bf16, powersgd), (W-1) x bytes for top-k's all-gather (every worker
                     receives every other's message), over the bandwidth
    step_serial_ms   fwd_ms + bwd_ms + wire_ms (nothing overlaps)
    step_overlap_ms  fwd_ms + bwd_ms + max(0, wire_ms - dense bwd_ms) (the exchange hidden
                     behind the backward, bucket by bucket, as far as it lasts)

``sampled`` rows also give recall: the share of the entries exact top-k sends (non-zero
ones) that the sampled selection sends too, from the same residuals.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, host_sync_log, print_table, write_results  # noqa: E402
from hydrahead.comm import compression  # noqa: E402
from hydrahead.comm.timing import CommClock  # noqa: E402
from hydrahead.config import CommConfig, OptimConfig  # noqa: E402
from hydrahead.models import build_backbone, param_groups_for_decay  # noqa: E402

MODELS = {"resnet50": "ResNet-50", "vit_base": "ViT-B/16"}
DRY_MODELS = {"resnet18": "ResNet-18", "vit_tiny": "ViT-Ti/16"}
CLASSES = 1000


def variants(
    densities: list[float], sample_share: float, powersgd_rank: int, momentum_correction: bool = False
) -> dict[str, tuple[CommConfig, float]]:
    """name -> (the exchange's comm config, its top-k density or None)."""
    out = {
        "dense": (CommConfig(grad_compression="none"), None),
        "bf16": (CommConfig(grad_compression="bf16"), None),
        "powersgd": (
            CommConfig(grad_compression="powersgd", powersgd_rank=powersgd_rank, powersgd_start_step=2),
            None,
        ),
    }
    for density in densities:
        for select in ("exact", "sampled"):
            cfg = CommConfig(
                grad_compression="topk",
                topk_density=density,
                topk_warmup_steps=0,
                topk_select=select,
                topk_sample_share=sample_share,
            )
            out[f"topk-{select} {density:g}"] = (cfg, density)
        if momentum_correction:  # the velocity's extra passes over every tensor
            cfg = CommConfig(**{**vars(cfg), "topk_momentum_correction": True})
            out[f"topk-sampled+mc {density:g}"] = (cfg, density)
    return out


def elapsed_ms(start, stop) -> float:
    """Milliseconds between two ``CommClock.mark()`` readings (CUDA events or host times)."""
    if isinstance(start, float):
        return (stop - start) * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def buckets(model: nn.Module, bucket_mb: float) -> list[list[nn.Parameter]]:
    """Parameters in reverse order cut into buckets of about ``bucket_mb`` MiB, as DDP forms them."""
    out, current, size = [], [], 0
    for param in reversed([p for p in model.parameters() if p.requires_grad]):
        current.append(param)
        size += param.numel() * param.element_size()
        if size >= bucket_mb * 2**20:
            out.append(current)
            current, size = [], 0
    return out + ([current] if current else [])


def bucket_buffers(groups) -> list[tuple]:
    """Each bucket's gradients laid end to end, each in its parameter's memory order as DDP's
    bucket holds them (channels-last convolutions too): (buffer, params, views)."""
    out = []
    for params in groups:
        buffer = torch.empty(sum(p.numel() for p in params), device=params[0].device)
        views, offset = [], 0
        for p in params:
            shape, strides = compression.ddp_gradient_layout(p)
            views.append(buffer.as_strided(shape, strides, offset).copy_(p.grad))
            offset += p.numel()
        out.append((buffer, params, views))
    return out


def pack_all(topk, prepared, world_size: int) -> list[torch.Tensor]:
    """One worker's messages for every bucket (``bucket_buffers``), its state left as it was."""
    messages = [topk.pack(buffer, params, views, world_size)[0] for buffer, params, views in prepared]
    topk.discard()  # measured, not taken
    return messages


def sent_entries(messages: list[torch.Tensor], topk, groups) -> set:
    """(bucket, index) pairs the messages carry with a non-zero value."""
    entries = set()
    for b, (message, params) in enumerate(zip(messages, groups)):
        dense = sum(p.numel() for p in params if not topk.is_sparse(p))
        sparse = (message.numel() - dense) // 2
        index = message[dense : dense + sparse].tolist()
        value = message[dense + sparse :].view(torch.float32).tolist()
        entries |= {(b, i) for i, v in zip(index, value) if v != 0.0}
    return entries


def measure(args, name: str, device: torch.device) -> list[dict]:
    clock = CommClock(device)  # its marks: CUDA events, or the host's clock on CPU
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    labels = torch.randint(0, CLASSES, (args.batch,), generator=gen).to(device)
    projection = (torch.randn(args.embed_dim, CLASSES, generator=gen) / args.embed_dim**0.5).to(device)
    if device.type == "cuda" and name.startswith("resnet"):
        images = images.contiguous(memory_format=torch.channels_last)
    rows, dense_bwd = [], None
    exchanges = variants(args.densities, args.sample_share, args.powersgd_rank, args.momentum_correction)
    for variant, (comm_cfg, density) in exchanges.items():
        torch.manual_seed(0)
        model = build_backbone(name, args.embed_dim, image_size=args.image_size).to(device)
        if device.type == "cuda" and name.startswith("resnet"):
            model = model.to(memory_format=torch.channels_last)
        names = {p: n for n, p in model.named_parameters()}
        ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
        # the trainer's weight decay per tensor, which momentum correction moves into the exchange
        decay = {
            names[p]: g["weight_decay"] for g in param_groups_for_decay(model, args.weight_decay) for p in g["params"]
        }
        counters, topk = compression.register(ddp, None, comm_cfg, names, weight_decay=decay)
        fwd, bwd, sent = [], [], []
        for step in range(1, args.warmup + args.reps + 1):
            if topk is not None:
                topk.step = step
            ddp.zero_grad(set_to_none=True)
            start = clock.mark()
            with autocast:
                features = ddp(images)
            loss = nn.functional.cross_entropy(features.float() @ projection, labels)
            middle = clock.mark()
            loss.backward()
            stop = clock.mark()
            if topk is not None:
                topk.commit()
            sent.append(counters.take()["bytes_backbone_allreduce"])
            if step > args.warmup:
                fwd.append(elapsed_ms(start, middle))
                bwd.append(elapsed_ms(middle, stop))
        row = {
            "model": MODELS.get(name, DRY_MODELS.get(name)),
            "variant": variant,
            "density": density,
            "params": sum(p.numel() for p in model.parameters()),
            "fwd_ms": statistics.median(fwd),
            "bwd_ms": statistics.median(bwd),
            "bytes": sent[-1],
        }
        if variant == "dense":
            dense_bwd = row["bwd_ms"]
        row["hook_ms"] = row["bwd_ms"] - dense_bwd
        if topk is not None:
            groups = buckets(model, args.bucket_mb)
            prepared = bucket_buffers(groups)
            times = []
            for _ in range(args.warmup + args.reps):
                start = clock.mark()
                pack_all(topk, prepared, args.workers)
                times.append(elapsed_ms(start, clock.mark()))
            row["select_ms"] = statistics.median(times[args.warmup :])
            row["select_share"] = row["select_ms"] / dense_bwd
            if device.type == "cuda":  # a host read inside the hook would stall the backward behind it
                with host_sync_log() as syncs:
                    pack_all(topk, prepared, args.workers)
                row["host_syncs"] = sum(syncs.values())
                row["host_sync_sites"] = dict(syncs)  # "path:line (function)" -> count: where packing waited
            if comm_cfg.topk_select == "sampled" and not comm_cfg.topk_momentum_correction:
                exact = compression.make_topk(
                    CommConfig(**{**vars(comm_cfg), "topk_select": "exact"}), names, compression.CommCounters()
                )
                exact.residuals, exact.step = topk.residuals, topk.step
                chosen = sent_entries(pack_all(topk, prepared, args.workers), topk, groups)
                best = sent_entries(pack_all(exact, prepared, args.workers), exact, groups)
                row["recall"] = len(chosen & best) / len(best) if best else None
        rows.append(row)
        del ddp, model, topk
    return [model_row(row, rows[0], args) for row in rows]


def model_row(row: dict, dense: dict, args) -> dict:
    """The link figures of one measured row (``dense``: the same model's dense row)."""
    bandwidth = args.gbit * 1e9 / 8  # bytes per second
    w = args.workers
    moved = (w - 1) * row["bytes"] if row["variant"].startswith("topk") else 2 * (w - 1) / w * row["bytes"]
    wire_ms = moved / bandwidth * 1e3
    compute = row["fwd_ms"] + row["bwd_ms"]
    return {
        **row,
        "ratio": dense["bytes"] / row["bytes"],
        "link_ms": row["bytes"] / bandwidth * 1e3,
        "wire_ms": wire_ms,
        "step_serial_ms": compute + wire_ms,
        "step_overlap_ms": compute + max(0.0, wire_ms - dense["bwd_ms"]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated backbones (default: {', '.join(MODELS)})")
    parser.add_argument("--densities", default="0.001", help="comma-separated top-k densities")
    parser.add_argument("--sample-share", type=float, default=0.01, help="comm.topk_sample_share of the sampled rows")
    parser.add_argument("--powersgd-rank", type=int, default=4, help="comm.powersgd_rank")
    parser.add_argument(
        "--momentum-correction", action="store_true", help="also time sampled top-k with comm.topk_momentum_correction"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=OptimConfig().weight_decay,
        help="optim.weight_decay: with momentum correction the exchange adds it (default: the config's)",
    )
    parser.add_argument("--batch", type=int, default=256, help="images per step (one GPU)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--embed-dim", type=int, default=512, help="the backbone's embedding width")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size in MiB (comm.bucket_mb)")
    parser.add_argument("--gbit", type=float, default=25.0, help="modelled link bandwidth in Gbit/s")
    parser.add_argument("--workers", type=int, default=8, help="modelled number of workers on the link")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--reps", type=int, default=10, help="timed steps (medians are reported)")
    parser.add_argument("--name", default="topk_speed", help="results file name (without .json)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny backbones and batch: checks the flow")
    args = parser.parse_args(argv)
    args.densities = [float(v) for v in args.densities.split(",") if v]
    if any(not 0 < d < 1 for d in args.densities):
        parser.error("--densities must lie in (0, 1)")
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    if args.dry_run:
        device = torch.device("cpu")
        models = (args.models or ",".join(DRY_MODELS)).split(",")
        args.batch, args.image_size, args.embed_dim = min(args.batch, 4), min(args.image_size, 32), 32
        args.warmup, args.reps = min(args.warmup, 2), min(args.reps, 1)
        args.densities = [max(d, 0.01) for d in args.densities]
    else:
        if not torch.cuda.is_available():
            parser.error("this benchmark times a GPU; --dry-run runs it on the CPU")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        models = (args.models or ",".join(MODELS)).split(",")

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = []
        for name in models:
            print(f"== {name}", flush=True)
            rows += measure(args, name, device)
    finally:
        dist.destroy_process_group()
    payload = {
        **environment(),
        "benchmark": "topk_speed",
        "batch": args.batch,
        "image_size": args.image_size,
        "embed_dim": args.embed_dim,
        "bucket_mb": args.bucket_mb,
        "gbit": args.gbit,
        "workers": args.workers,
        "sample_share": args.sample_share,
        "weight_decay": args.weight_decay,
        "dry_run": args.dry_run,
        "what": "per-step cost of each backbone gradient exchange on one device (its hook on a 1-rank group), "
        "bytes per worker, and the step modelled for W workers on a link of the given bandwidth",
        "rows": rows,
    }
    path = write_results(args.name, payload)
    print(f"wrote {path}")
    print_table(
        rows,
        [
            "model",
            "variant",
            "fwd_ms",
            "bwd_ms",
            "hook_ms",
            "select_ms",
            "select_share",
            "bytes",
            "ratio",
            "link_ms",
            "wire_ms",
            "step_serial_ms",
            "step_overlap_ms",
            "recall",
            "host_syncs",
        ],
    )


if __name__ == "__main__":
    main()
