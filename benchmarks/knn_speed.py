"""Head step time with active-class selection against the full softmax, on one shard.

    python benchmarks/knn_speed.py                          # 25M classes per GPU (100M over 4), H200
    python benchmarks/knn_speed.py --classes 4194304 --index-configs 2048:8
    python benchmarks/knn_speed.py --methods graph --graph-configs 8192:16,8192:64
    python benchmarks/knn_speed.py --methods graph --graph-configs 8192:8 --graph-refresh-every 50
    python benchmarks/knn_speed.py --methods graph-moved --graph-windows 5,20 --graph-refresh-every 50
    HYDRAHEAD_RESULTS_DIR=/tmp/r python benchmarks/knn_speed.py --dry-run   # CPU, tiny shard

One rank's head: ``ShardedClassifier`` with the fused kernels (bf16 weights, fp32 momentum,
cosface s=16 m=0.1, lr 0.1, momentum 0.9), rows in families of --family-size
near-duplicates (as the procedural data), a global batch of G samples with features near
their class's weight row (cosine ~0.7, as in a trained model), every step = selection +
loss + backward + SGD update of the rows that take part.

  hydrahead-full            every row, exact kernels (8·G·D·C_r FLOPs)
  hydrahead-full-filtered   every row, head.grad_filter=2**-12 (4·G·D·C_r FLOPs)
  hydrahead-random          Partial FC: positives + random rows, the median of knn's and graph's rows
  hydrahead-random-corrected  the same rows with head.fill_correction: each fill row's logits
                            offset by log(s) in the fused kernels (what the correction costs)
  hydrahead-knn nlist:nprobe  IVF index over the shard (torch backend: per-list scoring
                            kernel), knn_k rows per sample + positives; --index-configs
                            sweeps nlist and nprobe, so recall against ms is visible
  hydrahead-graph nlist:nprobe  class graph (head.selection=graph): each label's graph_k
                            nearest classes + positives, a table lookup per step; the graph
                            built with an IVF index over the shard (or "flat": exact)
  hydrahead-given-rows      the loss step over a fixed set of as many rows as the
                            selections score (their median), no selection: the baseline

``select_ms``: the selection alone (each selection row). ``over_given_ms``: its step
(``step_ms``, random ``ms``) minus the given-rows step: what selecting adds to the head step.

For knn the step is timed without a rebuild. Rebuilds are timed on their own: a full one
(k-means on a sample, every row filed, lists built: ``retrain_s``) every
--retrain-every rebuilds, and in between one that files again the rows updated since the
last (``refile_s``, timed on rebuild_every x active random rows: the most R steps can
touch). ``ms`` = step + (retrain_s + (retrain_every - 1) refile_s) / (retrain_every x
rebuild_every). ``bg_ms`` is the mean wall time of a step (each timed alone) over
2·rebuild_every steps on fresh batches with rebuilds running in the background on their
own stream (the real schedule, builds overlapping training on the same GPU), and
``bg_max_ms`` the slowest (each step's time ends when the training stream is done, not
the rebuild's), after a few untimed fresh batches that meet the kernels' one-time
specialisations: a step that a rebuild stalls shows there; ``bg_slow_steps``
lists the steps over twice the median, what each did about a rebuild (started one,
installed one, or ran beside one) and where its time went (the selection, which with a
variable row count waits for the device to read it; the host time of the loss step's
launches; then the wait for the training stream) and the caching allocator's counts of
cudaMalloc, cudaFree, retries and device-wide syncs in it (``bg_allocator_other_steps``:
the same summed over the other steps) and ``gc_ms``, the time Python's garbage collector
ran inside it (``bg_gc_steps``: steps with a collection; ``bg_gc_max_ms``: the longest);
--gc-every sets the trainer's collection policy (train.gc_every) for these steps. Each slow
step also shows ``off_cpu_ms``: its wall time less the CPU time of its thread. A thread
waiting for the device spins on a CPU (CUDA's default with fewer contexts than cores),
while one waiting for the interpreter lock sleeps: a slow step that the GPU queue held up
has little time off the CPU, one held up on the host has much. The rebuilds in these 200
steps are refiles (k-means runs every --retrain-every rebuilds). Every index setting
starts from the same head rows and batch. ``knn_recall`` is measured
against exact search on 64 samples. floor_ms: 8·G·D·(rows scored) at the bf16 matmul rate
measured in this run; for knn this leaves out the search, so its ratio shows what the
selection costs on top of the loss.

graph: ``build_s`` is the index build plus the search of every row as a query, which is
linear in the rows searched: with --graph-sample-rows below C_r only that many rows are
searched and the time is scaled to C_r (``build_extrapolated``); the table's other rows
stay empty, which the timed step never reads. The sample is a window of the build's
query order (list by list with --graph-search groups, row order with probes), searched
in that order, as a build takes it; the timed batch's labels are searched apart, untimed
(scattered over the shard, each would form a group of one). ``ms`` = step + build_s / --graph-rebuild-every.
With --graph-refresh-every N a refresh (head.graph_refresh_every) of N·G uniformly drawn
labels is timed over the build's index (``refresh_s``, the median of 3) and
``refresh_ms_per_step`` = refresh_s / N is added to ``ms``.
graph-moved (head.graph_refresh_window = P, one row per --graph-windows P): no index and
no build; each refresh of N·G uniformly drawn labels (N = --graph-refresh-every, 50 if
unset) scores them exactly against the rows refreshed in the last P refreshes and their
neighbours. P refreshes run untimed (filling the window and the table as training would;
the first also takes the classes the timed steps train, so that their rows hold neighbours
as those of classes seen long ago do: ``trained_with_neighbours``, the share of them with
at least one), then 3 are timed alone (``refresh_s``, the median);
``ms`` = step + refresh_s / N, and ``window_rows`` is the window's size at the timed
refreshes. Then, after max(4, N) fresh batches untimed (the row counts' kernel variants compile),
max(--graph-moved-steps, 4N) steps of the real schedule on fresh batches, each timed alone,
with each refresh queued in the background when it falls due: ``bg_ms``, ``bg_max_ms`` and
``bg_slow_steps`` as for knn, ``bg_refreshes`` (the refreshes started among them).
With --graph-background the steps are also timed while a whole-shard build runs in the
background, as training runs them, from the step before the build falls due until
--graph-bg-after-install steps after its graph is installed: ``bg_ms``, ``bg_max_ms`` and
``bg_slow_steps`` as for knn, ``bg_steps``, ``bg_installed`` and ``bg_build_s`` (the
build's wall time beside the steps, from the step that started it to the one that
installed it).
``graph_recall``: the labels' graph rows against the exact nearest classes of their rows
(64 labels), and the graph's ``active_recall``, both measured on the fresh graph before
the timed steps.

Rows that sat out steps owe them (head momentum, ``inactive_rows=continue``); two ways to
let a search see them where the loss will read them (docs/selection.md):

  hydrahead-settle          ``head.settle``: every row's debt paid into storage, rows and
                            momentum read and written (``head.settle_every``); floor_ms:
                            those bytes at the device-copy rate measured in this run;
                            ``per_step_ms_at`` the cost per step at settles every 10 and 50
  hydrahead-paid-rows       ``head.rows_as_the_loss_reads_them``: a copy of the
                            shard with the debts paid, nothing stored
                            (``head.search_paid_rows``, every step); floor_ms likewise

Each is timed after one step over random rows (the rest owe that step).

Every selection also reports ``active_recall``: the fraction of each of 64 samples' k
hardest negatives (exact top k classes by feature, the label left out; k = knn_k, graph:
graph_k) that the step's active set holds: one measure for random, knn and graph alike.
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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    bf16_matmul_tflops,
    copy_bandwidth_gbps,
    cuda_time_ms,
    environment,
    median,
    print_table,
    pyplot,
    write_results,
)
from hydrahead.config import TrainConfig  # noqa: E402
from hydrahead.head import ShardedClassifier  # noqa: E402
from hydrahead.head import graph as class_graph  # noqa: E402
from hydrahead.head import index as class_index  # noqa: E402
from hydrahead.head.active import ActiveClassSelector  # noqa: E402
from hydrahead.head.selection import random_active  # noqa: E402
from hydrahead.train.collector import StepGarbageCollector  # noqa: E402

GRAD_FILTER = 2.0**-12


@torch.no_grad()
def family_weights_(
    weight: torch.Tensor, family_size: int, spread: float, seed: int, std: float = 0.01, chunk: int = 1 << 20
) -> None:
    """Rows in families of near-duplicates, as in the procedural data: centre + spread * noise."""
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    chunk -= chunk % family_size
    for start in range(0, weight.shape[0], chunk):
        rows = min(chunk, weight.shape[0] - start)
        centres = torch.randn(-(-rows // family_size), weight.shape[1], generator=gen, device=weight.device) * std
        block = centres.repeat_interleave(family_size, 0)[:rows]
        block += torch.randn(block.shape, generator=gen, device=weight.device) * (std * spread)
        weight[start : start + rows].copy_(block)


def make_batch(head: ShardedClassifier, batch: int, seed: int, noise: float):
    """Labels uniform over the shard; features = unit class row + noise (cosine ~ 1/sqrt(1 + noise^2))."""
    gen = torch.Generator(device=head.weight.device).manual_seed(seed)
    labels = torch.randint(0, head.num_local_classes, (batch,), generator=gen, device=head.weight.device)
    rows = torch.nn.functional.normalize(head.weight.detach()[labels].float(), dim=1)
    noise_part = torch.randn(rows.shape, generator=gen, device=rows.device) * (noise / math.sqrt(rows.shape[1]))
    return (rows + noise_part).contiguous(), labels


def synchronize(device, stream_only: bool = False) -> None:
    """Wait for the device (or with ``stream_only`` for its current stream alone)."""
    if device.type == "cuda":
        if stream_only:
            torch.cuda.current_stream(device).synchronize()
        else:
            torch.cuda.synchronize(device)


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counts(device) -> dict[str, int]:
    """The caching allocator's counters of cudaMalloc, cudaFree, retries after a failed
    cudaMalloc and device-wide syncs: a step whose time they explain waited for the allocator."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: stats.get(name, 0) for name in ALLOCATOR_COUNTS}


def time_ms(fn, device, reps: int) -> float:
    if device.type == "cuda":
        return median(cuda_time_ms(fn, warmup=2, reps=reps))
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return median(times[1:])


def peak_extra_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def plot(payload: dict, png: Path) -> None:
    """Head step time per method (log scale); knn split into its step and amortised rebuilds."""
    plt = pyplot()
    if plt is None:
        return
    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.8))
    for i, row in enumerate(rows):
        step_ms = row.get("step_ms", row["ms"])
        ax.barh(i, step_ms, color="tab:blue")
        if "build_ms_per_step" in row:
            ax.barh(i, row["build_ms_per_step"], left=step_ms, color="tab:orange")
        label = f"{row['ms']:.1f} ms"
        if row.get("speedup_vs_full"):
            label += f"  ({row['speedup_vs_full']:.0f}x faster than full)" if row["speedup_vs_full"] > 1.01 else ""
        ax.text(row["ms"] * 1.1, i, label, va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [r["method"].removeprefix("hydrahead-") for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(right=max(r["ms"] for r in rows) * 8)
    ax.set_xlabel("ms per head step (blue: step, orange: index rebuilds amortised)")
    s = payload["settings"]
    ax.set_title(f"{payload['device']}: one shard, C_r={s['classes']:,}, D={s['dim']}, G={s['batch']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def shard_selector(selection: str, num_rows: int, device, **options) -> ActiveClassSelector:
    """A selector over a whole shard of ``num_rows`` rows as the benchmark runs them: the torch
    index, cosine scores (the cosface head), recall measured by the benchmark itself."""
    return ActiveClassSelector(
        selection, 0, num_rows, index="torch", cosine=True, recall_every=0, device=device, **options
    )


def active_recall(selector: ActiveClassSelector, features, labels, weight, step: int) -> float:
    """The selector's active_recall on this batch at ``step``: its hardest negatives in the active set."""
    rows = selector.select(step, features, labels, weight)
    selector._measure_active_recall(features, labels, rows, weight)
    return selector.last["active_recall"]


def steps_beside_rebuilds(
    selector, steps, run_step, device, batch_for, stop_after_install=None, trace=None, gc_every=0
):
    """Each of ``steps`` timed alone while the selector's rebuilds run in the background:
    ``run_step(step, batch)`` on a fresh batch, its time ending when the training stream is
    done (a device-wide sync would also wait for the rebuild's kernels on their own stream).
    Per step: ms, what it did about a rebuild ("start", "install", "install+start", "beside"
    or ""), the host time of select / step launch / wait, the allocator's calls meanwhile,
    ``cpu_ms`` (the CPU time of the step's thread) and ``gc_ms``, the time Python's garbage
    collector ran inside it (on any thread). ``gc_every``: the trainer's collection policy
    (train.gc_every; 0: Python's automatic collection), its between-step collections
    untimed. ``stop_after_install``: stop that many steps after the first install.
    ``trace``: (first step, last step, path) of a Chrome trace."""
    with _collections_timed(gc_every) as collections:
        return _steps_beside_rebuilds(
            selector, steps, run_step, device, batch_for, stop_after_install, trace, collections
        )


def overlap_s(spans: list[tuple[float, float]], first: float, last: float) -> float:
    """Seconds of ``spans`` (start, end) that fall within [first, last]."""
    return sum(max(0.0, min(end, last) - max(start, first)) for start, end in spans)


@contextlib.contextmanager
def _collections_timed(gc_every: int):
    """The trainer's collection policy (``collections["collector"]``), and every collection's
    (start, end) in ``collections["spans"]`` (perf_counter seconds), from any thread."""
    collections = {"spans": [], "collector": StepGarbageCollector(gc_every)}
    started = [0.0]

    def timed(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections["spans"].append((started[0], time.perf_counter()))

    gc.callbacks.append(timed)
    try:
        yield collections
    finally:
        gc.callbacks.remove(timed)
        collections["collector"].close()


def _steps_beside_rebuilds(selector, steps, run_step, device, batch_for, stop_after_install, trace, collections):
    records, tracer, installed_at = [], None, None
    for s in steps:
        batch = batch_for(s)
        if trace is not None and s == trace[0] and device.type == "cuda":
            tracer = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            tracer.__enter__()
        pending, current = selector._pending, selector._current
        building = pending is not None
        synchronize(device, stream_only=True)
        counts_before = allocator_counts(device)
        cpu_start, start = time.thread_time(), time.perf_counter()
        selected, launched = run_step(s, batch)
        synchronize(device, stream_only=True)
        end, cpu_end = time.perf_counter(), time.thread_time()
        counts_after = allocator_counts(device)
        if tracer is not None and s == trace[1]:
            tracer.__exit__(None, None, None)
            tracer.export_chrome_trace(trace[2])
            tracer = None
        started = selector._pending is not None and selector._pending is not pending  # a job queued in this step
        installed = selector._current is not current
        event = "install+start" if installed and started else "start" if started else "install" if installed else ""
        records.append(
            {
                "step": s,
                "start_s": start,
                "ms": (end - start) * 1e3,
                "rebuild": event or ("beside" if building else ""),
                "parts": (selected - start, launched - selected, end - launched),
                "allocated": {name: counts_after[name] - counts_before[name] for name in counts_after},
                "cpu_ms": (cpu_end - cpu_start) * 1e3,
                "gc_ms": overlap_s(collections["spans"], start, end) * 1e3,
            }
        )
        collections["spans"].clear()  # the step's own, and any between the last step and this
        collections["collector"].after_step(s)
        if installed and installed_at is None:
            installed_at = len(records)
        if None not in (stop_after_install, installed_at) and len(records) >= installed_at + stop_after_install:
            break
    return records


def beside_fields(records) -> dict:
    """``bg_ms`` (mean), ``bg_max_ms``, ``bg_slow_steps`` (over twice the median: which part
    of the step took the time, what it did about a rebuild) and the allocator's calls in the
    other steps, for comparison with the slow ones."""
    times = [r["ms"] for r in records]
    typical = statistics.median(times)
    return dict(
        bg_ms=statistics.mean(times),
        bg_max_ms=max(times),
        bg_slow_steps=[
            {
                "step": r["step"],
                "ms": round(r["ms"], 2),
                "rebuild": r["rebuild"],
                **{f"{name}_ms": round(t * 1e3, 2) for name, t in zip(("select", "launch", "wait"), r["parts"])},
                "gc_ms": round(r["gc_ms"], 2),
                "off_cpu_ms": round(r["ms"] - r["cpu_ms"], 2),
                **{name: n for name, n in r["allocated"].items() if n},
            }
            for r in records
            if r["ms"] > 2 * typical
        ],
        bg_gc_steps=sum(r["gc_ms"] > 0 for r in records),
        bg_gc_max_ms=max(r["gc_ms"] for r in records),
        bg_allocator_other_steps={
            name: sum(r["allocated"].get(name, 0) for r in records if r["ms"] <= 2 * typical)
            for name in ALLOCATOR_COUNTS
        },
    )


def schedule_step(selector, head, step):
    """``run_step`` of ``steps_beside_rebuilds`` for a graph selector: select, then the step;
    returns the times the selection and the step's launches ended."""

    def timed_step(s, batch):
        rows = selector.select(s, *batch, head.weight)
        selected = time.perf_counter()
        step(rows, batch)
        return selected, time.perf_counter()

    return timed_step


def graph_background(args, selector, head, step, device) -> dict:
    """Steps while a whole-shard graph build runs in the background, as training runs them:
    from the step before a rebuild falls due until --graph-bg-after-install steps after the
    new graph is installed (at most --graph-bg-max-steps), each timed alone on a fresh batch.
    ``bg_*`` as for knn; ``bg_build_s``: wall time from the step that started the build to the
    one that installed it (the build sharing the GPU with the steps); ``bg_installed``."""
    G, due = args.batch, selector.rebuild_every

    def batch_for(s):
        return make_batch(head, G, seed=100 + s, noise=args.noise)

    timed_step = schedule_step(selector, head, step)
    for s in range(2, min(32, due - 1)):  # fresh batches' kernel specialisations, untimed
        timed_step(s, batch_for(10_000 + s))
    records = steps_beside_rebuilds(
        selector,
        range(due - 1, due - 1 + args.graph_bg_max_steps),
        timed_step,
        device,
        batch_for,
        stop_after_install=args.graph_bg_after_install,
        gc_every=args.gc_every,
    )
    started = next((r for r in records if "start" in r["rebuild"]), None)
    installed = next((r for r in records if "install" in r["rebuild"]), None)
    return dict(
        **beside_fields(records),
        bg_steps=len(records),
        bg_installed=installed is not None,
        bg_build_s=installed["start_s"] - started["start_s"] if started and installed else None,
    )


def graph_method(args, head: ShardedClassifier, features, labels, config, step, device):
    """(method, ms, rows scored, peak MiB, extra fields) of graph selection with one index setting.

    The index is built over the whole shard; the graph rows of --graph-sample-rows classes
    are searched, timed, and the time scaled to the shard; the batch's labels' rows apart.
    """
    C = head.num_local_classes
    nlist, nprobe = config if config is not None else (None, 1)
    selector = shard_selector(
        "graph",
        C,
        device,
        num_classes=C,
        graph_k=args.graph_k,
        rebuild_every=args.graph_rebuild_every,
        index_type="flat" if config is None else "ivf",
        nlist=nlist,
        nprobe=nprobe,
        fixed_size=args.fixed_size,
        graph_search=args.graph_search,
    )
    k = selector.graph_k
    weight = head.weight.detach()
    synchronize(device)
    start = time.perf_counter()
    index = selector._new_index()
    index.build(weight)
    synchronize(device)
    index_s = time.perf_counter() - start
    # The rows a build searches together: a window of its query order (list by list for a
    # search by list groups, else row order), timed; the batch's labels (rows
    # from all over the shard, which a build meets inside full lists) searched untimed.
    search = args.graph_search
    order = class_graph.query_order(index, C, device, search)
    offset = int(torch.randint(0, max(1, C - args.graph_sample_rows), (1,), generator=torch.Generator().manual_seed(3)))
    rows = order[offset : offset + args.graph_sample_rows]

    def search_rows(which, index=index):
        return class_graph.graph_rows(
            index, weight, which, k, cosine=True, block_rows=args.graph_block_rows, search=search
        )

    # One block untimed first: a kernel compiled inside the timed search would be scaled
    # up with it (by C_r / rows, about 95x at 25M rows).
    search_rows(rows[: class_graph.build_block_rows(index, args.graph_block_rows, search)])
    synchronize(device)
    start = time.perf_counter()
    found = search_rows(rows)
    synchronize(device)
    search_s = time.perf_counter() - start
    build_s = index_s + search_s * C / rows.numel()
    table = torch.full((C, k), -1, dtype=torch.int32, device=device)
    table[rows] = found
    table[labels.to(device)] = search_rows(labels.to(device))
    refresh = graph_refresh_fields(args, index, table, weight, device) if args.graph_refresh_every else {}
    del index, found
    selector.load_graph_state(table, 0)  # as if built before the first step
    # Recall of the fresh graph, before the timed steps move the rows.
    selector._measure_graph_recall(labels, class_graph.label_neighbours(table, labels, 0), head.weight)
    hard_recall = active_recall(selector, features, labels, head.weight, 1)

    def graph_step():  # step 1 of a rebuild period: no rebuild starts
        step(selector.select(1, features, labels, head.weight))

    peak = peak_extra_mib(graph_step, device)
    ms = time_ms(graph_step, device, args.reps)
    select_ms = time_ms(lambda: selector.select(1, features, labels, head.weight), device, args.reps)
    active = selector.last["active_classes"]
    background = graph_background(args, selector, head, step, device) if args.graph_background else {}
    selector.close()
    build_ms_per_step = build_s * 1e3 / args.graph_rebuild_every
    name = "flat" if config is None else f"{nlist}:{nprobe}"
    fields = dict(
        step_ms=ms,
        build_s=build_s,
        index_build_s=index_s,
        build_extrapolated=rows.numel() < C,
        rows_searched=rows.numel(),
        search=search,
        build_ms_per_step=build_ms_per_step,
        select_ms=select_ms,
        graph_recall=selector.last["graph_recall"],
        active_recall=hard_recall,
        active_classes=active,
        nlist=nlist,
        nprobe=nprobe if config is not None else None,
        graph_k=k,
        rebuild_every=args.graph_rebuild_every,
        **refresh,
        **background,
    )
    name += " groups" if config is not None and search == "groups" else ""
    name += f" refresh={args.graph_refresh_every}" if refresh else ""
    per_step = build_ms_per_step + refresh.get("refresh_ms_per_step", 0.0)
    return f"hydrahead-graph {name}", ms + per_step, active, peak, fields


def graph_moved_method(args, head: ShardedClassifier, features, labels, window: int, step, device):
    """(method, ms, rows scored, peak MiB, extra fields) of a graph refreshed from its moved rows
    (head.graph_refresh_window = ``window``): the refreshes timed alone, then the step's lookup
    and loss, then the steps of the real schedule with the refreshes in the background."""
    C, G = head.num_local_classes, args.batch
    every = args.graph_refresh_every or 50
    selector = shard_selector(
        "graph",
        C,
        device,
        num_classes=C,
        graph_k=args.graph_k,
        graph_refresh_every=every,
        graph_refresh_window=window,
        index_type="flat",
        fixed_size=args.fixed_size,
    )
    graph = class_graph.ClassGraph.empty(C, selector.graph_k, device)
    generator = torch.Generator().manual_seed(5)
    weight = head.weight.detach()
    window_steps = window * every
    first = (window + 4) * every + 1  # the selector's first step, after the timed refreshes
    warm = range(first + 1, first + 1 + max(4, every))  # fresh batches, untimed
    beside = range(warm.stop, warm.stop + max(args.graph_moved_steps, 4 * every))

    def batch_for(s):
        return make_batch(head, G, seed=100 + s, noise=args.noise)

    def refresh(number: int, also=None) -> tuple[float, int, int]:
        labels_drawn = torch.randint(0, C, (every * G,), generator=generator).to(device)
        if also is not None:
            labels_drawn = torch.cat((also, labels_drawn))
        synchronize(device)
        start = time.perf_counter()
        classes = class_graph.refresh_class_graph(
            graph, weight, labels_drawn, 0, C, cosine=True, step=number * every, window_steps=window_steps
        )
        synchronize(device)
        searched = (graph.moved_at >= 0) & (graph.moved_at > number * every - window_steps)
        window_rows = int(searched.sum())  # the rows it searched
        return time.perf_counter() - start, classes, window_rows

    # The window fills (and kernels compile) untimed. The classes that the timed steps train
    # are refreshed in its first refresh, as classes seen long ago: each holds the neighbours
    # its last refresh found and the offers since, and its stamp is out of the window by the
    # time the steps run.
    trained = torch.cat([labels] + [batch_for(s)[1] for s in beside] + [batch_for(10_000 + s)[1] for s in warm])
    refresh(1, also=trained)
    for number in range(2, window + 1):
        refresh(number)
    times, classes, window_rows = zip(*(refresh(window + number) for number in range(1, 4)))
    refresh_s = statistics.median(times)
    if args.profile:  # where a refresh's time goes, one more refresh
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            refresh(window + 4)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    trained_with_neighbours = float((graph.table[trained] >= 0).any(1).float().mean())
    no_labels = torch.empty(0, dtype=torch.long, device=device)
    selector.load_graph_state(graph.table, 0, graph.scores, no_labels, weight, graph.moved_at)
    selector._measure_graph_recall(labels, class_graph.label_neighbours(graph.table, labels, 0), head.weight)
    hard_recall = active_recall(selector, features, labels, head.weight, first)

    def graph_step():  # with refreshes every step, each step also queues one in the background
        step(selector.select(first, features, labels, head.weight))

    peak = peak_extra_mib(graph_step, device)
    ms = time_ms(graph_step, device, args.reps)
    select_ms = time_ms(lambda: selector.select(first, features, labels, head.weight), device, args.reps)
    active = selector.last["active_classes"]

    timed_step = schedule_step(selector, head, step)
    # Fresh batches select other numbers of rows, and a count can pick another kernel
    # specialisation (a one-time compile): met untimed, with a refresh among them.
    for s in warm:
        timed_step(s, batch_for(10_000 + s))
    selector._harvest(wait=True)
    records = steps_beside_rebuilds(selector, beside, timed_step, device, batch_for, gc_every=args.gc_every)
    selector.close()
    fields = dict(
        step_ms=ms,
        select_ms=select_ms,
        graph_recall=selector.last["graph_recall"],
        active_recall=hard_recall,
        active_classes=active,
        graph_k=selector.graph_k,
        refresh_every=every,
        refresh_window=window,
        refresh_s=refresh_s,
        refresh_classes=int(statistics.mean(classes)),
        window_rows=int(statistics.mean(window_rows)),
        refresh_ms_per_step=refresh_s * 1e3 / every,
        trained_with_neighbours=trained_with_neighbours,
        **beside_fields(records),
        bg_steps=len(records),
        bg_refreshes=sum("start" in r["rebuild"] for r in records),
    )
    method = f"hydrahead-graph moved window={window} refresh={every}"
    return method, ms + fields["refresh_ms_per_step"], active, peak, fields


def graph_refresh_fields(args, index, table, weight, device) -> dict:
    """The time of one graph refresh (``head.graph_refresh_every``): the rows of the labels of
    that many steps (G each, drawn uniformly) searched again over the build's index and offered
    to the rows they found. The median of 3 refreshes after an untimed one."""
    num_rows = table.shape[0]
    graph = class_graph.ClassGraph(table.clone(), torch.full(table.shape, -math.inf, device=device), index)
    generator = torch.Generator().manual_seed(5)
    labels_count = args.graph_refresh_every * args.batch

    def refresh() -> tuple[float, int]:
        labels = torch.randint(0, num_rows, (labels_count,), generator=generator).to(device)
        synchronize(device)
        start = time.perf_counter()
        classes = class_graph.refresh_class_graph(
            graph, weight, labels, 0, num_rows, cosine=True, search=args.graph_search
        )
        synchronize(device)
        return time.perf_counter() - start, classes

    refresh()  # kernels compile outside the timed refreshes
    times, classes = zip(*(refresh() for _ in range(3)))
    seconds = statistics.median(times)
    return dict(
        refresh_every=args.graph_refresh_every,
        refresh_s=seconds,
        refresh_classes=int(statistics.mean(classes)),
        refresh_ms_per_step=seconds * 1e3 / args.graph_refresh_every,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=25_000_000, help="classes in the shard (C_r)")
    parser.add_argument("--dim", type=int, default=512, help="embedding width D")
    parser.add_argument("--batch", type=int, default=1024, help="global batch G")
    parser.add_argument("--knn-k", type=int, default=16, help="neighbours per sample (head.knn_k)")
    parser.add_argument(
        "--index-configs",
        default="8192:4,8192:8,8192:16,8192:32,2048:8",
        help="knn: comma-separated nlist:nprobe of the IVF index",
    )
    parser.add_argument(
        "--graph-configs",
        default="8192:16",
        help="graph: comma-separated nlist:nprobe of the IVF index its builds search, or flat (exact)",
    )
    parser.add_argument("--graph-k", type=int, default=16, help="graph neighbours per class (head.graph_k)")
    parser.add_argument(
        "--graph-rebuild-every", type=int, default=1000, help="graph: steps between rebuilds (head.rebuild_every)"
    )
    parser.add_argument(
        "--graph-refresh-every",
        type=int,
        default=0,
        help="graph: also time a refresh of the rows of this many steps' labels (head.graph_refresh_every; "
        "refresh_* fields, its time per step added to the row's ms; 0: none)",
    )
    parser.add_argument(
        "--graph-windows",
        default="5,20",
        help="graph-moved: comma-separated head.graph_refresh_window values (refreshes whose rows are searched)",
    )
    parser.add_argument(
        "--graph-background",
        action="store_true",
        help="graph: also time the steps while a whole-shard build runs in the background (bg_* fields)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="Python's thread switch interval (sys.setswitchinterval; default 5 ms): how long a step's "
        "thread may wait for the interpreter lock that a background build's thread holds",
    )
    parser.add_argument(
        "--gc-every",
        type=int,
        default=TrainConfig().gc_every,
        help="steps beside a background build: the trainer's garbage-collection policy (train.gc_every: "
        "automatic collection off, the young generations collected between steps every this many steps "
        "and all of them every 20th time; "
        "0: Python's automatic collection, which may run inside a step)",
    )
    parser.add_argument(
        "--graph-bg-max-steps", type=int, default=5000, help="graph background: at most this many timed steps"
    )
    parser.add_argument(
        "--graph-moved-steps",
        type=int,
        default=40,
        help="graph-moved: steps of the real schedule timed with the refreshes in the background (at least 4 "
        "refreshes' worth)",
    )
    parser.add_argument(
        "--graph-bg-after-install",
        type=int,
        default=20,
        help="graph background: timed steps after the new graph is installed",
    )
    parser.add_argument(
        "--graph-sample-rows",
        type=int,
        default=1 << 18,
        help="graph: rows searched to time a build (scaled to the shard); >= C_r builds the whole graph",
    )
    parser.add_argument(
        "--graph-search",
        choices=class_graph.GRAPH_SEARCHES,
        default="probes",
        help="graph: how its builds search the torch IVF (head.graph_search)",
    )
    parser.add_argument(
        "--graph-block-rows",
        type=int,
        default=None,
        help=(
            "graph: rows per search of a build (default: graph.GROUPED_BLOCK_ROWS for list-grouped "
            "searches, graph.DEFAULT_BLOCK_ROWS for per-query probes)"
        ),
    )
    parser.add_argument(
        "--fixed-size", action="store_true", help="knn and graph: head.knn_fixed_size (G·(k+1) rows, no host read)"
    )
    parser.add_argument(
        "--rebuild-every", type=int, default=100, help="steps between index rebuilds (head.rebuild_every)"
    )
    parser.add_argument(
        "--retrain-every", type=int, default=10, help="rebuilds per k-means run (head.index_retrain_every)"
    )
    parser.add_argument("--noise", type=float, default=1.0, help="feature noise relative to the unit class row")
    parser.add_argument(
        "--family-size", type=int, default=4, help="classes per family of near-duplicate rows (1: independent rows)"
    )
    parser.add_argument(
        "--family-spread", type=float, default=0.3, help="spread of a family's rows around its centre, relative"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the top CUDA kernels of a few knn steps, and the top operations of one graph-moved refresh",
    )
    parser.add_argument(
        "--trace-rebuild",
        default=None,
        metavar="PREFIX",
        help="knn: write a Chrome trace of the steps that start the first background rebuild and follow it "
        "(PREFIX.nlist-nprobe.json per index setting); the profiler slows those steps, so that run's "
        "background timings are not the figures to report",
    )
    parser.add_argument(
        "--train-stream-priority",
        type=int,
        default=None,
        help="knn: run the background-rebuild steps on a CUDA stream of this priority (lower is more urgent; "
        "the rebuilds' stream has 0, the lowest); default: the default stream",
    )
    parser.add_argument("--reps", type=int, default=10, help="timed steps per method")
    parser.add_argument(
        "--weight-dtype",
        default="bf16",
        choices=("bf16", "fp8_e4m3"),
        help="head weights: bf16 or fp8_e4m3 (fp8: stochastic rounding, unit scaling)",
    )
    parser.add_argument(
        "--impl",
        default="triton",
        choices=("triton", "reference"),
        help="head.impl: the fused kernels or the torch head",
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="head momentum (0: no buffer)")
    parser.add_argument(
        "--methods",
        default="full,full-filtered,random,random-corrected,knn,graph,given,settle,paid-rows",
        help="comma-separated subset of the methods",
    )
    parser.add_argument("--name", default="knn_speed", help="results file name (without .json)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny shard on CPU (fp32, Triton interpreter)")
    args = parser.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.classes, args.dim, args.batch, args.reps, args.rebuild_every = 3000, 32, 48, 2, 4
        args.graph_rebuild_every = 4
        for name, small in (("index_configs", "16:1,16:4"), ("graph_configs", "flat,16:4")):
            if getattr(args, name) == parser.get_default(name):  # the GPU's defaults: the tiny shard's
                setattr(args, name, small)
        args.graph_sample_rows = 1000  # a third of the rows: the extrapolated build, as on a GPU
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    methods = args.methods.split(",")
    known = {
        "full", "full-filtered", "random", "random-corrected", "knn", "graph", "graph-moved", "given", "settle",
        "paid-rows",
    }  # fmt: skip
    unknown = set(methods) - known
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")
    index_configs = [tuple(int(v) for v in item.split(":")) for item in args.index_configs.split(",")]
    graph_configs = [
        None if item == "flat" else tuple(int(v) for v in item.split(":")) for item in args.graph_configs.split(",")
    ]
    graph_windows = [int(item) for item in args.graph_windows.split(",")]
    if min(graph_windows) < 1:
        parser.error(f"--graph-windows: each window is at least 1 refresh, got {args.graph_windows}")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    tflops = bf16_matmul_tflops() if device.type == "cuda" else None
    G, D, C = args.batch, args.dim, args.classes
    print(f"shard {C:,} x {D}, batch {G}, {dtype}; matmul {tflops or 0:.0f} TFLOP/s", flush=True)

    if args.weight_dtype == "fp8_e4m3":
        dtype = torch.float8_e4m3fn
    head = ShardedClassifier(
        C,
        D,
        seed=0,
        init_std=0.01,
        margin_type="cosface",
        scale=16.0,
        margin=0.1,
        dtype=dtype,
        device=device,
        impl=args.impl,
        momentum=args.momentum,
        weight_decay=0.0,
        rounding="stochastic" if args.weight_dtype == "fp8_e4m3" else "nearest",
        unit_scaling=args.weight_dtype == "fp8_e4m3",
    )
    head.set_lr(0.1)
    if args.family_size > 1:
        family_weights_(head.weight.data, args.family_size, args.family_spread, seed=2, std=head.init_std)
    features, labels = make_batch(head, G, seed=1, noise=args.noise)
    floor = (lambda rows: 8 * G * D * rows / (tflops * 1e12) * 1e3) if tflops else (lambda rows: None)
    shape = f"G={G} D={D} C_r={C}"
    rows_out = []

    def record(method, ms, rows_scored, peak, floor_ms=None, **extra):
        floor_ms = floor(rows_scored) if floor_ms is None else floor_ms
        row = {
            "method": method,
            "shape": shape,
            "ms": ms,
            "floor_ms": floor_ms,
            "ratio": ms / floor_ms if floor_ms else None,
            "peak_mib": peak,
            "rows_scored": rows_scored,
            **extra,
        }
        rows_out.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def step(active_rows=None, batch=None, logit_offset=None):
        x, y = batch if batch is not None else (features, labels)
        head.set_step(head.step + 1)  # fresh stochastic-rounding draws each step
        loss = head.loss(x.requires_grad_(), y, active_rows, logit_offset=logit_offset)
        loss.backward()
        head.finish_step()
        x.grad = None

    for variant in ("full", "full-filtered"):
        if variant not in methods:
            continue
        head.grad_filter = GRAD_FILTER if variant == "full-filtered" else 0.0
        peak = peak_extra_mib(step, device)
        record(f"hydrahead-{variant}", time_ms(step, device, args.reps), C, peak)
    head.grad_filter = 0.0

    if "knn" in methods:
        # Every index setting starts from the same rows and batch: the timed steps train the
        # head, and recall is compared across settings.
        initial_weight = head.weight.detach().clone()
        for nlist, nprobe in index_configs:
            head.weight.data.copy_(initial_weight)
            if head.momentum_buffer is not None:
                head.momentum_buffer.zero_()
            selector = shard_selector(
                "knn",
                C,
                device,
                knn_k=args.knn_k,
                rebuild_every=args.rebuild_every,
                index_type="ivf",
                retrain_every=args.retrain_every,
                nlist=nlist,
                nprobe=nprobe,
                fixed_size=args.fixed_size,
            )
            built = selector._build(head.weight, 0)  # timed alone: k-means, every row filed, lists
            retrain_s = built.seconds
            built = selector._build(head.weight, 0)
            retrain_s = min(retrain_s, built.seconds)
            selector._install(built)
            counter = {"step": 1}

            def knn_step(batch=None):
                x, y = batch if batch is not None else (features, labels)
                step(selector.select(counter["step"], x, y, head.weight), batch)

            # Steps 1.. within one rebuild period: no rebuild starts while timing.
            peak = peak_extra_mib(knn_step, device)
            ms = time_ms(knn_step, device, args.reps)
            select_ms = time_ms(
                lambda: selector.select(counter["step"], features, labels, head.weight), device, args.reps
            )
            active = selector.last["active_classes"]
            queries = torch.nn.functional.normalize(features.detach().float(), dim=1)
            _, found = selector._current.index.search(queries, selector.knn_search_k, head.weight.detach())
            found, _ = selector._skip_labels(found, labels)  # as the step's search: the label left out
            selector._measure_recall(queries, labels, found, head.weight)
            recall = selector.last["knn_recall"]
            hard_recall = active_recall(selector, features, labels, head.weight, counter["step"])

            # A rebuild between k-means runs files again the rows updated since the last one:
            # at most rebuild_every steps' active rows (fewer where steps overlap).
            dirty = torch.randperm(C, device=device)[: min(C, args.rebuild_every * active)]
            synchronize(device)
            start = time.perf_counter()
            selector._current.index.reassigned(head.weight, dirty)
            synchronize(device)
            refile_s = time.perf_counter() - start

            if args.profile and device.type == "cuda":
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
                ) as prof:
                    for _ in range(3):
                        knn_step()
                    synchronize(device)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)

            # The real schedule, fresh batches: 2 * rebuild_every steps with background rebuilds,
            # each timed alone (a rebuild that stalls a step shows in the maximum).
            # Fresh batches select other numbers of rows, and a count can pick another kernel
            # specialisation (a one-time compile): meet them before timing.
            synchronize(device)
            training_stream = contextlib.ExitStack()
            if args.train_stream_priority is not None and device.type == "cuda":
                # the steps on a stream of their own priority, the rebuilds on theirs (priority 0)
                stream = torch.cuda.Stream(device, priority=args.train_stream_priority)
                training_stream.enter_context(torch.cuda.stream(stream))
            for s in range(1, min(32, args.rebuild_every)):
                counter["step"] = s
                knn_step(make_batch(head, G, seed=10_000 + s, noise=args.noise))
            if selector._dirty is not None:  # the warm-up's rows are not the schedule's to refile
                selector._dirty.zero_()

            def timed_knn_step(s, batch):
                counter["step"] = s
                active_rows = selector.select(s, *batch, head.weight)
                selected = time.perf_counter()
                step(active_rows, batch)
                return selected, time.perf_counter()

            trace = None
            if args.trace_rebuild:  # the first background rebuild's start and the next step
                trace = (args.rebuild_every, args.rebuild_every + 1, f"{args.trace_rebuild}.{nlist}-{nprobe}.json")
            records = steps_beside_rebuilds(
                selector,
                range(1, 2 * args.rebuild_every + 1),
                timed_knn_step,
                device,
                lambda s: make_batch(head, G, seed=100 + s, noise=args.noise),
                trace=trace,
                gc_every=args.gc_every,
            )
            training_stream.close()
            synchronize(device)
            selector.close()
            cycle = args.retrain_every * args.rebuild_every  # steps per k-means run
            build_ms_per_step = (retrain_s + (args.retrain_every - 1) * refile_s) * 1e3 / cycle
            record(
                f"hydrahead-knn {nlist}:{nprobe}",
                ms + build_ms_per_step,
                active,
                peak,
                step_ms=ms,
                select_ms=select_ms,
                retrain_s=retrain_s,
                refile_s=refile_s,
                refiled_rows=dirty.numel(),
                build_ms_per_step=build_ms_per_step,
                **beside_fields(records),
                knn_recall=recall,
                active_recall=hard_recall,
                active_classes=active,
                nlist=nlist,
                nprobe=nprobe,
                rebuild_every=args.rebuild_every,
                retrain_every=args.retrain_every,
                knn_k=args.knn_k,
            )
            del selector, built

    if "graph" in methods:
        for config in graph_configs:
            method, ms, rows_scored, peak, fields = graph_method(args, head, features, labels, config, step, device)
            record(method, ms, rows_scored, peak, **fields)
    if "graph-moved" in methods:
        for window in graph_windows:
            method, ms, rows_scored, peak, fields = graph_moved_method(
                args, head, features, labels, window, step, device
            )
            record(method, ms, rows_scored, peak, **fields)

    def selections_rows(default: int) -> int:
        """The median of the rows the selections timed so far scored (knn's, graph's, random's)."""
        scored = [r["rows_scored"] for r in rows_out if r["rows_scored"] < C]
        return round(median(scored)) if scored else default

    for corrected in (False, True):
        method = "random-corrected" if corrected else "random"
        if method not in methods:
            continue
        budget = selections_rows(max(1, C // 1000))
        selector = shard_selector("random", C, device, budget=budget, knn_k=args.knn_k, fill_correction=corrected)
        counter = {"step": 1}

        def random_step(selector=selector, counter=counter):
            counter["step"] += 1
            rows = selector.select(counter["step"], features, labels, head.weight)
            step(rows, logit_offset=selector.logit_offset)  # None without the correction

        peak = peak_extra_mib(random_step, device)
        ms = time_ms(random_step, device, args.reps)
        select_ms = time_ms(lambda: selector.select(counter["step"], features, labels, head.weight), device, args.reps)
        hard_recall = active_recall(selector, features, labels, head.weight, counter["step"])
        record(
            f"hydrahead-{method}",
            ms,
            budget,
            peak,
            select_ms=select_ms,
            active_classes=budget,
            active_recall=hard_recall,
        )

    if "given" in methods:
        # The loss step over a fixed active set as large as the selections' (no selection at all):
        # what a selection adds to the head step is its row's step_ms (random: ms) minus this.
        budget = selections_rows(min(C, G * (args.knn_k + 1)))
        given = random_active(labels, 0, C, budget, seed=0, step=1)
        peak = peak_extra_mib(lambda: step(given), device)
        record("hydrahead-given-rows", time_ms(lambda: step(given), device, args.reps), given.numel(), peak)
        given_ms = rows_out[-1]["ms"]
        for row in rows_out[:-1]:
            if row["rows_scored"] < C:
                row["over_given_ms"] = row.get("step_ms", row["ms"]) - given_ms

    if {"settle", "paid-rows"} & set(methods) and head.momentum_buffer is not None:
        copy_gbps = copy_bandwidth_gbps(device)
        rows_bytes = head.weight.numel() * head.weight.element_size()
        momentum_bytes = head.momentum_buffer.numel() * head.momentum_buffer.element_size()
        owing = random_active(labels, 0, C, min(C, G * (args.knn_k + 1)), seed=0, step=1)

        def owing_then(pay):
            """One step over random rows (the others owe it), then ``pay`` timed alone."""
            times, peaks = [], []
            for _ in range(args.reps):
                step(owing)
                synchronize(device)
                start = time.perf_counter()
                peaks.append(peak_extra_mib(pay, device) if device.type == "cuda" else pay())  # None on the CPU
                times.append((time.perf_counter() - start) * 1e3)
            return median(times), peaks[-1]

        if "settle" in methods:
            ms, peak = owing_then(head.settle)
            moved = 2 * (rows_bytes + momentum_bytes)  # read and written
            per_step = {every: ms / every for every in (10, 50)}
            floor_ms = moved / (copy_gbps * 1e9) * 1e3
            record("hydrahead-settle", ms, 0, peak, floor_ms, per_step_ms_at=per_step, copy_gbps=copy_gbps)
        if "paid-rows" in methods:
            try:

                def paid_copy() -> None:  # the copy itself is dropped: only its cost is wanted
                    head.rows_as_the_loss_reads_them()

                ms, peak = owing_then(paid_copy)
                moved = 2 * rows_bytes + momentum_bytes  # rows and momentum read, the copy written
                floor_ms = moved / (copy_gbps * 1e9) * 1e3
                record("hydrahead-paid-rows", ms, 0, peak, floor_ms, copy_gbps=copy_gbps)
            except torch.OutOfMemoryError as error:
                print(f"hydrahead-paid-rows: no room for a copy of the shard ({error})", flush=True)

    full = {r["method"]: r["ms"] for r in rows_out}
    for row in rows_out:
        if not row["rows_scored"]:  # a settle or a copy, not a step: no speed-up to give
            continue
        if "hydrahead-full" in full:
            row["speedup_vs_full"] = full["hydrahead-full"] / row["ms"]
        if "hydrahead-full-filtered" in full:
            row["speedup_vs_filtered"] = full["hydrahead-full-filtered"] / row["ms"]
    payload = {
        **environment(),
        "benchmark": args.name,
        "matmul_tflops_bf16": tflops,
        "floor": "steps: 8*G*D*(rows scored) at the bf16 matmul rate measured in this run (search not counted); "
        "settle and paid-rows: the bytes they read and write at the copy rate measured in this run",
        "settings": {
            "classes": C,
            "dim": D,
            "batch": G,
            "knn_k": args.knn_k,
            "graph_k": args.graph_k,
            "graph_rebuild_every": args.graph_rebuild_every,
            "graph_sample_rows": args.graph_sample_rows,
            "graph_block_rows": args.graph_block_rows,
            "graph_search": args.graph_search,
            "fixed_size": args.fixed_size,
            "rebuild_every": args.rebuild_every,
            "retrain_every": args.retrain_every,
            "noise": args.noise,
            "family_size": args.family_size,
            "family_spread": args.family_spread,
            "reps": args.reps,
            "dtype": str(dtype),
            "margin": "cosface s=16 m=0.1",
            "momentum_dtype": "float32" if args.momentum else "none",
            "weight_dtype": args.weight_dtype,
            "impl": args.impl,
            "switch_interval_ms": sys.getswitchinterval() * 1e3,
            "gc_every": args.gc_every,
            "group_topk": class_index.GROUP_TOPK,
        },
        "rows": rows_out,
    }
    path = write_results(args.name, payload)
    plot(payload, path.with_suffix(".png"))
    print(f"\nwrote {path}")
    print_table(
        rows_out,
        [
            "method",
            "ms",
            "step_ms",
            "select_ms",
            "over_given_ms",
            "retrain_s",
            "refile_s",
            "bg_ms",
            "bg_max_ms",
            "build_s",
            "refresh_ms_per_step",
            "knn_recall",
            "graph_recall",
            "active_recall",
            "active_classes",
            "ratio",
            "peak_mib",
            "speedup_vs_full",
            "speedup_vs_filtered",
        ],
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # re-plot a results JSON
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]).with_suffix(".png"))
    else:
        main()
