"""Steps to a held-out top-1: SGD at batch B against LARS and LAMB at 4B and 8B with warm-up.

    python benchmarks/large_batch.py                           # both phases, seeds 0,1,2, one GPU
    python benchmarks/large_batch.py --phase sweep             # phase 1 only
    python benchmarks/large_batch.py --phase full --seeds 1,2  # phase 2, more seeds (the sweep's rows in place)
    python benchmarks/large_batch.py --phase report            # JSON, PNG and table again from the rows
    python benchmarks/large_batch.py --dry-run --seeds 0       # CPU: tiny MLP runs of the whole flow, seconds

Task (``IMAGE_TASK`` on configs/quickstart.yaml's cosface head): ResNet-18 on procedural
32 px images, 10,000 classes, D = 128, B = 512. Every run of a seed sees the same task
(run.seed also seeds the data) and is evaluated on the same first ``--eval-samples``
held-out samples. Each run has its own schedule: linear warm-up over ``--warmup`` of its
steps, then poly (power 2) decay to 0; the head's SGD follows the same schedule at
``--head-lr`` x (batch / B), the linear rule (the head is SGD whatever the backbone runs).

Phase 1 (``sweep``): per (optimizer, batch) the backbone LRs of its grid (``GRIDS``, or
``--grid``), one seed (``--sweep-seed``), each over ``--sweep-steps`` of that
configuration's full run; the LR with the best final held-out top-1 is chosen (a run that
diverges counts as worst; a choice at the edge of its grid is flagged).
Phase 2 (``full``): SGD at B for ``--steps`` steps; LARS and LAMB at 4B and 8B for
``--large-steps`` x ``--steps`` each, at the chosen LRs (``--lr`` fixes one instead),
evaluated every ``--eval-every`` steps.

The target, per seed: ``--target-fraction`` x the final held-out top-1 of SGD at B of
that seed, or ``--target`` (an absolute top-1) for every seed. A run's steps to target is
the first evaluated step at or above it (so it is known to ``--eval-every`` steps); its
samples are steps x batch, its seconds the training time up to that step from
metrics.jsonl's ``samples_per_s`` (evaluations and saves left out). The goal: at 8B, at
most 0.5x the steps of SGD at B (mean over seeds of the paired ratio) at a final top-1
no worse than SGD at B's, "no worse" meaning a mean paired difference above minus one
standard error of a difference of two top-1 measured on ``--eval-samples`` samples.

Every run trains in this process (a world of one, no torchrun: a launch per run would
cost more than most runs here), its console lines written to its temporary run folder. Rows go to
``<name>.rows.jsonl`` as runs finish; a re-run skips the runs already there, so a study
cut short (``--time-budget``: no run starts that would end past it, judged by the
slowest comparable run so far) continues where it stopped. ``benchmarks/results/<name>.json``
holds the environment, the rows of both phases, the sweep's choices and the summary;
``<name>.png`` held-out top-1 against steps, samples and training seconds per run, and the
sweep. ``ms``, ``floor_ms``, ``ratio``: the median training step, its FLOP floor (3x the
backbone's forward FLOPs plus the head's 8 G D C per step, at the bf16 matmul rate measured
here; fp32 on CPU) and their ratio; ``peak_mib`` the run's peak CUDA allocation (on CPU the
process's peak resident memory, which only grows from run to run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import DRY_RUN, metrics_rows, run_record  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    backbone_forward_flops,
    environment,
    matmul_tflops,
    print_table,
    pyplot,
    write_results,
)
from hydrahead.config import load_config  # noqa: E402

IMAGE_TASK = [
    "model.backbone=resnet18",
    "data.kind=procedural_images",
    "data.image_size=32",
    "model.embed_dim=128",
    "head.num_classes=10000",
    "optim.schedule=poly",
    "optim.poly_power=2.0",
    "optim.weight_decay=0.0001",
]
# Backbone LRs per (optimizer, batch multiple), a factor 2 apart around the usual scalings:
# SGD as quickstart's; LARS about linear in the batch (its LR moves each layer by about
# lr * trust_coefficient * ||w|| per step, times 1/(1 - momentum)); LAMB by about lr * ||w||.
# Five LRs a factor 2 apart: three were too narrow on the image task (every choice at the top).
GRIDS = {
    ("sgd", 1): (0.1, 0.2, 0.4, 0.8, 1.6),
    ("lars", 4): (1.5, 3.0, 6.0, 12.0, 24.0),
    ("lars", 8): (3.0, 6.0, 12.0, 24.0, 48.0),
    ("lamb", 4): (0.005, 0.01, 0.02, 0.04, 0.08),
    ("lamb", 8): (0.01, 0.02, 0.04, 0.08, 0.16),
}
BASE = ("sgd", 1)
RUN_OUTCOMES = ("NonFiniteError", "OutOfMemoryError")  # what an LR or a batch may do: recorded, the study goes on


def method_name(optimizer: str, multiple: int) -> str:
    return f"{optimizer} {'' if multiple == 1 else multiple}B"


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``sgd@1,lars@8`` -> [("sgd", 1), ("lars", 8)]."""
    configs = []
    for item in filter(None, text.split(",")):
        name, _, multiple = item.partition("@")
        if name not in ("sgd", "adamw", "lars", "lamb") or not multiple.isdigit() or int(multiple) < 1:
            raise ValueError(f"--runs: {item!r} is not OPTIMIZER@MULTIPLE (sgd, adamw, lars, lamb; e.g. lars@8)")
        configs.append((name, int(multiple)))
    return configs


def parse_lr_items(items: list[str], what: str) -> dict[tuple[str, int], tuple[float, ...]]:
    """``["lars@8=4,8"]`` -> {("lars", 8): (4.0, 8.0)}."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep:
            raise ValueError(f"{what}: {item!r} is not OPTIMIZER@MULTIPLE=LR[,LR...]")
        (config,) = parse_configs(key)
        out[config] = tuple(float(v) for v in values.split(",") if v)
    return out


class Study:
    """The runs of one study: their overrides, the rows file, the sweep's choices and the summary."""

    def __init__(self, args):
        self.args = args
        self.common = [*(DRY_RUN if args.dry_run else IMAGE_TASK), *args.overrides]
        self.configs = parse_configs(args.runs)
        if BASE not in self.configs:
            raise ValueError(f"--runs must include {BASE[0]}@{BASE[1]}: the target and the ratios are against it")
        self.grids = {**GRIDS, **parse_lr_items(args.grid, "--grid")}
        self.fixed_lr = {k: v[0] for k, v in parse_lr_items(args.lr, "--lr").items()}
        missing = [c for c in self.configs if c not in self.grids and c not in self.fixed_lr]
        if missing:
            raise ValueError(f"no LR grid for {', '.join(f'{o}@{k}' for o, k in missing)}: give --grid or --lr")
        cfg = load_config(args.config, self.common)
        self.cfg = cfg
        self.shape = (
            f"{cfg.model.backbone}, {cfg.data.image_size} px, C={cfg.head.num_classes}, D={cfg.model.embed_dim}, "
            f"B={args.batch}"
        )
        # Everything that makes two rows comparable; a row of another study is kept but not read.
        self.study = json.dumps(
            {
                "config": args.config,
                "common": self.common,
                "batch": args.batch,
                "steps": args.steps,
                "large_steps": args.large_steps,
                "sweep_steps": args.sweep_steps,
                "warmup": args.warmup,
                "eval_every": args.eval_every,
                "eval_samples": args.eval_samples,
                "head_lr": args.head_lr,
            },
            sort_keys=True,
        )
        self.out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
        self.rows_file = self.out_dir / f"{args.name}.rows.jsonl"
        self.records = (
            [json.loads(line) for line in self.rows_file.read_text().splitlines()] if self.rows_file.is_file() else []
        )

    # -- what one run is ------------------------------------------------------------------

    def full_steps(self, multiple: int) -> int:
        steps = self.args.steps if multiple == 1 else self.args.steps * self.args.large_steps
        return max(1, round(steps / self.args.eval_every)) * self.args.eval_every  # the last step is evaluated

    def run_spec(self, phase: str, optimizer: str, multiple: int, lr: float, seed: int) -> dict:
        full = self.full_steps(multiple)
        steps = max(1, round(full * self.args.sweep_steps)) if phase == "sweep" else full
        eval_every = steps if phase == "sweep" else self.args.eval_every
        batch = self.args.batch * multiple
        head_lr = self.args.head_lr * multiple
        overrides = [
            f"run.seed={seed}",
            f"train.global_batch={batch}",
            f"train.steps={steps}",
            f"train.eval_every={eval_every}",
            f"train.eval_samples={self.args.eval_samples}",
            f"log.every={eval_every if phase == 'full' else max(1, steps // 10)}",
            f"optim.backbone={optimizer}",
            f"optim.lr={lr!r}",
            f"optim.warmup_steps={int(self.args.warmup * steps)}",
            f"head.lr={head_lr!r}",
            "checkpoint.every=0",
            "log.progress=false",
        ]
        return {
            "study": self.study,
            "phase": phase,
            "method": method_name(optimizer, multiple),
            "optimizer": optimizer,
            "multiple": multiple,
            "global_batch": batch,
            "lr": lr,
            "head_lr": head_lr,
            "seed": seed,
            "schedule_steps": steps,
            "eval_every": eval_every,
            "shape": f"{self.shape}, G={batch}, {steps} steps",
            "overrides": [*self.common, *overrides],
        }

    def done(self, spec: dict) -> bool:
        # A run that diverged is done too: it would diverge again (delete its row to retry it).
        keys = ("study", "phase", "method", "lr", "seed")
        return any(all(r.get(k) == spec[k] for k in keys) for r in self.records)

    def rows(self, phase: str) -> list[dict]:
        return [r for r in self.records if r.get("study") == self.study and r["phase"] == phase and not r.get("note")]

    # -- the sweep's choice -----------------------------------------------------------------

    def choices(self) -> list[dict]:
        """Per configuration: the LR its full runs take, and the sweep behind it."""
        out = []
        for optimizer, multiple in self.configs:
            method = method_name(optimizer, multiple)
            if (optimizer, multiple) in self.fixed_lr:
                out.append({"method": method, "lr": self.fixed_lr[optimizer, multiple], "source": "--lr"})
                continue
            grid = self.grids[optimizer, multiple]
            tried = {
                r["lr"]: r
                for r in self.records
                if r.get("study") == self.study and r["phase"] == "sweep" and r["method"] == method
            }
            if not all(lr in tried for lr in grid):
                out.append({"method": method, "lr": None, "source": f"sweep incomplete ({len(tried)}/{len(grid)})"})
                continue
            scores = {lr: tried[lr].get("eval_top1") for lr in grid}
            valid = {lr: top1 for lr, top1 in scores.items() if top1 is not None}
            best = max(valid, key=valid.get) if valid else None
            out.append(
                {
                    "method": method,
                    "lr": best,
                    "source": "sweep" if best is not None else "sweep: every LR failed",
                    "sweep_top1": {str(lr): top1 for lr, top1 in scores.items()},
                    "at_edge": best is not None and len(grid) > 1 and best in (min(grid), max(grid)),
                }
            )
        return out

    # -- running ------------------------------------------------------------------------------

    def append(self, row: dict) -> None:
        self.records.append(row)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.rows_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def train_in_process(config: str, overrides: list[str], env) -> dict:
    """One training run in this process: its run_record, training-time curve and step time, or a note."""
    from hydrahead.train.trainer import Trainer

    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        cfg = load_config(config, [f"run.dir={run_dir}", *overrides])
        started = time.perf_counter()
        log = run_dir / "console.log"
        try:
            with log.open("w") as out, contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notes, once per run
                Trainer(cfg, env).train()
        except Exception as e:
            if type(e).__name__ not in RUN_OUTCOMES:
                raise
            return {"note": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
        wall_s = time.perf_counter() - started
        rows = metrics_rows(run_dir)
    record = run_record(rows)
    # Training seconds up to each logged step: the logged intervals, evaluation and saves excluded.
    curve, total, last, per_step = [], 0.0, 0, []
    for r in (r for r in rows if "samples_per_s" in r):
        seconds = (r["step"] - last) * cfg.train.global_batch / r["samples_per_s"]
        total += seconds
        if last > 0:  # the first interval holds the first step's one-time costs
            per_step.append(1e3 * seconds / (r["step"] - last))
        curve.append([r["step"], total])
        last = r["step"]
    record.update(train_s_curve=curve, train_s=total, wall_s=wall_s)
    record["step_ms"] = statistics.median(per_step) if per_step else (1e3 * total / last if last else None)
    return record


def step_floor_ms(cfg, tflops: float) -> float:
    """FLOPs of one training step (backbone forward + backward, the head's 8 G D C) at ``tflops``."""
    flops = 3 * backbone_forward_flops(cfg) * cfg.train.global_batch
    flops += 8 * cfg.train.global_batch * cfg.model.embed_dim * cfg.head.num_classes
    return flops / (tflops * 1e12) * 1e3


def warm_up(study: Study, env) -> None:
    """A few discarded steps at each batch, so no timed run pays the first kernels' compilation."""
    print("warm-up: 3 untimed steps and an evaluation at each batch", flush=True)
    for multiple in sorted({k for _, k in study.configs}):
        spec = study.run_spec("sweep", *BASE, 0.1, 0)
        short = ["train.steps=3", "train.eval_every=3", "log.every=1", "optim.warmup_steps=0"]
        train_in_process(
            study.args.config, [*spec["overrides"], f"train.global_batch={study.args.batch * multiple}", *short], env
        )


class Budget:
    """No run starts that would end past ``seconds``, judged by the slowest comparable run so far."""

    def __init__(self, seconds: float):
        self.seconds, self.started, self.rates = seconds, time.monotonic(), {}

    def allows(self, spec: dict) -> bool:
        # Seconds per step at this batch and optimizer; else per sample at any (an over-estimate for larger batches).
        same = self.rates.get((spec["optimizer"], spec["global_batch"]))
        if same is not None:
            estimate = same * spec["schedule_steps"]
        elif self.rates:
            per_sample = max(rate / batch for (_, batch), rate in self.rates.items())
            estimate = per_sample * spec["global_batch"] * spec["schedule_steps"]
        else:
            estimate = 0.0
        return time.monotonic() - self.started + estimate <= self.seconds

    def record(self, spec: dict, wall_s: float) -> None:
        key = (spec["optimizer"], spec["global_batch"])
        self.rates[key] = max(self.rates.get(key, 0.0), wall_s / spec["schedule_steps"])


def run_phase(study: Study, phase: str, specs: list[dict], env, budget: Budget, floors: dict) -> bool:
    """Run the specs not yet done; False when the budget stopped the phase early."""
    todo = [s for s in specs if not study.done(s)]
    print(f"== {phase}: {len(specs) - len(todo)} of {len(specs)} runs done, {len(todo)} to run", flush=True)
    for spec in todo:
        if not budget.allows(spec):
            print(
                f"--time-budget {study.args.time_budget:g} s: {phase} runs from {spec['method']} lr {spec['lr']:g} "
                f"seed {spec['seed']} on are left for a re-run",
                file=sys.stderr,
            )
            return False
        print(
            f"-- {phase} {spec['method']} (G={spec['global_batch']}) lr {spec['lr']:g} seed {spec['seed']}", flush=True
        )
        result = train_in_process(study.args.config, spec["overrides"], env)
        floor = floors.get(spec["global_batch"])
        if floor is None:
            floor = floors[spec["global_batch"]] = step_floor_ms(
                load_config(study.args.config, spec["overrides"]), floors["tflops"]
            )
        ms = result.get("step_ms")
        row = {**spec, "ms": ms, "floor_ms": floor, "ratio": ms / floor if ms else None, **result}
        if "wall_s" in result:
            budget.record(spec, result["wall_s"])
        print(
            f"   top-1 {row.get('eval_top1')}, {ms and round(ms, 2)} ms/step, {round(row.get('wall_s', 0), 1)} s"
            + (f", {row['note']}" if row.get("note") else ""),
            flush=True,
        )
        study.append(row)
    return True


# -- the summary ---------------------------------------------------------------------------------


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def steps_to(target: float, eval_curve: list) -> int | None:
    """The first evaluated step whose held-out top-1 is at or above ``target``."""
    return next((step for step, top1 in eval_curve if top1 >= target), None)


def seconds_at(step: int, curve: list) -> float | None:
    """Training seconds at ``step`` from a run's (step, cumulative seconds) curve."""
    return next((seconds for s, seconds in curve if s >= step), None)


def summarize(study: Study) -> tuple[list[dict], dict]:
    """Per method: final top-1, steps / samples / seconds to target, paired ratios to SGD at B; and the verdict."""
    args, chosen = study.args, {c["method"]: c["lr"] for c in study.choices()}
    # Full runs at the LR the sweep chooses now (a widened grid may choose another).
    rows = [r for r in study.rows("full") if r["lr"] == chosen.get(r["method"])]
    base = {r["seed"]: r for r in rows if r["method"] == method_name(*BASE) and r.get("eval_top1") is not None}
    if args.target is not None:
        targets = {r["seed"]: args.target for r in rows}
    else:
        targets = {seed: args.target_fraction * r["eval_top1"] for seed, r in base.items()}
    for r in rows:
        target = targets.get(r["seed"])
        r["target_top1"] = target
        r["steps_to_target"] = steps_to(target, r["eval_curve"]) if target is not None else None
        reached = r["steps_to_target"]
        r["samples_to_target"] = reached * r["global_batch"] if reached else None
        r["train_s_to_target"] = seconds_at(reached, r["train_s_curve"]) if reached else None

    summary = []
    for optimizer, multiple in study.configs:
        method = method_name(optimizer, multiple)
        group = [r for r in rows if r["method"] == method and r.get("eval_top1") is not None]
        if not group:
            continue
        reached = [r for r in group if r["steps_to_target"] is not None]
        paired = [r for r in group if r["seed"] in base]
        ratios = [
            r["steps_to_target"] / base[r["seed"]]["steps_to_target"]
            for r in paired
            if r["steps_to_target"] and base[r["seed"]]["steps_to_target"]
        ]
        diffs = [r["eval_top1"] - base[r["seed"]]["eval_top1"] for r in paired]
        top1 = [r["eval_top1"] for r in group]

        def mean(key, rs=reached):
            values = [r[key] for r in rs if r.get(key) is not None]
            return statistics.mean(values) if values else None

        summary.append(
            {
                "method": method,
                "optimizer": optimizer,
                "global_batch": args.batch * multiple,
                "lr": group[0]["lr"],
                "seeds": len(group),
                "reached": f"{len(reached)}/{len(group)}",
                "final_top1": statistics.mean(top1),
                "final_top1_stdev": statistics.stdev(top1) if len(top1) > 1 else None,
                "final_vs_sgd_b": statistics.mean(diffs) if diffs else None,
                "steps_to_target": mean("steps_to_target"),
                "samples_to_target": mean("samples_to_target"),
                "train_s_to_target": mean("train_s_to_target"),
                # Only seeds where both reached the target; "reached" says how many there were.
                "steps_ratio": statistics.mean(ratios) if len(ratios) == len(group) else None,
                "steps_ratio_seeds": ratios,
                "step_ms": median_or_none([r.get("ms") for r in group]),
                "schedule_steps": group[0]["schedule_steps"],
            }
        )
    return summary, verdict(summary, targets, args)


def verdict(summary: list[dict], targets: dict, args) -> dict:
    """The goal (at 8B: steps ratio <= 0.5 at a final top-1 no worse than SGD at B) and who meets it."""
    base = next((s for s in summary if s["method"] == method_name(*BASE)), None)
    p = base["final_top1"] if base else 0.5
    tolerance = math.sqrt(2 * p * (1 - p) / args.eval_samples)  # one standard error of a top-1 difference
    met = []
    for s in summary:
        if s["method"] == method_name(*BASE):
            continue
        s["meets_goal"] = (
            s["steps_ratio"] is not None
            and s["steps_ratio"] <= args.goal_ratio
            and s["final_vs_sgd_b"] is not None
            and s["final_vs_sgd_b"] >= -tolerance
        )
        if s["meets_goal"]:
            met.append(s["method"])

    def outcome(s):
        ratio = "target not reached in every seed" if s["steps_ratio"] is None else f"{s['steps_ratio']:.2f}x steps"
        diff = "" if s["final_vs_sgd_b"] is None else f", final {100 * s['final_vs_sgd_b']:+.2f} points"
        return f"{s['method']} {ratio}{diff}"

    at_8b = [s for s in summary if s["global_batch"] == 8 * args.batch]
    text = f"goal {'met' if any(s['meets_goal'] for s in at_8b) else 'not met'} at 8B"
    text += f" ({'; '.join(outcome(s) for s in at_8b)})" if at_8b else " (no 8B run finished)"
    if not any(s["meets_goal"] for s in at_8b):
        others = [s for s in summary if s["method"] != method_name(*BASE) and s["steps_ratio"] is not None]
        if met:
            text += f"; met by {', '.join(met)}"
        elif others:
            text += f"; met by no run, fewest steps: {outcome(min(others, key=lambda s: s['steps_ratio']))}"
    return {
        "goal": f"at 8B: steps to target <= {args.goal_ratio} x SGD at B's, final top-1 no worse (tolerance "
        f"{100 * tolerance:.2f} points: one standard error of a difference on {args.eval_samples:,} samples)",
        "targets": {str(seed): t for seed, t in sorted(targets.items())},
        "tolerance": tolerance,
        "met_by": met,
        "text": text,
    }


def write_report(study: Study, tflops: float | None) -> None:
    args = study.args
    summary, goal = summarize(study)
    payload = {
        **environment(),
        "benchmark": args.name,
        "config": args.config,
        "common_overrides": study.common,
        "batch": args.batch,
        "eval_samples": args.eval_samples,
        "target": f"{args.target} held-out top-1 for every seed"
        if args.target is not None
        else f"{args.target_fraction} x the final held-out top-1 of SGD at B, per seed",
        "matmul_tflops": tflops,
        "floor": "3x the backbone's forward FLOPs plus the head's 8*G*D*C per step, at the matmul rate measured "
        "in this run (bf16 on GPU, fp32 on CPU)",
        "what": "steps, samples and training seconds to a held-out top-1 target: SGD at B against LARS and LAMB "
        "at 4B and 8B with warm-up and poly decay, LRs from a short sweep",
        "sweep": study.choices(),
        "summary": summary,
        "goal": goal,
        "rows": [r for r in study.records if r.get("study") == study.study and not r.get("note")],
        "failed": [
            {k: r.get(k) for k in ("phase", "method", "lr", "seed", "note")}
            for r in study.records
            if r.get("study") == study.study and r.get("note")
        ],
    }
    path = write_results(args.name, payload)
    plot(payload, path.with_suffix(".png"))
    print(f"\nwrote {path}")
    for choice in payload["sweep"]:
        edge = " (at the edge of its grid: widen it)" if choice.get("at_edge") else ""
        print(f"sweep: {choice['method']} lr {choice['lr']} from {choice['source']}{edge}")
    for fail in payload["failed"]:
        print(f"failed: {fail['phase']} {fail['method']} lr {fail['lr']} seed {fail['seed']}: {fail['note']}")
    print(f"target: {payload['target']}; {goal['goal']}")
    print(goal["text"])
    if not summary:
        print("no full run finished yet")
        return
    print()
    print_table(
        summary,
        [
            "method",
            "global_batch",
            "lr",
            "seeds",
            "final_top1",
            "final_vs_sgd_b",
            "reached",
            "steps_to_target",
            "steps_ratio",
            "samples_to_target",
            "train_s_to_target",
            "step_ms",
        ],
    )


def plot(payload: dict, png: Path) -> None:
    """Held-out top-1 against steps, samples and training seconds (a line per run), and the sweep."""
    plt = pyplot()
    rows = [r for r in payload["rows"] if r["phase"] == "full" and r.get("eval_curve")]
    sweep = [r for r in payload["rows"] if r["phase"] == "sweep" and r.get("eval_top1") is not None]
    if plt is None or not (rows or sweep):
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    methods = list(dict.fromkeys([s["method"] for s in payload["summary"]] + [r["method"] for r in rows + sweep]))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    targets = list(payload["goal"]["targets"].values())
    labelled = set()
    for r in rows:
        steps, top1 = zip(*r["eval_curve"])
        seconds = {s: t for s, t in r["train_s_curve"]}
        label = None if r["method"] in labelled else f"{r['method']} (G={r['global_batch']}, lr {r['lr']:g})"
        labelled.add(r["method"])
        style = dict(color=colours[r["method"]], alpha=0.8, linewidth=1)
        axes[0, 0].plot(steps, [100 * v for v in top1], label=label, **style)
        axes[0, 1].plot([s * r["global_batch"] for s in steps], [100 * v for v in top1], **style)
        timed = [(seconds[s], v) for s, v in r["eval_curve"] if s in seconds]
        if timed:
            axes[1, 0].plot([t for t, _ in timed], [100 * v for _, v in timed], **style)
    for ax, xlabel in zip(axes.flat[:3], ("step", "samples", "training seconds (evaluation excluded)")):
        if targets:
            ax.axhline(100 * statistics.mean(targets), color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out top-1 (%), {payload['eval_samples']:,} samples")
        ax.grid(alpha=0.3)
    if rows:
        axes[0, 0].legend(fontsize=7, title="dashed: target (mean over seeds)", title_fontsize=7)
    sweep_ax = axes[1, 1]
    for method in dict.fromkeys(r["method"] for r in sweep):
        points = sorted((r["lr"], 100 * r["eval_top1"]) for r in sweep if r["method"] == method)
        sweep_ax.plot(*zip(*points), marker="o", color=colours[method], label=method)
    sweep_ax.set_xscale("log")
    sweep_ax.set_xlabel("backbone LR (sweep, short horizon)")
    sweep_ax.set_ylabel("final held-out top-1 (%)")
    sweep_ax.grid(alpha=0.3)
    if sweep:
        sweep_ax.legend(fontsize=7)
    fig.suptitle(f"{payload['benchmark']}: {payload['goal']['text']}\n{payload['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="training config the runs start from")
    parser.add_argument("--phase", choices=("both", "sweep", "full", "report"), default="both", help="what to run")
    parser.add_argument(
        "--runs", default="sgd@1,lars@4,lars@8,lamb@4,lamb@8", help="OPTIMIZER@MULTIPLE of the batch, comma-separated"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values of the full runs")
    parser.add_argument("--sweep-seed", type=int, default=0, help="run.seed of the sweep's runs")
    parser.add_argument("--batch", type=int, default=512, help="B, the batch of SGD; the others run at multiples")
    parser.add_argument("--steps", type=int, default=800, help="steps of SGD at B's full run")
    parser.add_argument("--large-steps", type=float, default=0.5, help="steps of a larger batch's run, x --steps")
    parser.add_argument("--sweep-steps", type=float, default=0.25, help="a sweep run's steps, x its full run's")
    parser.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, a fraction of each run's steps")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations of the full runs")
    parser.add_argument("--eval-samples", type=int, default=10000, help="held-out samples per evaluation")
    parser.add_argument("--head-lr", type=float, default=0.5, help="the head's SGD LR at B (x batch / B at larger)")
    parser.add_argument("--target-fraction", type=float, default=0.95, help="target: this x SGD at B's final top-1")
    parser.add_argument("--target", type=float, help="an absolute held-out top-1 target for every seed instead")
    parser.add_argument("--goal-ratio", type=float, default=0.5, help="the goal's steps ratio at 8B")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="OPT@K=LR,LR", help="a sweep grid in place of GRIDS' one"
    )
    parser.add_argument(
        "--lr", action="append", default=[], metavar="OPT@K=LR", help="fix a configuration's LR (no sweep for it)"
    )
    parser.add_argument("--time-budget", type=float, default=480, help="seconds after which no further run starts")
    parser.add_argument("--name", default="large_batch", help="results file name (without .json)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU-sized: an MLP on procedural features, batch 16, 16 steps, evaluations on 64 samples",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.dry_run:
        for key, value in dict(batch=16, steps=16, eval_every=2, eval_samples=64).items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if not (args.large_steps > 0 and 0 < args.sweep_steps <= 1 and 0 <= args.warmup < 1):
        parser.error("--large-steps must be > 0, --sweep-steps in (0, 1], --warmup in [0, 1)")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s]
        args.study = Study(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def run(study: Study, env) -> float:
    """The phases the arguments ask for, the sweep first; each stops at the time budget."""
    args = study.args
    tflops = matmul_tflops(env.device)
    floors = {"tflops": tflops}
    budget = Budget(args.time_budget)
    warm_up(study, env)
    if args.phase in ("both", "sweep"):
        specs = [
            study.run_spec("sweep", o, k, lr, args.sweep_seed)
            for o, k in study.configs
            if (o, k) not in study.fixed_lr
            for lr in study.grids[o, k]
        ]
        if not run_phase(study, "sweep", specs, env, budget, floors):
            return tflops
    if args.phase in ("both", "full"):
        chosen = {c["method"]: c["lr"] for c in study.choices()}
        for seed in args.seed_list:
            specs = []
            for o, k in study.configs:
                lr = chosen[method_name(o, k)]
                if lr is None:
                    print(f"{method_name(o, k)}: no LR yet (run --phase sweep, or give --lr {o}@{k}=LR)")
                    continue
                specs.append(study.run_spec("full", o, k, lr, seed))
            if not run_phase(study, f"full seed {seed}", specs, env, budget, floors):
                break
    return tflops


def main(argv=None) -> None:
    args = parse_args(argv)
    tflops = None
    if args.phase != "report":
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            sys.exit("large_batch.py trains on one device in its own process: run it with python, not torchrun")
        from hydrahead.distributed.setup import destroy_distributed, init_distributed

        env = init_distributed("auto")
        try:
            tflops = run(args.study, env)
        finally:
            destroy_distributed()
    write_report(args.study, tflops)


if __name__ == "__main__":
    main()
