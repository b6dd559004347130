"""What WTA-CRS costs in accuracy: exact ViT-S training against model.wta_crs_keep=0.3, 3 seeds.

    python benchmarks/wta_crs_accuracy.py                      # the procedural image task, one GPU
    python benchmarks/wta_crs_accuracy.py --seeds 0 --keeps 0.3,0.1
    python benchmarks/wta_crs_accuracy.py --dry-run            # CPU: a tiny run of each (vit_tiny, 32 px)

Defaults (``IMAGE_TASK``): ViT-S, procedural images at 64 px (patch 16: 17 tokens), 10k
classes, global batch 512, AdamW, 1,200 steps (120 of warm-up), 50,000 held-out samples,
on top of configs/quickstart.yaml's cosface head. By 1,200 steps exact training has
nearly stopped gaining (+0.3 points of top-1 over its last 300 steps). The earlier
600-step task (``train.steps=600 train.eval_every=200 optim.warmup_steps=60 --name
wta_crs_accuracy``) stops while top-1 still gains 1.5 points per 200 steps, so its
difference also counts how much slower the noisier gradient learns. The runs of one seed
share the initial weights and the data stream; they differ only in the sampled weight
gradients of the blocks' linears. Each row is one ``launch/train.py`` run
(``benchmarks/accuracy_runs.py`` says what it records; a re-run skips rows already in
``<name>.rows.jsonl``); besides the summary the JSON holds ``paired``: per sampled
variant, held-out top-1 minus the exact run's of the same seed, and their mean.

Runs go seed by seed; none starts once ``--time-budget`` would be overrun by a run as
slow as the slowest so far, so a command ends in bounded time. The same command again
(with the rows file in place: benchmarks/results travels with the checkout, or
``$HYDRAHEAD_RESULTS_DIR``) runs only the seeds still missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import add_arguments, run_study  # noqa: E402
from benchmarks.common import RESULTS_DIR, print_table  # noqa: E402

IMAGE_TASK = [
    "model.backbone=vit_small",
    "model.embed_dim=256",
    "data.kind=procedural_images",
    "data.image_size=64",
    "head.num_classes=10000",
    "train.global_batch=512",
    "train.steps=1200",
    "train.eval_every=300",
    "train.eval_samples=50000",
    "optim.backbone=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.05",
    "optim.warmup_steps=120",
    "checkpoint.every=0",
]
DRY_IMAGES = ["model.backbone=vit_tiny", "data.kind=procedural_images", "data.image_size=32"]
EXACT = "hydrahead-exact"


def method_name(keep: float, mlp: bool = True) -> str:
    return EXACT if keep == 1 else f"hydrahead-wta_crs {keep:g}" + ("" if mlp else " attention only")


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per sampled method: held-out top-1 minus the exact run's of the same seed."""
    exact = {r["seed"]: r["eval_top1"] for r in rows if r["method"] == EXACT and r.get("eval_top1") is not None}
    paired = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != EXACT):
        diffs = {
            r["seed"]: r["eval_top1"] - exact[r["seed"]]
            for r in rows
            if r["method"] == method and r.get("eval_top1") is not None and r["seed"] in exact
        }
        if diffs:
            values = list(diffs.values())
            paired.append(
                {
                    "method": method,
                    "seeds": len(values),
                    "top1_minus_exact": diffs,
                    "mean": statistics.mean(values),
                    "stdev": statistics.stdev(values) if len(values) > 1 else None,
                }
            )
    return paired


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", default="0.3", help="comma-separated model.wta_crs_keep values run beside exact")
    parser.add_argument("--no-mlp", action="store_true", help="model.wta_crs_mlp=false: attention's linears only")
    add_arguments(parser, name="wta_crs_accuracy_1200")
    args = parser.parse_args(argv)
    keeps = [float(v) for v in args.keeps.split(",") if v]
    if any(not 0 < k < 1 for k in keeps):
        parser.error("--keeps must lie in (0, 1): exact (1) always runs")
    args.overrides = [*(DRY_IMAGES if args.dry_run else IMAGE_TASK), *args.overrides]
    mlp = not args.no_mlp
    variants = {EXACT: ["model.wta_crs_keep=1.0"]}
    variants.update(
        {method_name(k, mlp): [f"model.wta_crs_keep={k!r}", f"model.wta_crs_mlp={str(mlp).lower()}"] for k in keeps}
    )
    by_method = {method_name(k, mlp): k for k in [1.0, *keeps]}
    run_study(
        args,
        variants,
        what="ViT blocks' linears exact against WTA-CRS sampled weight gradients (model.wta_crs_keep); "
        "last held-out eval of each run",
        extra_fields=lambda method: {"wta_crs_keep": by_method.get(method), "wta_crs_mlp": mlp},
    )
    path = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR)) / f"{args.name}.json"
    payload = json.loads(path.read_text())
    payload["paired"] = paired_differences(payload["rows"])
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print("\nheld-out top-1 minus exact's, same seed:")
    print_table(payload["paired"], ["method", "seeds", "mean", "stdev"])


if __name__ == "__main__":
    main()
