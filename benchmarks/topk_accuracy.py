"""What top-k gradient sparsification costs in accuracy: dense against comm.grad_compression=topk.

    python benchmarks/topk_accuracy.py --gpus 2                  # the procedural image task, 3 seeds
    python benchmarks/topk_accuracy.py --gpus 2 --densities 0.001,0.01
    python benchmarks/topk_accuracy.py --dry-run --gpus 2        # CPU: a tiny run of each

Defaults: ResNet-18 at 32 px on procedural images, 100k classes, global batch 512,
300 steps, 50,000 held-out samples. Every run is the same training except the backbone's
gradient exchange: ``none`` (dense SUM) or ``topk`` at a density, with the warm-up (25%
falling to the density) over the first ``--warmup-steps``. ``benchmarks/accuracy_runs.py``
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


def method_name(density: float | None, corrected: bool = False) -> str:
    if density is None:
        return "hydrahead-dense"
    return f"hydrahead-topk {density:g}" + (" momentum-corrected" if corrected else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", default="0.001", help="comma-separated comm.topk_density values")
    parser.add_argument("--warmup-steps", type=int, default=60, help="comm.topk_warmup_steps")
    parser.add_argument(
        "--momentum-correction",
        default="",
        help="comma-separated densities also run with comm.topk_momentum_correction=true (and optim.momentum=0)",
    )
    add_arguments(parser, name="topk_accuracy")
    args = parser.parse_args(argv)
    densities = [float(v) for v in args.densities.split(",") if v]
    if any(not 0 < d <= 1 for d in densities):
        parser.error("--densities must lie in (0, 1]")
    if not args.dry_run:
        args.overrides = [*IMAGE_TASK, *args.overrides]
    corrected = [float(v) for v in args.momentum_correction.split(",") if v]

    def topk(density: float) -> list[str]:
        return [
            "comm.grad_compression=topk",
            f"comm.topk_density={density!r}",
            f"comm.topk_warmup_steps={args.warmup_steps}",
            *(["comm.topk_min_numel=64"] if args.dry_run else []),
        ]

    variants = {method_name(None): ["comm.grad_compression=none"]}
    variants.update({method_name(d): topk(d) for d in densities})
    # Momentum correction sends accumulated velocity, so the optimizer takes plain SGD steps (as DGC does).
    variants.update(
        {
            method_name(d, True): [*topk(d), "comm.topk_momentum_correction=true", "optim.momentum=0.0"]
            for d in corrected
        }
    )
    by_method = {**{method_name(d): d for d in densities}, **{method_name(d, True): d for d in corrected}}
    run_study(
        args,
        variants,
        what="backbone gradient exchange dense against layer-wise top-k with error feedback; "
        "last held-out eval of each run",
        extra_fields=lambda method: {"topk_density": by_method.get(method)},
    )


if __name__ == "__main__":
    main()
