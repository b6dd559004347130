"""A few launches of the head's kernels for a kernel profiler to attach to, or the host time of eager steps.

    ncu --kernel-name regex:dw_update_wide --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_kernels.py dw-update --shape 1024x512x1048576
    ncu --kernel-name regex:"probs_kernel|pingpong_lse_kernel" --launch-skip 9 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_kernels.py step --shape 1024x512x1048576

``dw-update``: the fused dW-and-SGD kernel alone, twice, on random P, F, rows and a zero
buffer. ``step``: two exact bf16 head steps (``benchmarks/head_kernels.py``'s ``ours``,
peaked logits). With C_r = 1M and G = 1,024 a step launches the LSE pass once and the P
kernel once for each of its 8 class chunks, hence the second command's skip of 9.

``host`` (no profiler needed) times the host side of those eager steps, which is exposed
while the GPU waits at a step's start: for ``--launches`` steps after three warm-up ones,
the median microseconds from the step's start to entering and leaving the loss's local
pass, the LSE pass, its launch wrapper and the kernel's dispatch, and the first P chunk's
launch; then what one small torch launch costs first after a host sync and next. Needs a
CUDA GPU.

``--method ours-cg`` runs ``host``, ``timeline`` and ``step`` on the steps replayed by
``head.cuda_graph`` as the trainer takes them, loss and backward in one graph (``host``
then marks the graphs' step, the inputs' copies and the replay); ``ours-cg-split`` on the
two graphs of a loss and then its backward (``host`` marks the graphs' loss, the forward's
replay and the backward's); ``--method ours-graph`` on the benchmark's whole-step capture.

``timeline`` profiles three eager steps (``torch.profiler``, host and GPU) and prints, for
the middle one, every stretch of at least ``--min-gap-us`` in which the GPU ran none of the
step's kernels, with the host ops that started during it: where a small step waits, and on
what. The profiler slows the host, so the stretches come out longer than unprofiled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import head_kernels  # noqa: E402


def run_dw_update(shape: tuple[int, int, int], launches: int) -> None:
    from hydrahead.kernels.dw_update import fused_dw_update

    num_rows, dim, num_classes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    probs = (torch.randn(num_rows, num_classes, device="cuda", generator=gen) * 1e-3).bfloat16()
    feats = torch.randn(num_rows, dim, device="cuda", generator=gen).bfloat16()
    rows = (torch.randn(num_classes, dim, device="cuda", generator=gen) * 0.02).bfloat16()
    buffer = torch.zeros(num_classes, dim, device="cuda")
    for _ in range(launches):
        fused_dw_update(probs, feats, rows, buffer, lr=0.1, momentum=0.9, weight_decay=5e-4)


def run_step(shape: tuple[int, int, int], launches: int, method: str = "ours") -> None:
    step = _head_step(shape, method)
    for _ in range(launches):
        step()


def run_host(shape: tuple[int, int, int], steps: int, method: str = "ours") -> None:
    import inspect
    import statistics
    import time

    from hydrahead.kernels import filtered, fused_loss, graphed, pingpong

    marks: dict[str, float] = {}

    def timed(owner, name: str, tag: str) -> None:  # the first call of each step
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            marks.setdefault(f"{tag} entered", time.perf_counter())
            out = inner(*args, **kwargs)
            marks.setdefault(f"{tag} left", time.perf_counter())
            return out

        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    if method == "ours-cg":  # the library's one graph: the host's way to its replay
        timed(graphed.HeadStepGraphs, "step", "graphs' step (key, copies, replay, outputs)")
        timed(graphed.HeadStepGraphs, "_copy_inputs", "the inputs' copies")
        timed(torch.cuda.CUDAGraph, "replay", "the graph's replay")
    elif method == "ours-cg-split":  # the library's two graphs: the host's way to each replay and between them
        timed(graphed.HeadStepGraphs, "loss", "graphs' loss (key, inputs' copies, replay)")
        timed(graphed.HeadStepGraphs, "run_forward", "the forward's copies and replay")
        timed(graphed._ReplayedLoss, "backward", "autograd's backward (grad copy, replay, dF's copy)")
        timed(graphed.HeadStepGraphs, "run_backward", "the backward's replay")
    else:
        timed(fused_loss, "_local_pass", "local pass (labels, then the LSE)")
        timed(filtered, "shard_lse", "LSE pass")
        timed(pingpong, "split_stats", "its launch wrapper")
        if pingpong.GLUON:
            timed(pingpong._pingpong_lse_kernel, "run", "the kernel's dispatch")
        timed(pingpong, "write_probs", "first P chunk's launch")
    step = _head_step(shape, method)
    for _ in range(3):
        step()
    samples = []
    for _ in range(steps):
        marks.clear()
        start = time.perf_counter()
        step()  # ends with the host's read of the checks: the next one starts on an idle GPU
        marks["step's end (its read done)"] = time.perf_counter()
        samples.append({tag: (at - start) * 1e6 for tag, at in marks.items()})
    print(f"host time of the {method} step at {'x'.join(map(str, shape))}, median of {steps} steps, us from its start:")
    for tag in samples[0]:
        print(f"  {tag:34s} {statistics.median(s[tag] for s in samples if tag in s):8.1f}")
    small = torch.zeros(16, device="cuda")
    first, second = [], []
    for _ in range(50):
        torch.cuda.synchronize()
        time.sleep(0.005)
        t0 = time.perf_counter()
        small.add_(1)
        t1 = time.perf_counter()
        small.add_(1)
        first.append((t1 - t0) * 1e6)
        second.append((time.perf_counter() - t1) * 1e6)
    first, second = statistics.median(first), statistics.median(second)
    print(f"  one torch launch after a sync: first {first:.1f} us, next {second:.1f}")


def idle_stretches(kernels, host_ops, min_gap: float, since: float | None = None) -> list[dict]:
    """Where the GPU ran nothing: ``kernels`` and ``host_ops`` are (start, end, name) on one
    clock; returns, in order, each stretch of at least ``min_gap`` between one kernel's end
    (or ``since``, the step's start, for the stretch before the first) and the next kernel's
    start: its start, length, the kernel that ended it, and the names of the host ops that
    started inside it."""
    stretches, busy_until = [], since
    for start, end, name in sorted(kernels):
        if busy_until is not None and start - busy_until >= min_gap:
            inside = [op for op_start, _, op in sorted(host_ops) if busy_until <= op_start < start]
            stretches.append({"start": busy_until, "length": start - busy_until, "next": name, "host": inside})
        busy_until = end if busy_until is None else max(busy_until, end)
    return stretches


STEP_RANGE = "head step"  # each profiled step's record_function range, numbered


def run_timeline(shape: tuple[int, int, int], min_gap_us: float, method: str = "ours") -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    step = _head_step(shape, method)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            with record_function(f"{STEP_RANGE} {i}"):
                step()
        torch.cuda.synchronize()
    events = prof.events()
    middle = next(e for e in events if e.name == f"{STEP_RANGE} 1").time_range
    t0, t1 = middle.start, middle.end  # the step ends with a host read: its kernels lie inside

    def span(e):
        return (e.time_range.start - t0, e.time_range.end - t0, e.name)

    # The steps' own ranges appear on the GPU's track too (user annotations): not kernels.
    kernels = [
        span(e)
        for e in events
        if e.device_type.name == "CUDA" and t0 <= e.time_range.start <= t1 and not e.name.startswith(STEP_RANGE)
    ]
    host = [
        span(e)
        for e in events
        if e.device_type.name == "CPU"
        and t0 <= e.time_range.start < t1
        and e.name.startswith(("aten::", "cuda", "cuLaunch", "autograd::"))
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))  # top-level ops only
    ]
    busy = sum(end - start for start, end, _ in kernels)
    print(
        f"{method} step at {'x'.join(map(str, shape))} (profiled): host {t1 - t0:.0f} us, {len(kernels)} kernels "
        f"busy {busy:.0f} us; GPU idle stretches of {min_gap_us:g} us or more:"
    )
    for gap in idle_stretches(kernels, host, min_gap_us, since=0.0):
        ops = ", ".join(gap["host"][:12]) + (" ..." if len(gap["host"]) > 12 else "")
        print(f"  at {gap['start']:8.0f} us for {gap['length']:7.0f} us, then {gap['next'][:48]}: {ops}")
    print("the step's kernels by GPU time:")
    for name, (count, total) in kernel_totals(kernels)[:16]:
        print(f"  {total:8.0f} us {count:4d}x {name[:96]}")


def kernel_totals(kernels) -> list[tuple[str, tuple[int, float]]]:
    """(start, end, name) spans grouped by name: (name, (count, summed length)), longest first."""
    totals: dict[str, list] = {}
    for start, end, name in kernels:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
    return sorted(((name, (c, t)) for name, (c, t) in totals.items()), key=lambda item: -item[1][1])


# eager; the library's one graph, its two graphs; the benchmark's whole-step capture
METHODS = ("ours", "ours-cg", "ours-cg-split", "ours-graph")


def _head_step(shape: tuple[int, int, int], method: str = "ours"):
    args = argparse.Namespace(
        seed=0,
        target_prob=0.25,
        logit_noise=1.0,
        momentum_dtype="fp32",
        margin_type="none",
        grad_filter=head_kernels.CCE_BF16_FILTER,
    )
    problem = head_kernels.make_problem(shape, "peaked", torch.device("cuda"), args)
    if method in head_kernels.GRAPHED:
        return head_kernels.captured(method, problem, args)
    return head_kernels.build_step(method, problem, args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what",
        choices=("dw-update", "step", "host", "timeline"),
        help="the fused dW kernel alone, whole head steps, the host time of eager steps, or where the GPU idles",
    )
    parser.add_argument("--shape", default="1024x512x1048576", help="GxDxC_r (default 1024x512x1048576)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="ours",
        help="step, host and timeline: the eager step, head.cuda_graph's replays, or the whole step captured "
        "(default ours)",
    )
    parser.add_argument(
        "--launches", type=int, default=None, help="kernel launches or steps (default 2; host: 40 timed steps)"
    )
    parser.add_argument(
        "--min-gap-us", type=float, default=20.0, help="timeline: the shortest idle stretch reported (default 20)"
    )
    args = parser.parse_args(argv)
    if args.launches is not None and args.launches < 1:
        parser.error(f"--launches must be at least 1, got {args.launches}")
    if args.min_gap_us <= 0:
        parser.error(f"--min-gap-us must be positive, got {args.min_gap_us}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py runs the GPU kernels: no CUDA device here")
    shape = head_kernels.parse_shape(args.shape)
    if args.what == "host":
        run_host(shape, 40 if args.launches is None else args.launches, args.method)
        return
    if args.what == "timeline":
        run_timeline(shape, args.min_gap_us, args.method)
        return
    launches = 2 if args.launches is None else args.launches
    if args.what == "dw-update":
        run_dw_update(shape, launches)
    else:
        run_step(shape, launches, args.method)
    torch.cuda.synchronize()
    print(f"{args.what} at {args.shape}: {launches} launches done")


if __name__ == "__main__":
    main()
