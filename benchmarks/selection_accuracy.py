r"""Accuracy of active-class selection: full softmax against knn, random and graph at one or more budgets.

    # The study of docs/selection.md: 1M classes in families of near-duplicates on one GPU,
    # full softmax in three storages against 1% of the rows per step, 3 seeds (about 13
    # GPU minutes, estimated; --time-budget cuts it into commands of at most ~9 minutes:
    # run the same command again until it reports nothing left)
    python benchmarks/selection_accuracy.py --config configs/head_only_1m_families.yaml \
        --name selection_accuracy_1m_families --full-storage fp32,bf16,fp8 --storage fp8 \
        --budget 0.01 --equal-rows --knn-k 8 --graph-k 12 --index-type flat --graph-index-type ivf \
        --rebuild-every 50 --random-lr-scales 0.2 --timeout 240 --time-budget 420
    python benchmarks/selection_accuracy.py head.num_classes=1000000 train.global_batch=1024 \
        train.steps=400 train.eval_every=400 train.eval_samples=50000     # quickstart's MLP, 10%
    python benchmarks/selection_accuracy.py --dry-run                     # CPU: a tiny run of each
    # one study from the result files of several runs of one task: their rows side by side,
    # one plot of top-1 against rows per step with every mode (runs nothing)
    python benchmarks/selection_accuracy.py --name selection_accuracy_1m_scale96_modes \
        --combine selection_accuracy_1m_scale96.json,selection_accuracy_1m_scale96_graph_moved_w20.json

Variants (each for every seed; see ``benchmarks/accuracy_runs.py`` for the row fields):

  hydrahead-full [storage]    head.selection=full, one per --full-storage (default: one, in
                              the config's storage)
  hydrahead-knn <budget> ...  head.selection=knn: each sample's --knn-k nearest rows per shard
                              other than its label (head.knn_skip_label, the default; pass
                              head.knn_skip_label=false to keep it) + positives, filled with
                              random rows up to head.budget (with --trim, a larger union is
                              trimmed to it: the positives, then the neighbours in rank order)
  hydrahead-random <budget>   head.selection=random (Partial FC) at the same head.budget; with
                              --random-lr-scales, also at those multiples of the head LR
  hydrahead-graph <budget> ...  head.selection=graph: each label's --graph-k nearest classes
                              in the class graph (built with the same index, rebuilt every
                              --rebuild-every steps) + positives, filled as knn

With --fill-correction, random, knn and graph add log(s) to the logits of the random rows
that fill their budget, each standing for s rows left out (head.fill_correction: sampled
softmax's correction; the reference head): their names end in "corrected".

With --search-paid-rows, knn and graph search the rows with the steps they owe paid
(head.search_paid_rows; head momentum or weight decay with --inactive-rows continue): their
names end in "paid".

Storages: fp32 (round to nearest), bf16 and fp8 (e4m3, stochastic rounding); --storage
sets the one of knn, random and graph (default: the config's).

--budget is a fraction of the shard. As such (head.budget a float) random takes every
class whose per-step priority falls below it, so it scores the positives plus that share
of the shard, while knn and graph fill their union up to exactly that share: random gets
a few more rows. --equal-rows passes ceil(budget * shard) as an int instead, so random,
knn and graph all score that many rows per step (knn or graph more only when their union
alone is larger; every row records its mean rows per step).

Rows outside a step's active set follow --inactive-rows (head.inactive_rows): continue
(full SGD's zero-gradient step, momentum goes on) or frozen (Partial FC's rule); a frozen
variant's name ends in "frozen". The knn index is the torch backend (--index-type, ivf by
default: approximate, rebuilt in the background every --rebuild-every steps), as it runs on
a GPU without faiss-gpu; --graph-index-type sets graph's apart (a flat build scores every
row against every row: 2.6e14 FLOPs at 1M x 128, at every rebuild).
Held-out top-1 is over all classes (the exact sharded top-k), whatever the selection.

--scales runs every variant at each logit scale s (head.scale) with the head LR times
s0 / s (s0 the config's), so that one sample moves its row as far at every scale; names
end in "s=<s>". The scale decides how much of full softmax's push on the negatives lands
on the few rows near a sample rather than on all the others (docs/selection.md, "The logit
scale decides whether negatives matter").

Plots: ``<name>.png`` held-out top-1 against rows scored per step (log scale; against the
logit scale with several --scales), one colour per selection and storage, each seed a dot,
the mean a marker; ``<name>_curves.png`` the loss and top-1 curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy_runs import DRY_RUN, add_arguments, run_study, summarize  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, print_table, pyplot, write_results  # noqa: E402
from hydrahead.config import load_config  # noqa: E402

MODES = ("full", "knn", "random", "graph")
STORAGES = {
    "fp32": ["head.weight_dtype=fp32", "head.rounding=nearest"],
    "bf16": ["head.weight_dtype=bf16", "head.rounding=stochastic"],
    "fp8": ["head.weight_dtype=fp8_e4m3", "head.rounding=stochastic"],
}


def storage_list(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = sorted(set(names) - set(STORAGES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown storage {unknown}; choose from {', '.join(STORAGES)}")
    return names


def budget_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v]
    if not values or any(not 0 < v <= 1 for v in values):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"budgets must be distinct, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v]
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"factors must be positive, got {text!r}")
    return values


def rows_of_budget(budget: float, num_classes: int, gpus: int) -> int:
    """A fractional budget as rows of the largest shard (the first: ceil(C / gpus) classes)."""
    return math.ceil(budget * math.ceil(num_classes / gpus))


def make_variants(args, num_classes: int, head_lr: float) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """The study's variants (name -> overrides) and each one's row fields (mode, storage, budget, lr_scale)."""
    wanted = args.methods.split(",")
    variants, fields = {}, {}
    if "full" in wanted:
        for storage in args.full_storage or [None]:
            name = "hydrahead-full" + (f" {storage}" if storage else "")
            variants[name] = ["head.selection=full", *STORAGES.get(storage, [])]
            fields[name] = {"mode": "full", "storage": storage, "budget": None, "budget_rows": None, "lr_scale": 1.0}

    frozen = " frozen" if args.inactive_rows == "frozen" else ""
    stored = f" {args.storage}" if args.storage else ""
    graph_index = args.graph_index_type or args.index_type
    # The label skip explicit, so that rows from before its default flipped (the label kept)
    # never pass for today's on a rerun; left out when the run's own overrides set it.
    skip = [] if any(o.startswith("head.knn_skip_label=") for o in args.overrides) else ["head.knn_skip_label=true"]
    paid = ["head.search_paid_rows=true"] if args.search_paid_rows else []
    paid_tail = " paid" if args.search_paid_rows else ""
    corrected = ["head.fill_correction=true"] if args.fill_correction else []
    corrected_tail = " corrected" if args.fill_correction else ""
    knn_options = [*skip, *(["head.knn_trim_to_budget=true"] if args.trim else []), *paid, *corrected]
    knn_tail = stored + frozen + (" trimmed" if args.trim else "") + paid_tail + corrected_tail
    refresh_tail = f" refresh={args.graph_refresh_every}" if args.graph_refresh_every else ""
    if args.graph_refresh_window:
        refresh_tail += f" window={args.graph_refresh_window}"
    graph_tail = refresh_tail + stored + frozen + paid_tail + corrected_tail

    def index(kind: str) -> list[str]:
        return ["head.index=torch", f"head.index_type={kind}", f"head.rebuild_every={args.rebuild_every}"]

    labels = set()
    for fraction in args.budget:  # one set of sampled variants per budget: a curve along rows per step
        budget_rows = rows_of_budget(fraction, num_classes, args.gpus)
        if args.equal_rows:
            budget, label = budget_rows, f"{budget_rows} rows"
        else:
            budget, label = fraction, f"{fraction:g}"
        if label in labels:  # its variants would replace the earlier budget's
            raise ValueError(f"--budget: {fraction:g} runs at {label}, as an earlier budget does: give distinct ones")
        labels.add(label)
        common = [
            f"head.budget={budget!r}",
            f"head.inactive_rows={args.inactive_rows}",
            *STORAGES.get(args.storage, []),
        ]
        sampled = {
            "knn": (
                f"hydrahead-knn {label} {args.index_type} k={args.knn_k} R={args.rebuild_every}{knn_tail}",
                ["head.selection=knn", *common, f"head.knn_k={args.knn_k}", *index(args.index_type), *knn_options],
            ),
            "random": (
                f"hydrahead-random {label}{stored}{frozen}{corrected_tail}",
                ["head.selection=random", *common, *corrected],
            ),
            "graph": (
                # A graph refreshed from its moved rows has no index and is never rebuilt.
                f"hydrahead-graph {label} "
                + ("moved" if args.graph_refresh_window else f"{graph_index} R={args.rebuild_every}")
                + f" k={args.graph_k}{graph_tail}",
                [
                    "head.selection=graph",
                    *common,
                    f"head.graph_k={args.graph_k}",
                    f"head.graph_refresh_every={args.graph_refresh_every}",
                    f"head.graph_refresh_window={args.graph_refresh_window}",
                    *index(graph_index),
                    *paid,
                    *corrected,
                ],
            ),
        }
        for mode in ("knn", "random", "graph"):
            if mode not in wanted:
                continue
            name, overrides = sampled[mode]
            scales = [1.0, *(args.random_lr_scales if mode == "random" else [])]
            for scale in scales:
                scaled = name + (f" lr x{scale:g}" if scale != 1.0 else "")
                variants[scaled] = overrides + ([f"head.lr={head_lr * scale!r}"] if scale != 1.0 else [])
                fields[scaled] = {
                    "mode": mode,
                    "storage": args.storage,
                    "budget": fraction,
                    "budget_rows": budget_rows,
                    "lr_scale": scale,
                }
    return variants, fields


def at_scales(args, cfg) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """``make_variants`` once per --scales entry s: head.scale=s and the head LR (and each
    random LR multiple) times s0 / s, s0 the config's scale; without --scales, as it is."""
    if not args.scales:
        return make_variants(args, cfg.head.num_classes, cfg.head_lr)
    variants, fields = {}, {}
    for scale in args.scales:
        head_lr = cfg.head_lr * cfg.head.scale / scale
        inner, inner_fields = make_variants(args, cfg.head.num_classes, head_lr)
        for name, overrides in inner.items():
            lr = head_lr * inner_fields[name]["lr_scale"]
            kept = [o for o in overrides if not o.startswith("head.lr=")]
            variants[f"{name} s={scale:g}"] = [*kept, f"head.scale={scale!r}", f"head.lr={lr!r}"]
            fields[f"{name} s={scale:g}"] = {**inner_fields[name], "scale": scale}
    return variants, fields


def curve_of(row: dict, by_scale: bool) -> str:
    """The plotted curve a row belongs to: its variant's name less what the x axis varies
    (the logit scale, or the budget), so corrected, trimmed or LR-scaled variants keep
    curves of their own."""
    words = row["method"].removeprefix("hydrahead-").split()
    if by_scale:
        return " ".join(w for w in words if not w.startswith("s="))
    if row.get("budget") is not None:  # "<mode> <n> rows ..." or "<mode> <fraction> ..."
        words = words[:1] + words[3 if words[2:3] == ["rows"] else 2 :]
    return " ".join(words)


def _count(samples) -> str:
    return f"{samples:,}" if isinstance(samples, int) else str(samples)


def plot_rows(payload: dict, png: Path) -> None:
    """Held-out top-1 against rows scored per step (or against the logit scale, when the
    rows hold several), one colour per (selection, storage)."""
    plt = pyplot()
    rows = [r for r in payload["rows"] if r.get("eval_top1") is not None and r.get("rows_per_step")]
    if plt is None or not rows:
        return
    by_scale = len({r.get("scale") for r in rows}) > 1
    x_field = "scale" if by_scale else "rows_per_step"
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(curve_of(r, by_scale), []).append(r)
    markers = {"full": "s", "knn": "o", "random": "v", "graph": "D"}
    many = len(groups) > 6  # the legend goes below the axes
    fig, ax = plt.subplots(figsize=(8.5, 4.8 + 0.22 * len(groups)) if many else (7.5, 4.8))
    for i, (key, group) in enumerate(groups.items()):
        colour = f"C{i}"
        ax.plot(
            [r[x_field] for r in group],
            [100 * r["eval_top1"] for r in group],
            ".",
            color=colour,
            alpha=0.5,
            markersize=5,
        )
        # One point per budget (per method): the means over seeds, joined along rows per step.
        points = []
        for method in dict.fromkeys(r["method"] for r in group):
            seeds = [r for r in group if r["method"] == method]
            points.append(
                (
                    statistics.mean(r[x_field] for r in seeds),
                    statistics.mean(100 * r["eval_top1"] for r in seeds),
                    len(seeds),
                )
            )
        points.sort()
        xs, ys, counts = zip(*points)
        label = f"{key}: " + ", ".join(f"{y:.2f}" for y in ys) + f" ({max(counts)} seeds)"
        ax.plot(xs, ys, marker=markers.get(key.split()[0], "o"), color=colour, label=label, markersize=8)
    if by_scale:
        ax.set_xlabel("logit scale s (head LR x s0 / s)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("rows scored per step and shard (log scale)")
    ax.set_ylabel(f"held-out top-1 (%), {_count(payload['eval_samples'])} samples")
    if many:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    else:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    shape = rows[0]["shape"]
    ax.set_title(
        f"{payload['benchmark']}: {shape}\n{payload['device']}; dots: seeds, markers: mean over seeds", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def combine(files: list[str], name: str) -> dict:
    """One study from the result files of several runs of one task (read from the results
    folder unless a path is given): their rows side by side, each naming its ``source`` file
    (a method run with other command-line overrides in another file gets them in its name);
    ``device``, ``torch`` and ``triton`` list every value the files hold."""
    folder = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    payloads = []
    for file in files:
        path = Path(file) if os.sep in file else folder / file
        if not path.is_file():
            raise SystemExit(f"selection_accuracy.py: error: --combine: no result file {path}")
        payloads.append((path.name, json.loads(path.read_text())))
    rows = [{**row, "source": source} for source, payload in payloads for row in payload["rows"]]
    # One name run with other command-line overrides (an index's probes, say) is another variant.
    runs_of: dict[str, set] = {}
    for row in rows:
        runs_of.setdefault(row["method"], set()).add(tuple(row.get("run_overrides", ())))
    for row in rows:
        runs = runs_of[row["method"]]
        if len(runs) > 1:  # named by the overrides its runs do not share
            shared = set.intersection(*(set(run) for run in runs))
            differing = [o for o in row.get("run_overrides", ()) if o not in shared]
            row["method"] += f" [{' '.join(differing) or 'no overrides'}]"
    shapes = sorted({row["shape"] for row in rows})
    if len(shapes) != 1:
        raise SystemExit(
            f"selection_accuracy.py: error: --combine: the files hold rows of {len(shapes)} tasks: {shapes}"
        )

    def every(field: str) -> str:
        return " + ".join(dict.fromkeys(str(payload.get(field)) for _, payload in payloads))

    return {
        **environment(),
        "device": every("device"),
        "torch": every("torch"),
        "triton": every("triton"),
        "benchmark": name,
        "eval_samples": every("eval_samples"),
        "combined_from": [source for source, _ in payloads],
        "what": "the rows of several runs of one task, side by side (each names its source file)",
        "summary": summarize(rows),
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget",
        type=budget_list,
        default=[0.1],
        help="head.budget of knn, random and graph, a fraction of the shard; comma-separated fractions run "
        "every sampled variant at each (the plot joins them along rows per step)",
    )
    parser.add_argument(
        "--equal-rows",
        action="store_true",
        help="pass the budget as ceil(budget * shard) rows (an int): random, knn and graph score the same rows",
    )
    parser.add_argument(
        "--trim",
        action="store_true",
        help="knn: a union larger than the budget keeps the positives and its rows in neighbour rank order up to it "
        "(head.knn_trim_to_budget), so knn scores the budget's rows too; its name ends in 'trimmed'",
    )
    parser.add_argument(
        "--fill-correction",
        action="store_true",
        help="random, knn and graph: sampled softmax's correction of the random fill (head.fill_correction); their "
        "names end in 'corrected'",
    )
    parser.add_argument(
        "--search-paid-rows",
        action="store_true",
        help="knn and graph: search the rows with the steps they owe paid (head.search_paid_rows); their names end "
        "in 'paid'",
    )
    parser.add_argument("--knn-k", type=int, default=16, help="head.knn_k")
    parser.add_argument("--graph-k", type=int, default=16, help="head.graph_k")
    parser.add_argument(
        "--graph-refresh-every",
        type=int,
        default=0,
        help="head.graph_refresh_every of graph (0: off); its name then carries 'refresh=N'",
    )
    parser.add_argument(
        "--graph-refresh-window",
        type=int,
        default=0,
        help="head.graph_refresh_window of graph (0: refreshes search the index; P: the rows refreshed in the last "
        "P refreshes and each class's neighbours, no index); its name then says 'moved' and carries 'window=P'",
    )
    parser.add_argument(
        "--index-type", default="ivf", choices=("flat", "ivf"), help="head.index_type of the torch index"
    )
    parser.add_argument(
        "--graph-index-type",
        choices=("flat", "ivf"),
        help="head.index_type of graph's builds (default: --index-type; a flat build scores every row against "
        "every row: 2.6e14 FLOPs at 1M x 128)",
    )
    parser.add_argument("--rebuild-every", type=int, default=100, help="head.rebuild_every")
    parser.add_argument(
        "--inactive-rows",
        default="continue",
        choices=("continue", "frozen"),
        help="head.inactive_rows of knn, random and graph",
    )
    parser.add_argument(
        "--methods", default="full,knn,random,graph", help="comma-separated subset of full, knn, random, graph"
    )
    parser.add_argument(
        "--full-storage",
        type=storage_list,
        default=[],
        help=f"comma-separated storages of full softmax, one variant each ({', '.join(STORAGES)}; "
        "default: the config's)",
    )
    parser.add_argument(
        "--storage", choices=tuple(STORAGES), help="storage of knn, random and graph (default: the config's)"
    )
    parser.add_argument(
        "--random-lr-scales",
        type=float_list,
        default=[],
        help="comma-separated factors of the config's head LR: one more random variant each (random's own best "
        "head LR is lower than full softmax's)",
    )
    parser.add_argument(
        "--scales",
        type=float_list,
        default=[],
        help="comma-separated logit scales (head.scale): every variant at each, its head LR times the config's "
        "scale over it; names end in 's=<s>'",
    )
    parser.add_argument(
        "--combine",
        type=lambda text: [f for f in text.split(",") if f],
        default=[],
        help="comma-separated result files of runs of one task (names in the results folder, or paths): write "
        "--name's JSON and plot from their rows, side by side; nothing runs",
    )
    add_arguments(parser, name="selection_accuracy")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(MODES))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(MODES)}")
    if len(set(args.scales)) < len(args.scales):
        parser.error(f"--scales must be distinct, got {args.scales}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.combine:
        payload = combine(args.combine, args.name)
        path = write_results(args.name, payload)
        plot_rows(payload, path.with_suffix(".png"))
        print(f"wrote {path}")
        columns = ["method", "seeds", "eval_top1_mean", "eval_top1_spread", "rows_per_step_mean", "graph_recall_mean"]
        print_table(payload["summary"], columns)
        return
    cfg = load_config(args.config, [*(DRY_RUN if args.dry_run else []), *args.overrides])
    try:
        variants, fields = at_scales(args, cfg)
    except ValueError as error:
        raise SystemExit(f"selection_accuracy.py: error: {error}") from None
    if args.equal_rows:
        rows = ", ".join(str(rows_of_budget(b, cfg.head.num_classes, args.gpus)) for b in args.budget)
        budget = f"{rows} rows per shard and step"
    else:
        budget = "head.budget=" + ", ".join(f"{b:g}" for b in args.budget)
    run_study(
        args,
        variants,
        what=f"full softmax against knn, random and graph selection at {budget}; "
        "last held-out eval of each run (top-1 over all classes)",
        extra_fields=lambda method: fields[method],
        plot=plot_rows,
    )


if __name__ == "__main__":
    main()
