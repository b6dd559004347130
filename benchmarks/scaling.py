r"""Scaling studies: a grid of training runs over GPU counts, configs, options and transports.

    python benchmarks/scaling.py --gpus 1,2,4 --config configs/resnet50_1m.yaml \
        --axis head.impl=reference,triton --axis comm.overlap=false,true --baseline
    python benchmarks/scaling.py --name head_tax --gpus 4 --config configs/resnet50_100m_fp8.yaml \
        --axis head.num_classes=10000000,100000000 --baseline --per-gpu-batch 256
    python benchmarks/scaling.py ... --dry-run        # print the grid and what is already done

The grid is the product of ``--gpus``, ``--config`` (repeatable), ``--transports`` and every
``--axis KEY=V1,V2`` (any config key). ``--baseline`` adds, per (GPU count, config,
transport), the same backbone, DDP and optimizer with no head: the "backbone alone" that
the head's cost is measured against. Each point runs the real trainer's step under
torchrun (benchmarks/train_throughput.py, one GPU without torchrun; one launch per GPU
count, config, transport and mode measures all its pending option sets in turn). By default the per-GPU batch is fixed
(``--per-gpu-batch``, weak scaling: the global batch grows with the GPU count);
``--global-batch N`` fixes the global batch instead (strong scaling: each of n GPUs takes
N / n samples, and its rows' method names say so). Either way the scaling efficiency is
samples/s per GPU against the same study's point with the fewest GPUs.

Rows are appended to ``<name>.rows.jsonl`` as each run finishes, and a re-run skips the
points already there: an interrupted study continues where it stopped, and a failed
launch loses only its own points. ``--repeats R`` measures every point R times, the
whole grid once before any point a second time (so a drift in the machine's speed
touches every point alike); a point's row then holds the median of each figure over its
repeats and every repeat's ms (``ms_repeats``): step times of the same run can differ by
several percent from launch to launch. After the runs, ``<name>.csv``, ``<name>.json`` and
``<name>.png`` are rewritten from all rows: samples/s, scaling efficiency (samples/s per
GPU against the fewest GPUs measured), share of the backbone-only samples/s, the step
split into backbone / head / exposed communication, peak memory of the busiest GPU,
payload bytes per step and per rank, and the floor: the backbone's training FLOPs (3x its
forward) plus the head's 6·G·D·(rows scored) per GPU, at the matmul rate measured in this
run (bf16 on GPUs, fp32 on CPUs).

Transports: ``nvlink`` (NCCL's defaults), ``socket`` (NCCL with P2P, SHM and IB off: the
stand-in for a network between nodes) and, on CPUs, ``gloo``. One GPU has none.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    SOCKET_ENV,
    backbone_forward_flops,
    environment,
    launcher,
    matmul_tflops,
    print_table,
    pyplot,
    write_results,
)
from hydrahead.config import ConfigError, load_config  # noqa: E402

HERE = Path(__file__).resolve().parent
TRANSPORTS = ("nvlink", "socket", "gloo")
# Options that only steer the head: a backbone-only point drops them (and is measured once).
HEAD_ONLY_KEYS = ("head.", "comm.overlap", "comm.micro_batches")
COMM_KINDS = ("feature_gather", "grad_scatter", "backbone_allreduce")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the grid."""

    config: str
    gpus: int
    transport: str
    mode: str  # "full" or "backbone"
    options: tuple[tuple[str, str], ...] = ()
    per_gpu_batch: int = 256
    scaling: str = "weak"  # "weak": the per-GPU batch is the study's; "strong": the global batch is

    @property
    def variant(self) -> str:
        """The options as one name (``key:value;key:value``), which train_throughput.py records."""
        return ";".join(f"{k}:{v}" for k, v in self.options) or "default"

    @property
    def key(self) -> tuple:
        return (self.config, self.gpus, self.transport, self.mode, self.variant, self.per_gpu_batch, self.scaling)

    @property
    def launch(self) -> tuple:
        """Points that share a key here share one torchrun launch."""
        return (self.config, self.gpus, self.transport, self.mode, self.per_gpu_batch, self.scaling)


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2``: a config key and its values (a value may hold neither ',' nor ';')."""
    key, sep, values = text.partition("=")
    items = [v for v in values.split(",") if v]
    if not sep or not key or not items or "." not in key:
        raise ValueError(
            f"--axis {text!r}: expected KEY=VALUE[,VALUE...] with a dotted config key, e.g. head.impl=reference,triton"
        )
    if any(";" in v or "=" in v for v in items):
        raise ValueError(f"--axis {text!r}: values may not contain ';' or '='")
    return key, items


def expand_grid(
    configs: list[str],
    gpus: list[int],
    transports: list[str],
    axes: list[tuple[str, list[str]]],
    *,
    baseline: bool,
    per_gpu_batch: int = 256,
    global_batch: int | None = None,
) -> list[Point]:
    """Every point of the grid, in run order, without duplicates. One GPU has transport "none".
    ``global_batch`` (strong scaling) gives each of n GPUs global_batch / n samples."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"an --axis key appears twice: {keys}")
    if global_batch is not None:
        uneven = [n for n in gpus if global_batch % n]
        if global_batch < 1 or uneven:
            raise ValueError(
                f"--global-batch {global_batch} must split evenly over every GPU count; it does not over {uneven}"
            )
    elif per_gpu_batch < 1:
        raise ValueError(f"--per-gpu-batch must be >= 1, got {per_gpu_batch}")
    scaling = "strong" if global_batch is not None else "weak"
    option_sets = [tuple(zip(keys, values)) for values in itertools.product(*(v for _, v in axes))]
    points: dict[tuple, Point] = {}
    for config, n in itertools.product(configs, gpus):
        batch = global_batch // n if global_batch is not None else per_gpu_batch
        for transport in transports if n > 1 else ["none"]:
            for options in option_sets:
                if baseline:
                    kept = tuple((k, v) for k, v in options if not k.startswith(HEAD_ONLY_KEYS))
                    point = Point(config, n, transport, "backbone", kept, batch, scaling)
                    points.setdefault(point.key, point)
                point = Point(config, n, transport, "full", options, batch, scaling)
                points.setdefault(point.key, point)
    return list(points.values())


def check_grid(points: list[Point], overrides: list[str]) -> None:
    """Resolve every point's config now, so a bad key fails before the first launch."""
    for point in points:
        try:
            load_config(point.config, [*overrides, *(f"{k}={v}" for k, v in point.options)])
        except (ConfigError, OSError, ValueError) as e:
            raise ValueError(f"{point.config} with {point.variant}: {e}") from e


def read_records(rows_file: Path) -> list[dict]:
    if not rows_file.is_file():
        return []
    return [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]


def record_key(r: dict) -> tuple:
    """A record's point (as ``Point.key``); rows written before strong scaling are weak."""
    return (
        r["config"],
        r["world_size"],
        r["transport"],
        r["mode"],
        r["variant"],
        r["per_gpu_batch"],
        r.get("scaling", "weak"),
    )


def merge_repeats(records: list[dict]) -> list[dict]:
    """One record per point: the median over its repeats of every float figure, samples/s
    from the median ms, ``repeats`` and ``ms_repeats`` (in repeat order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(record_key(r), []).append(r)
    merged = []
    for group in groups.values():
        group.sort(key=lambda r: r.get("repeat", 0))
        out = {k: v for k, v in group[0].items() if k != "repeat"}
        for k, v in group[0].items():
            if isinstance(v, float) and all(isinstance(r.get(k), float) for r in group):
                out[k] = statistics.median(r[k] for r in group)
        out["samples_per_s"] = out["global_batch"] / out["ms"] * 1e3
        out["repeats"], out["ms_repeats"] = len(group), [r["ms"] for r in group]
        merged.append(out)
    return merged


def run_launch(points: list[Point], args, rows_file: Path, repeat: int = 0) -> bool:
    """One torchrun of train_throughput.py measuring ``points`` (same config, GPU count, transport, mode)."""
    first = points[0]
    with tempfile.TemporaryDirectory(prefix="hydrahead_scaling_") as run_dir:
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", **(SOCKET_ENV if first.transport == "socket" else {})}
        prefix, env = launcher(first.gpus, env)
        cmd = [
            sys.executable,
            *prefix,
            str(HERE / "train_throughput.py"),
            "--config",
            first.config,
            "--mode",
            first.mode,
            "--per-gpu-batch",
            str(first.per_gpu_batch),
            "--scaling",
            first.scaling,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--timed-steps",
            str(args.timed_steps),
            "--out",
            str(rows_file),
            "--repeat",
            str(repeat),
            *[f"--variant={p.variant}={','.join(f'{k}={v}' for k, v in p.options)}" for p in points],
            f"run.dir={run_dir}",
            *args.overrides,
        ]
        return subprocess.run(cmd, env=env).returncode == 0


def _waited(r: dict, *kinds: str) -> float:
    return sum(r.get(f"ms_{kind}_waited", 0.0) for kind in kinds)


def derive_rows(records: list[dict], overrides: list[str], tflops: float) -> list[dict]:
    """The results rows: each record with its floor, efficiency, head tax and step breakdown."""
    flops_cache: dict[tuple, float] = {}

    def train_flops_per_sample(r: dict) -> float:
        options = (
            tuple(tuple(item.split(":", 1)) for item in r["variant"].split(";")) if r["variant"] != "default" else ()
        )
        key = (r["config"], options)
        if key not in flops_cache:
            cfg = load_config(r["config"], [*overrides, *(f"{k}={v}" for k, v in options)])
            flops_cache[key] = 3 * backbone_forward_flops(cfg)
        return flops_cache[key]

    def study(r: dict) -> tuple:
        """The points one efficiency curve runs through: a weak "
        "study keeps the per-GPU batch, a strong one the global."""
        scaling = r.get("scaling", "weak")
        return (
            r["config"],
            r["mode"],
            r["variant"],
            scaling,
            r["global_batch"] if scaling == "strong" else r["per_gpu_batch"],
        )

    fewest = {}
    for r in records:
        if study(r) not in fewest or r["world_size"] < fewest[study(r)]["world_size"]:
            fewest[study(r)] = r
    rows = []
    for r in records:
        n, full = r["world_size"], r["mode"] == "full"
        scored = (r.get("active_classes") or r["num_classes"] / n) if full else 0.0
        floor_ms = (
            (r["per_gpu_batch"] * train_flops_per_sample(r) + 6 * r["global_batch"] * r["embed_dim"] * scored)
            / (tflops * 1e12)
            * 1e3
        )
        base = fewest[study(r)]
        backbone = None
        if full:
            kept = (
                ";".join(item for item in r["variant"].split(";") if not item.startswith(HEAD_ONLY_KEYS)) or "default"
            )
            backbone = next(
                (
                    b
                    for b in records
                    if b["mode"] == "backbone"
                    and b["variant"] == kept
                    and (b["config"], b["world_size"], b["transport"], b["per_gpu_batch"])
                    == (r["config"], n, r["transport"], r["per_gpu_batch"])
                ),
                None,
            )
        head_ms = r.get("head_ms", 0.0) if full else 0.0
        exposed_head = _waited(r, "feature_gather", "grad_scatter")
        exposed_allreduce = _waited(r, "backbone_allreduce")
        rows.append(
            {
                "method": (f"hydrahead {r['variant']}" if full else f"{r['backbone']} backbone only")
                + (f" [strong, global batch {r['global_batch']}]" if r.get("scaling") == "strong" else ""),
                "scaling": r.get("scaling", "weak"),
                "config": r["config"],
                "mode": r["mode"],
                "variant": r["variant"],
                "gpus": n,
                "transport": r["transport"],
                "shape": f"{n} x {r['per_gpu_batch']} x {r['backbone']}, C={r['num_classes']:,}, D={r['embed_dim']}",
                "num_classes": r["num_classes"],
                "per_gpu_batch": r["per_gpu_batch"],
                "global_batch": r["global_batch"],
                "ms": r["ms"],
                "repeats": r.get("repeats", 1),
                "ms_repeats": r.get("ms_repeats", [r["ms"]]),
                "floor_ms": floor_ms,
                "ratio": r["ms"] / floor_ms,
                "peak_mib": r["peak_mib"],
                "samples_per_s": r["samples_per_s"],
                "samples_per_s_per_gpu": r["samples_per_s"] / n,
                "scaling_efficiency": (r["samples_per_s"] / n) / (base["samples_per_s"] / base["world_size"]),
                "scaling_base_gpus": base["world_size"],
                "vs_backbone": r["samples_per_s"] / backbone["samples_per_s"] if backbone else None,
                # The step split (ms): the head's exchanges and compute, the all-reduce the backbone waited
                # for, and the rest of the step (backbone forward, backward, optimizers).
                "backbone_ms": max(0.0, r["ms"] - head_ms - exposed_allreduce),
                "head_ms": max(0.0, head_ms - exposed_head),
                "comm_ms": exposed_head + exposed_allreduce,
                "comm_busy_ms": sum(r.get(f"ms_{kind}", 0.0) for kind in COMM_KINDS),
                "bytes_per_step": sum(r.get(f"bytes_{kind}", 0) for kind in COMM_KINDS),
                "grad_compression": r.get("grad_compression"),
                **{
                    k: r.get(k)
                    for k in ("head_impl", "head_selection", "head_weight_dtype", "overlap", "active_classes")
                    if full
                },
            }
        )
    rows.sort(
        key=lambda row: (
            row["config"],
            row["num_classes"],
            row["mode"] != "backbone",
            row["variant"],
            row["gpus"],
            row["transport"],
        )
    )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(payload: dict, png: Path) -> None:
    """Four panels: samples/s and scaling efficiency against GPUs, peak memory per GPU, the step split."""
    plt = pyplot()
    rows = payload["rows"]
    if plt is None or not rows:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    # One line per (config, method, transport); the 1-GPU point (no transport) starts every line.
    transports = sorted({r["transport"] for r in rows if r["gpus"] > 1}) or ["none"]
    lines = {}
    for config, method in dict.fromkeys((r["config"], r["method"]) for r in rows):
        for transport in transports:
            pts = sorted(
                (
                    (r["gpus"], r)
                    for r in rows
                    if (r["config"], r["method"]) == (config, method)
                    and (r["gpus"] == 1 or r["transport"] == transport)
                ),
                key=lambda pt: pt[0],
            )
            if pts:
                lines[f"{Path(config).stem}: {method}" + (f" ({transport})" if len(transports) > 1 else "")] = pts
    for label, pts in lines.items():
        gpus = [g for g, _ in pts]
        for ax, key in ((axes[0, 0], "samples_per_s"), (axes[0, 1], "scaling_efficiency"), (axes[1, 0], "peak_mib")):
            ax.plot(gpus, [r[key] for _, r in pts], marker="o", label=label)
    for ax, title in (
        (axes[0, 0], "samples / s"),
        (axes[0, 1], "scaling efficiency (per GPU, vs fewest GPUs)"),
        (axes[1, 0], "peak memory per GPU (MiB)"),
    ):
        ax.set_xlabel("GPUs")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(sorted({r["gpus"] for r in rows}))
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    names = [
        f"{Path(r['config']).stem} {r['variant'] if r['mode'] == 'full' else 'backbone only'} "
        f"{r['gpus']}g x{r['per_gpu_batch']} {r['transport']}"
        for r in rows
    ]
    bottom = [0.0] * len(rows)
    for key, color in (("backbone_ms", "C0"), ("head_ms", "C1"), ("comm_ms", "C3")):
        values = [r[key] for r in rows]
        ax.barh(names, values, left=bottom, color=color, label=key.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel("ms per step")
    ax.set_title("step split (comm: exposed, not hidden behind compute)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"{payload['benchmark']} on {payload['device']}", fontsize=10)
    # The lines' legend goes under the panels, where it hides no point.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = 2 if len(labels) > 4 else 1
    legend_height = 0.025 * (-(-len(labels) // columns) + 1)
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=columns, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML config (repeatable); default configs/resnet50_1m.yaml")
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts (on CPU: gloo processes)")
    parser.add_argument(
        "--transports", help="comma-separated, from nvlink, socket, gloo (default: nvlink on GPUs, gloo on CPU)"
    )
    parser.add_argument(
        "--axis", action="append", default=[], metavar="KEY=V1,V2", help="a config key and its values (repeatable)"
    )
    parser.add_argument("--baseline", action="store_true", help="also measure each backbone with no head")
    parser.add_argument(
        "--per-gpu-batch", type=int, help="samples per GPU, the same at every GPU count (weak scaling; default 256)"
    )
    parser.add_argument("--global-batch", type=int, help="samples per step, split over the GPUs (strong scaling)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps after those with the communication clock on")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measurements of every point, the whole grid each time (rows: medians)"
    )
    parser.add_argument(
        "--name", default="scaling", help="results file stem under benchmarks/results/ ($HYDRAHEAD_RESULTS_DIR)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the grid (and which points are done) and exit")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw <name>.png from <name>.json (no runs) and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every point")
    args = parser.parse_args(argv)

    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    if args.plot_only:
        path = out_dir / f"{args.name}.json"
        if not path.is_file():
            parser.error(f"--plot-only: {path} does not exist")
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    cuda = torch.cuda.is_available()
    try:
        gpus = [int(g) for g in args.gpus.split(",") if g]
        transports = [t for t in (args.transports or ("nvlink" if cuda else "gloo")).split(",") if t]
        if not gpus or min(gpus) < 1:
            raise ValueError(f"--gpus {args.gpus!r}: expected positive counts")
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        bad = [t for t in transports if t not in TRANSPORTS or (t == "gloo") == cuda]
        if bad:
            raise ValueError(f"--transports: {bad} cannot run here; use {'nvlink, socket' if cuda else 'gloo'}")
        axes = [parse_axis(text) for text in args.axis]
        if args.per_gpu_batch is not None and args.global_batch is not None:
            raise ValueError("--per-gpu-batch (weak scaling) and --global-batch (strong scaling) exclude each other")
        points = expand_grid(
            args.config or ["configs/resnet50_1m.yaml"],
            gpus,
            transports,
            axes,
            baseline=args.baseline,
            per_gpu_batch=256 if args.per_gpu_batch is None else args.per_gpu_batch,
            global_batch=args.global_batch,
        )
        check_grid(points, args.overrides)
    except ValueError as e:
        parser.error(str(e))

    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / f"{args.name}.rows.jsonl"
    done = {(record_key(r), r.get("repeat", 0)) for r in read_records(rows_file)}
    visible = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    runnable = [p for p in points if p.gpus <= visible or not cuda]
    repeats = range(args.repeats)
    pending = [(rep, p) for rep in repeats for p in runnable if (p.key, rep) not in done]
    for p in points:
        finished = sum((p.key, rep) in done for rep in repeats)
        state = (
            ("done" if finished == args.repeats else f"{finished}/{args.repeats}" if args.repeats > 1 else "todo")
            if p in runnable
            else f"skip: {visible} GPU(s) visible"
        )
        print(f"{state:>6}  {p.gpus} x {p.transport:6} {p.mode:8} {p.config}  {p.variant}  ({p.per_gpu_batch} per GPU)")
    runs = f"{len(points)} points" + (f" x {args.repeats} repeats" if args.repeats > 1 else "")
    print(f"{runs}: {len(points) * args.repeats - len(pending)} done or skipped, {len(pending)} to run -> {rows_file}")
    if args.dry_run:
        return 0

    # Repeat by repeat: the whole grid once before any point again.
    launches = list(dict.fromkeys((rep, p.launch) for rep, p in pending))
    failed = []
    for i, (rep, launch) in enumerate(launches, 1):
        group = [p for r, p in pending if (r, p.launch) == (rep, launch)]
        again = f", repeat {rep + 1}/{args.repeats}" if args.repeats > 1 else ""
        print(
            f"== [{i}/{len(launches)}] {launch[1]} x {launch[2]}, "
            f"{launch[3]}, {launch[0]}: {len(group)} point(s){again}",
            flush=True,
        )
        if not run_launch(group, args, rows_file, rep):
            failed.append((rep, group))
    measured = {(record_key(r), r.get("repeat", 0)) for r in read_records(rows_file)}
    missing = [(rep, p) for rep, group in failed for p in group if (p.key, rep) not in measured]

    records = merge_repeats(read_records(rows_file))
    if records:
        tflops = matmul_tflops("cuda" if cuda else "cpu")
        rows = derive_rows(records, args.overrides, tflops)
        payload = {
            **environment(),
            "benchmark": args.name,
            "gpus_visible": visible,
            "matmul_tflops": tflops,
            "matmul_dtype": "bf16" if cuda else "fp32",
            "overrides": args.overrides,
            "transports": {"nvlink": "NCCL defaults", "socket": SOCKET_ENV, "gloo": "gloo on CPU"},
            "what": "one training step per row, weak scaling (fixed per-GPU batch); ms: mean over --steps steps "
            "(with --repeats: the median over the repeats, each in ms_repeats); "
            "the step split and bytes: medians over steps with the communication clock on (rank 0); "
            "peak_mib: the busiest rank (GPU memory allocated, or the CPU process's peak RSS)",
            "rows": rows,
        }
        path = write_results(args.name, payload)
        write_csv(rows, path.with_suffix(".csv"))
        plot(payload, path.with_suffix(".png"))
        print(f"\nmatmul {tflops:.1f} TFLOP/s; wrote {path} (.csv, .png)")
        print_table(
            rows,
            [
                "method",
                "config",
                "gpus",
                "transport",
                "ms",
                "samples_per_s",
                "scaling_efficiency",
                "vs_backbone",
                "backbone_ms",
                "head_ms",
                "comm_ms",
                "ratio",
                "peak_mib",
            ],
        )
    if missing:
        print(f"\n{len(missing)} point(s) failed; rerun the same command to retry them:", file=sys.stderr)
        for rep, p in missing:
            print(
                f"  {p.gpus} x {p.transport} {p.mode} {p.config} {p.variant}"
                + (f" (repeat {rep + 1})" if args.repeats > 1 else ""),
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
