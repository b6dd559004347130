r"""What top-k gradient sparsification costs in accuracy, and which of Deep Gradient
Compression's fixes win it back: dense against comm.grad_compression=topk.

    python benchmarks/topk_accuracy.py --gpus 2                                  # 2 real ranks, 3 seeds
    python benchmarks/topk_accuracy.py --simulate-workers 8 --densities 0.001,0.01 \
        --fixes none,mc,dense-ends,mc+dense-ends                                   # one GPU as 8 workers
    python benchmarks/topk_accuracy.py --dry-run --simulate-workers 2 --fixes none,mc+sampled

Defaults: ResNet-18 at 32 px on procedural images, 100k classes, global batch 512,
300 steps, 50,000 held-out samples. Every run is the same training except the backbone's
gradient exchange: ``none`` (dense SUM) or ``topk`` at a density, with the warm-up (25%
falling to the density) over the first ``--warmup-steps``, plus a combination of fixes
(``--fixes``: comma-separated combinations, each a ``+``-joined list of FIXES, ``none``
for plain top-k). With ``--simulate-workers W`` every run, dense included, trains on one
GPU as W workers (comm.simulate_workers): each worker's micro-batch has its own
BatchNorm statistics and top-k residual, as on W GPUs. ``benchmarks/accuracy_runs.py``
says what each row records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import add_arguments, run_study  # noqa: E402

IMAGE_TASK = [
    "model.backbone=resnet18",
    "data.kind=procedural_images",
    "data.image_size=32",
    "model.embed_dim=128",
    "head.num_classes=100000",
    "train.global_batch=512",
    "train.steps=300",
    "train.eval_every=100",
    "train.eval_samples=50000",
    "optim.warmup_steps=30",
]
# Each fix is a set of config overrides; a combination applies several.
FIXES = {
    "mc": ["comm.topk_momentum_correction=true"],  # momentum correction, with momentum factor masking
    "mc-nomask": ["comm.topk_momentum_correction=true", "comm.topk_momentum_masking=false"],
    "clip": ["comm.topk_local_clip={clip}"],  # local gradient clipping
    "dense-ends": ["comm.topk_dense=[conv1.weight,neck.*]"],  # first conv and the embedding neck dense
    "warmup": ["comm.topk_warmup_steps={long_warmup}"],  # a longer density warm-up
    "sampled": ["comm.topk_select=sampled"],  # the sampled threshold instead of exact top-k
    "lr": ["optim.lr={lr}"],  # another backbone learning rate for the top-k run only
}


def method_name(density: float | None, fixes: str = "none") -> str:
    if density is None:
        return "hydrahead-dense"
    return f"hydrahead-topk {density:g}" + ("" if fixes == "none" else f" {fixes}")


def fix_overrides(combination: str, args) -> list[str]:
    """The config overrides of a ``+``-joined combination of FIXES (``none``: no fix)."""
    if combination == "none":
        return []
    out = []
    for fix in combination.split("+"):
        if fix not in FIXES:
            raise ValueError(f"unknown fix {fix!r} in --fixes; choose from none, {', '.join(FIXES)}")
        out += [o.format(clip=args.local_clip, long_warmup=args.long_warmup, lr=args.fix_lr) for o in FIXES[fix]]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", default="0.001", help="comma-separated comm.topk_density values")
    parser.add_argument("--warmup-steps", type=int, default=60, help="comm.topk_warmup_steps")
    parser.add_argument(
        "--fixes",
        default="none",
        help=f"comma-separated combinations of fixes run at every density, each a +-joined list of {', '.join(FIXES)} "
        "(none: plain top-k)",
    )
    parser.add_argument("--local-clip", type=float, default=1.0, help="comm.topk_local_clip of the clip fix")
    parser.add_argument("--long-warmup", type=int, default=150, help="comm.topk_warmup_steps of the warmup fix")
    parser.add_argument("--fix-lr", type=float, default=0.4, help="optim.lr of the lr fix (the task's is 0.2)")
    parser.add_argument(
        "--simulate-workers",
        type=int,
        default=1,
        help="train every run as this many workers inside one rank (comm.simulate_workers; use with --gpus 1)",
    )
    parser.add_argument(
        "--no-dense", action="store_true", help="skip the dense baseline (when its rows are already in the file)"
    )
    parser.add_argument(
        "--task",
        choices=("images", "config"),
        default="images",
        help="images: the procedural image task above; config: the --config file as it is (e.g. a quick CPU study)",
    )
    add_arguments(parser, name="topk_accuracy")
    args = parser.parse_args(argv)
    densities = [float(v) for v in args.densities.split(",") if v]
    if any(not 0 < d <= 1 for d in densities):
        parser.error("--densities must lie in (0, 1]")
    if args.simulate_workers > 1 and args.gpus != 1:
        parser.error("--simulate-workers runs inside one rank: use --gpus 1")
    combinations = [c for c in args.fixes.split(",") if c]
    try:
        fixes = {c: fix_overrides(c, args) for c in combinations}
    except ValueError as error:
        parser.error(str(error))
    if not args.dry_run and args.task == "images":
        args.overrides = [*IMAGE_TASK, *args.overrides]
    if args.simulate_workers > 1:
        args.overrides = [*args.overrides, f"comm.simulate_workers={args.simulate_workers}"]

    def topk(density: float) -> list[str]:
        return [
            "comm.grad_compression=topk",
            f"comm.topk_density={density!r}",
            f"comm.topk_warmup_steps={args.warmup_steps}",
            "comm.topk_momentum_correction=false",  # the fixes start from none (the mc fix turns it on)
            *(["comm.topk_min_numel=64"] if args.dry_run else []),
        ]

    variants = {} if args.no_dense else {method_name(None): ["comm.grad_compression=none"]}
    by_method = {}
    for density in densities:
        for combination, overrides in fixes.items():
            name = method_name(density, combination)
            variants[name] = [*topk(density), *overrides]
            by_method[name] = (density, combination)
    run_study(
        args,
        variants,
        what="backbone gradient exchange dense against layer-wise top-k with error feedback and Deep Gradient "
        f"Compression's fixes; {args.simulate_workers if args.simulate_workers > 1 else args.gpus} worker(s); "
        "last held-out eval of each run",
        extra_fields=lambda method: {
            "topk_density": by_method.get(method, (None, None))[0],
            "fixes": by_method.get(method, (None, None))[1],
            "workers": args.simulate_workers if args.simulate_workers > 1 else args.gpus,
        },
    )


if __name__ == "__main__":
    main()
