"""What head.grad_filter costs in accuracy: the same training runs with and without it.

    python benchmarks/grad_filter_accuracy.py                              # quickstart, 3 seeds
    python benchmarks/grad_filter_accuracy.py --filters 0,2.44e-4,1e-6 head.num_classes=100000
    python benchmarks/grad_filter_accuracy.py --dry-run                    # CPU: a tiny run of each

Every run uses head.impl=triton with one head.grad_filter value (0: exact); see
``benchmarks/accuracy_runs.py`` for what each row records. The table gives the mean and
spread over seeds per filter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import add_arguments, run_study  # noqa: E402


def method_name(grad_filter: float) -> str:
    return "hydrahead-triton exact" if grad_filter == 0 else f"hydrahead-triton filtered {grad_filter:.3g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--filters", default="0,0.000244140625", help="comma-separated head.grad_filter values (0: exact)"
    )
    add_arguments(parser, name="grad_filter_accuracy")
    args = parser.parse_args(argv)
    filters = [float(v) for v in args.filters.split(",")]
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("head.impl=triton needs a CUDA device (or --dry-run)")
    if any(f < 0 for f in filters):
        parser.error("--filters must be >= 0")
    variants = {method_name(f): ["head.impl=triton", f"head.grad_filter={f!r}"] for f in filters}
    by_method = {method_name(f): f for f in filters}
    run_study(
        args,
        variants,
        what="training runs with head.impl=triton, exact against head.grad_filter; last held-out eval of each run",
        extra_fields=lambda method: {"grad_filter": by_method[method]},
    )


if __name__ == "__main__":
    main()
