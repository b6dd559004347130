"""WTA-CRS on one GPU: peak memory, step time and the largest batch of ViT-S/B against exact.

    python benchmarks/wta_crs.py --models vit_small           # one H200; at most ~8 min (--time-budget)
    python benchmarks/wta_crs.py --models vit_base
    python benchmarks/wta_crs.py --dry-run                    # CPU, tiny sizes: checks the flow

One step: bf16 autocast forward of the backbone (224 px, patch 16: 197 tokens) and a
linear head of ``--classes`` classes, cross-entropy, backward, AdamW step, gradients set
to None. ``model.wta_crs_keep`` = 1 is the plain ``nn.Linear`` ViT; 0.3 and 0.1 store that
share of each block linear's input rows (``--no-mlp``: attention's linears only).

For each model and keep, at each of ``--batches``: the median step time over ``--reps``
CUDA-event-timed steps after ``--warmup`` steps, ``torch.cuda.max_memory_allocated`` over
them (``peak_mib``) and the part of it above the steady state of parameters, AdamW state
and inputs (``above_state_mib``: activations and gradients). Then the largest batch that
fits: doubling from ``--start-batch`` (from the exact model's largest for keep < 1), then
bisection to ``--resolution``; a batch fits when two steps run without running out of
memory. No new try starts after ``--time-budget`` seconds; each row says whether its
search settled. Every measurement and every try runs in a fresh subprocess, so no failed
allocation or cached block of one shapes the next; the parent never touches the GPU
until all of them are done. JSON: ``<results>/<name>.json`` (``$HYDRAHEAD_RESULTS_DIR``
or benchmarks/results), then the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    cuda_time_ms,
    environment,
    matmul_tflops,
    median,
    print_table,
    write_results,
)
from hydrahead.models import build_backbone  # noqa: E402

EMBED_DIM = 512
OOM_EXIT = 3  # a worker's exit status when the batch does not fit
DRY_RUN = {
    "models": "vit_tiny",
    "keeps": "1.0,0.3",
    "batches": "4",
    "image_size": 32,
    "patch_size": 8,
    "warmup": 1,
    "reps": 2,
    "start_batch": 4,
    "max_batch": 8,
}


def _step_fn(model: str, keep: float, batch: int, args, device: torch.device):
    """A training step of backbone + linear head on fixed random images, and its inputs' owner."""
    torch.manual_seed(0)
    backbone = build_backbone(
        model,
        EMBED_DIM,
        image_size=args.image_size,
        patch_size=args.patch_size,
        wta_crs_keep=keep,
        wta_crs_mlp=not args.no_mlp,
    ).to(device)
    head = nn.Linear(EMBED_DIM, args.classes).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            logits = head(backbone(images))
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(args) -> None:
    """One (model, keep, batch) in this process: print a JSON row, or exit OOM_EXIT if it does not fit."""
    model, keep, batch = args.worker[0], float(args.worker[1]), int(args.worker[2])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    row = {"model": model, "keep": keep, "batch": batch}
    try:
        step = _step_fn(model, keep, batch, args, device)
        if args.probe:  # two steps: the second has AdamW's state from the first
            step()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        elif device.type == "cuda":
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            state = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = median(cuda_time_ms(step, warmup=0, reps=args.reps))
            peak = torch.cuda.max_memory_allocated()
            row.update(
                ms=ms,
                images_per_s=batch / ms * 1e3,
                peak_mib=peak / 2**20,
                above_state_mib=(peak - state) / 2**20,
                state_mib=state / 2**20,
            )
        else:  # the dry run: the host clock, no memory figures
            step()
            start = time.perf_counter()
            step()
            row["ms"] = (time.perf_counter() - start) * 1e3
            row["images_per_s"] = batch / row["ms"] * 1e3
    except torch.cuda.OutOfMemoryError:
        sys.exit(OOM_EXIT)
    except RuntimeError as e:  # cuBLAS and cuDNN report a failed allocation in their own words
        if "ALLOC_FAILED" in str(e) or "out of memory" in str(e):
            sys.exit(OOM_EXIT)
        raise
    print(json.dumps(row), flush=True)


def run_worker(args, model: str, keep: float, batch: int, *, probe: bool) -> dict | None:
    """The worker's row in a fresh process; None when the batch does not fit. Any other
    failure is printed and counted as not fitting, so one bad try does not lose the rest."""
    cmd = [sys.executable, __file__, "--worker", model, repr(keep), str(batch), *_shared_flags(args)]
    if probe:
        cmd.append("--probe")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{' '.join(cmd)}: over --timeout {args.timeout} s", file=sys.stderr)
        return None
    if done.returncode == OOM_EXIT:
        return None
    if done.returncode != 0:
        print(f"{' '.join(cmd)} failed with exit {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_flags(args) -> list[str]:
    flags = [
        f"--image-size={args.image_size}",
        f"--patch-size={args.patch_size}",
        f"--classes={args.classes}",
        f"--warmup={args.warmup}",
        f"--reps={args.reps}",
    ]
    return flags + (["--no-mlp"] if args.no_mlp else []) + (["--dry-run"] if args.dry_run else [])


def largest_batch(args, model: str, keep: float, known_fit: int | None):
    """(largest batch seen to fit, its probe row, tries, smallest seen not to fit or None):
    doubling from ``known_fit`` or ``--start-batch``, then bisection until the bracket is
    within ``--resolution`` of the fit, or until ``--time-budget`` is spent."""
    tries = 0

    def fits(batch):
        nonlocal tries
        tries += 1
        row = run_worker(args, model, keep, batch, probe=True)
        print(f"  {model} keep={keep} batch={batch}: {'fits' if row else 'out of memory'}", flush=True)
        return row

    def out_of_time():
        return time.monotonic() - args.started > args.time_budget

    good, good_row, bad = 0, None, None
    batch = known_fit or args.start_batch
    while batch <= args.max_batch and not out_of_time():
        row = fits(batch)
        if row is None:
            bad = batch
            break
        good, good_row = batch, row
        batch *= 2
    while bad is not None and bad - good > max(1, args.resolution * good) and not out_of_time():
        middle = (good + bad) // 2
        row = fits(middle)
        if row is None:
            bad = middle
        else:
            good, good_row = middle, row
    return good, good_row, tries, bad


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small,vit_base", help="comma-separated: vit_tiny, vit_small, vit_base")
    parser.add_argument("--keeps", default="1.0,0.3,0.1", help="comma-separated model.wta_crs_keep values")
    parser.add_argument("--batches", default="64,128,256", help="comma-separated batch sizes timed")
    parser.add_argument("--no-mlp", action="store_true", help="model.wta_crs_mlp=false: attention's linears only")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=1000, help="classes of the linear head")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--reps", type=int, default=10, help="timed steps")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the search for the largest batch")
    parser.add_argument("--start-batch", type=int, default=256, help="the exact model's first try")
    parser.add_argument("--max-batch", type=int, default=16384, help="largest batch tried")
    parser.add_argument(
        "--resolution", type=float, default=0.03, help="bisection stops when fail - fit <= this share of fit"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to one subprocess")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=420,
        help="seconds after which no new largest-batch try starts (rows say whether a search settled)",
    )
    parser.add_argument("--name", default=None, help="results file name (default: wta_crs_<models>)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT at 32 px: checks the flow")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "KEEP", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run and not args.worker:  # tiny defaults; flags given still win
        parser.set_defaults(**DRY_RUN)
        args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    args.started = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    models = args.models.split(",")
    keeps = [float(k) for k in args.keeps.split(",")]
    if any(not 0 < k <= 1 for k in keeps):
        parser.error("--keeps must lie in (0, 1]")
    name = args.name or "wta_crs_" + "_".join(models) + ("_dry_run" if args.dry_run else "")

    rows, largest = [], []
    for model in models:
        for keep in keeps:
            for batch in [int(b) for b in args.batches.split(",")]:
                row = run_worker(args, model, keep, batch, probe=False) or {
                    "model": model,
                    "keep": keep,
                    "batch": batch,
                    "note": "out of memory or failed (see stderr)",
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.no_max_batch:
            continue
        exact_fit = None
        for keep in sorted(keeps, reverse=True):  # exact first: its largest batch starts the others' search
            batch, row, tries, fails = largest_batch(args, model, keep, exact_fit if keep < 1 else None)
            if keep == 1:
                exact_fit = batch
            largest.append(
                {
                    "model": model,
                    "keep": keep,
                    "largest_batch": batch,
                    "peak_mib": row.get("peak_mib") if row else None,
                    "smallest_failing": fails,
                    "tries": tries,
                    # The search ended on its bracket, at --max-batch, or out of --time-budget.
                    "settled": fails is not None and fails - batch <= max(1, args.resolution * batch),
                }
            )
    _add_ratios(rows, largest)
    tflops = matmul_tflops("cuda" if not args.dry_run else "cpu")  # the workers are done with the GPU
    _add_floors(rows, args, tflops)
    payload = {
        **environment(),
        "benchmark": "wta_crs",
        "what": "ViT backbone + linear head, one training step (bf16 autocast forward, backward, AdamW); "
        "model.wta_crs_keep = 1 is exact, below 1 the blocks' linears store that share of their input rows",
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "tokens": (args.image_size // args.patch_size) ** 2 + 1,
        "classes": args.classes,
        "wta_crs_mlp": not args.no_mlp,
        "resolution": args.resolution,
        "max_batch_tried": args.max_batch,
        "time_budget_s": args.time_budget,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "matmul_tflops": tflops,
        "floor": "the exact step's FLOPs (3x the backbone's forward, 6*B*D*C for the head) at the bf16 matmul "
        "rate measured in this run (fp32 on CPU)",
        "rows": rows,
        "largest_batch": largest,
    }
    path = write_results(name, payload)
    print(f"\nwrote {path}\n")
    print_table(
        rows,
        [
            "model",
            "keep",
            "batch",
            "ms",
            "floor_ms",
            "ratio",
            "images_per_s",
            "peak_mib",
            "above_state_mib",
            "peak_vs_exact",
        ],
    )
    if largest:
        print()
        print_table(
            largest, ["model", "keep", "largest_batch", "smallest_failing", "settled", "batch_vs_exact", "peak_mib"]
        )


def step_flops(model: str, batch: int, args) -> float:
    """FLOPs of one exact training step: 3x the backbone's forward (torch's FLOP counter on
    meta tensors) plus the head's forward and backward, 6 B D C."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = build_backbone(model, EMBED_DIM, image_size=args.image_size, patch_size=args.patch_size).to("meta")
    with FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, 3, args.image_size, args.image_size, device="meta"))
    return batch * (3 * counter.get_total_flops() + 6 * EMBED_DIM * args.classes)


def _add_floors(rows: list[dict], args, tflops: float) -> None:
    """method, shape, and each step against the exact step's FLOPs at ``tflops`` (sampling
    skips part of the weight-gradient arithmetic, so a sampled step could go below it)."""
    for r in rows:
        r["method"] = "hydrahead-exact" if r["keep"] == 1 else f"hydrahead-wta_crs keep {r['keep']:g}"
        r["shape"] = f"{r['model']}, batch {r['batch']}, {args.image_size} px"
        r["floor_ms"] = step_flops(r["model"], r["batch"], args) / (tflops * 1e12) * 1e3
        r["ratio"] = r["ms"] / r["floor_ms"] if r.get("ms") else None
        r.setdefault("peak_mib", None)


def _add_ratios(rows: list[dict], largest: list[dict]) -> None:
    """peak_vs_exact (peak memory / the exact model's at that batch) and batch_vs_exact."""
    exact = {(r["model"], r["batch"]): r.get("peak_mib") for r in rows if r["keep"] == 1}
    for r in rows:
        base = exact.get((r["model"], r["batch"]))
        r["peak_vs_exact"] = r["peak_mib"] / base if r.get("peak_mib") and base else None
    exact_batch = {r["model"]: r["largest_batch"] for r in largest if r["keep"] == 1}
    for r in largest:
        base = exact_batch.get(r["model"])
        r["batch_vs_exact"] = r["largest_batch"] / base if base else None


if __name__ == "__main__":
    main()
