"""Accuracy of active-class selection: full softmax against knn and random at one budget.

    python benchmarks/selection_accuracy.py head.num_classes=1000000 train.global_batch=1024 \
        train.steps=400 train.eval_every=400 train.eval_samples=50000     # 1M classes, feature mode
    python benchmarks/selection_accuracy.py --budget 0.01 --knn-k 16      # another budget
    python benchmarks/selection_accuracy.py --dry-run                     # CPU: a tiny run of each

Variants (each for every seed; see ``benchmarks/accuracy_runs.py`` for the row fields):

  hydrahead-full              head.selection=full
  hydrahead-knn <budget> ...  head.selection=knn: each sample's --knn-k nearest rows per shard
                              + positives, filled with random rows up to head.budget
  hydrahead-random <budget>   head.selection=random (Partial FC) at the same head.budget
  hydrahead-graph <budget> ...  head.selection=graph: each label's --graph-k nearest classes
                              in the class graph (built with the same index, rebuilt every
                              --rebuild-every steps) + positives, filled as knn

Rows outside a step's active set follow --inactive-rows (head.inactive_rows): continue
(full SGD's zero-gradient step, momentum goes on) or frozen (Partial FC's rule); a frozen
variant's name ends in "frozen". The knn index is the torch backend (--index-type, ivf by
default: approximate, rebuilt in the background every --rebuild-every steps), as it runs on
a GPU without faiss-gpu.
Held-out top-1 is over all classes (the exact sharded top-k), whatever the selection.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import add_arguments, run_study  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget", type=float, default=0.1, help="head.budget of knn and random, a fraction of the shard"
    )
    parser.add_argument("--knn-k", type=int, default=16, help="head.knn_k")
    parser.add_argument("--graph-k", type=int, default=16, help="head.graph_k")
    parser.add_argument(
        "--index-type", default="ivf", choices=("flat", "ivf"), help="head.index_type of the torch index"
    )
    parser.add_argument("--rebuild-every", type=int, default=100, help="head.rebuild_every")
    parser.add_argument(
        "--inactive-rows",
        default="continue",
        choices=("continue", "frozen"),
        help="head.inactive_rows of knn and random",
    )
    parser.add_argument(
        "--methods", default="full,knn,random,graph", help="comma-separated subset of full, knn, random, graph"
    )
    add_arguments(parser, name="selection_accuracy")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error("--budget must be a fraction in (0, 1]")
    common = [f"head.budget={args.budget!r}", f"head.inactive_rows={args.inactive_rows}"]
    frozen = " frozen" if args.inactive_rows == "frozen" else ""
    variants = {
        "hydrahead-full": ["head.selection=full"],
        f"hydrahead-knn {args.budget:g} {args.index_type} k={args.knn_k} R={args.rebuild_every}{frozen}": [
            "head.selection=knn",
            *common,
            f"head.knn_k={args.knn_k}",
            "head.index=torch",
            f"head.index_type={args.index_type}",
            f"head.rebuild_every={args.rebuild_every}",
        ],
        f"hydrahead-random {args.budget:g}{frozen}": ["head.selection=random", *common],
        f"hydrahead-graph {args.budget:g} {args.index_type} k={args.graph_k} R={args.rebuild_every}{frozen}": [
            "head.selection=graph",
            *common,
            f"head.graph_k={args.graph_k}",
            "head.index=torch",
            f"head.index_type={args.index_type}",
            f"head.rebuild_every={args.rebuild_every}",
        ],
    }
    wanted = args.methods.split(",")
    variants = {name: v for name, v in variants.items() if name.split()[0].removeprefix("hydrahead-") in wanted}
    run_study(
        args,
        variants,
        what=f"full softmax against knn, random and graph selection at head.budget={args.budget:g}; "
        "last held-out eval of each run (top-1 over all classes)",
        extra_fields=lambda method: {"budget": None if method == "hydrahead-full" else args.budget},
    )


if __name__ == "__main__":
    main()
