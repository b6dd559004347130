r"""Accuracy of a head stored in low precision: fp32 against bf16 and fp8, with and without
stochastic rounding and Kahan compensation, the same training otherwise.

    python benchmarks/precision_accuracy.py head.num_classes=1000000 train.global_batch=1024 \
        train.steps=400 train.eval_every=100 train.eval_samples=50000     # 1M classes, features
    python benchmarks/precision_accuracy.py --variants fp32,fp8-sr        # a subset
    python benchmarks/precision_accuracy.py --dry-run                     # CPU: a tiny run of each

Every run uses head.impl=reference (the torch head: the step runs on float32 copies of
the rows and is rounded into the stored dtype) with the head's momentum buffer in fp32,
except the ``-fused`` variants: the FP8 kernels, which round the update in the kernel.
Rows record the loss and held-out top-1 curves as well as the final values (see
``benchmarks/accuracy_runs.py``); plots: ``<name>.png`` (final top-1) and
``<name>_curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import add_arguments, run_study  # noqa: E402

VARIANTS = {
    "fp32": ["head.weight_dtype=fp32"],
    "bf16-nearest": ["head.weight_dtype=bf16", "head.rounding=nearest"],
    "bf16-sr": ["head.weight_dtype=bf16", "head.rounding=stochastic"],
    "fp8-nearest": ["head.weight_dtype=fp8_e4m3", "head.rounding=nearest"],
    "fp8-sr": ["head.weight_dtype=fp8_e4m3", "head.rounding=stochastic"],
    "fp8-kahan": ["head.weight_dtype=fp8_e4m3", "head.rounding=nearest", "head.kahan=true"],
    "fp8-sr-kahan": ["head.weight_dtype=fp8_e4m3", "head.rounding=stochastic", "head.kahan=true"],
    # The same on the fused FP8 kernels (the update rounded inside the weight kernel):
    "fp8-sr-fused": ["head.impl=triton", "head.weight_dtype=fp8_e4m3", "head.rounding=stochastic"],
    "fp8-nearest-fused": ["head.impl=triton", "head.weight_dtype=fp8_e4m3", "head.rounding=nearest"],
    "fp8-sr-fused-filtered": [
        "head.impl=triton",
        "head.weight_dtype=fp8_e4m3",
        "head.rounding=stochastic",
        "head.grad_filter=0.000244140625",
    ],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default="fp32,bf16-nearest,fp8-nearest,fp8-sr,fp8-kahan",
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    add_arguments(parser, name="precision_accuracy")
    args = parser.parse_args(argv)
    wanted = args.variants.split(",")
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {unknown}")
    variants = {
        f"hydrahead-{name}": ["head.impl=reference", "head.momentum_dtype=fp32", *VARIANTS[name]] for name in wanted
    }
    run_study(
        args,
        variants,
        what="head weights stored in fp32, bf16 or fp8 e4m3 with round-to-nearest, stochastic "
        "rounding or Kahan compensation (head.impl=reference); last held-out eval of each run",
    )


if __name__ == "__main__":
    main()
