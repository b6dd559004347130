"""benchmarks/head_kernels.py: the CUDA-graph rows against the plain steps, and the per-row GPU counters."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def test_a_graph_row_is_a_clear_error_without_a_gpu(tmp_path, monkeypatch):
    from benchmarks import head_kernels

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head_kernels.main(["--dry-run", "--kinds", "peaked", "--methods", "ours-graph,ours-fp8-graph,torch"])
    rows = {row["method"]: row for row in json.loads((tmp_path / "head_kernels.json").read_text())["rows"]}
    for key in head_kernels.GRAPHED:
        graph = rows[head_kernels.METHODS[key].name]
        assert graph["ms"] is None and "runs on a GPU only" in graph["note"]
    assert rows[head_kernels.METHODS["torch"].name]["ms"] > 0


def test_a_graph_row_counts_the_floor_of_the_step_it_captures():
    from benchmarks import head_kernels

    rates = {"bf16": 500.0, "fp8": 1000.0}
    for graphed, plain in head_kernels.GRAPHED.items():
        assert graphed in head_kernels.METHODS
        assert head_kernels.floor_ms(graphed, (1024, 512, 1 << 20), rates) == head_kernels.floor_ms(
            plain, (1024, 512, 1 << 20), rates
        )


def _steps(key: str, count: int, graphs_out: list | None = None):
    """(losses of ``count`` steps of ``key`` on the seeded GPU problem, the problem after them);
    ``graphs_out`` receives the step's head.cuda_graph graphs, if it has them."""
    from benchmarks import head_kernels

    args = argparse.Namespace(
        seed=0, target_prob=0.25, logit_noise=1.0, momentum_dtype="fp32", grad_filter=2**-12, margin_type="none"
    )
    problem = head_kernels.make_problem((96, 128, 20_000), "peaked", torch.device("cuda"), args)
    step = head_kernels.build_step(key, problem, args)
    if graphs_out is not None:
        graphs_out.append(step.graphs)
    losses = [float(step()) for _ in range(count)]
    torch.cuda.synchronize()
    return losses, problem


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replays_take_the_steps_the_plain_step_takes():
    """From the same rows, the first replay's loss is the first plain step's (the warm-up
    steps undone) and three replays leave W and its buffer where three plain steps do."""
    (plain, problem), (replayed, graphed) = _steps("ours", 3), _steps("ours-graph", 3)
    assert replayed == pytest.approx(plain, rel=1e-5)
    torch.testing.assert_close(graphed.weight.detach().float(), problem.weight.detach().float())
    torch.testing.assert_close(graphed.momentum_buffer.float(), problem.momentum_buffer.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_fp8_replays_take_the_plain_steps_and_their_draws():
    """fp8 rows: the replays' step counter lives on the device and advances after each replay,
    so three replays draw the rounding bits of plain steps 0, 1, 2 and leave W where they do."""
    (plain, problem), (replayed, graphed) = _steps("ours-fp8", 3), _steps("ours-fp8-graph", 3)
    assert problem.weight.dtype == graphed.weight.dtype == torch.float8_e4m3fn
    assert replayed == pytest.approx(plain, rel=1e-5)
    differ = (graphed.weight.detach().view(torch.uint8) != problem.weight.detach().view(torch.uint8)).float().mean()
    assert float(differ) < 1e-3  # a float32 sum moved by an ulp can flip a rounding: a few entries at most
    torch.testing.assert_close(graphed.momentum_buffer.float(), problem.momentum_buffer.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", ["ours-cg", "ours-cg-split"])
def test_the_library_graph_rows_take_the_plain_steps(key):
    """head.cuda_graph's rows (one graph over loss and backward, or two) from the same rows:
    four steps (an eager one, the capture, two replays) leave W where the plain steps do."""
    graphs = []
    (plain, problem), (replayed, graphed) = _steps("ours", 4), _steps(key, 4, graphs)
    assert (graphs[0].captures, graphs[0].replays, graphs[0].failed) == (1, 3, {})  # not an eager fallback
    assert replayed == pytest.approx(plain, rel=1e-5)
    torch.testing.assert_close(graphed.weight.detach().float(), problem.weight.detach().float())
    torch.testing.assert_close(graphed.momentum_buffer.float(), problem.momentum_buffer.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_time_is_the_kernels_share_of_the_timed_span():
    """A chain of products queued at once keeps the GPU busy: its kernel time is most of the
    span. The same products with the host sleeping between them leave the GPU idle: their
    kernel time is a small part of it."""
    import time

    from benchmarks.common import cuda_time_ms, kernel_busy_ms

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def busy():
        for _ in range(8):
            a @ a

    def waiting():
        for _ in range(8):
            a @ a
            time.sleep(0.005)

    for fn, lowest, highest in ((busy, 0.7, 1.05), (waiting, 0.0, 0.5)):
        span = sorted(cuda_time_ms(fn, warmup=1, reps=5))[2]
        share = kernel_busy_ms(fn) / span
        assert lowest < share < highest, (fn.__name__, share)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_times_name_each_kernel_and_sum_to_the_busy_time():
    """Two products of different sizes and a fill: the breakdown names the GEMM and the fill
    apart, the larger product's kernel takes most of the time, and the parts sum to
    kernel_busy_ms within the run-to-run noise."""
    from benchmarks.common import kernel_busy_ms, kernel_times_ms

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1 << 24, device="cuda")

    def fn():
        a @ a
        b @ b
        out.fill_(1.0)

    times = kernel_times_ms(fn)
    assert list(times.values()) == sorted(times.values(), reverse=True)
    assert any("fill" in name.lower() for name in times), times
    assert len(times) >= 2
    assert max(times.values()) > 0.5 * sum(times.values()), times
    assert abs(sum(times.values()) - kernel_busy_ms(fn)) < 0.25 * sum(times.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", ["ours", "ours-fp8"])
def test_steady_steps_take_no_new_device_memory(key):
    """After the first step the caching allocator serves every step from its pool: the row's
    allocator_per_step counts no cudaMalloc, cudaFree, retry or device-wide sync."""
    from benchmarks import head_kernels

    args = argparse.Namespace(
        seed=0,
        target_prob=0.25,
        logit_noise=1.0,
        momentum_dtype="fp32",
        grad_filter=2**-12,
        reps=3,
        slow_reps=1,
        margin_type="none",
    )
    problem = head_kernels.make_problem((96, 128, 20_000), "peaked", torch.device("cuda"), args)
    row = head_kernels.measure(key, problem, args, torch.device("cuda"))
    counts = row["allocator_per_step"]
    assert set(counts) == {"num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams"}
    assert all(value == 0 for value in counts.values()), counts


def test_the_cosface_float64_loss_is_the_margin_loss_on_unit_rows():
    """--margin-type cosface: the float64 loss over class chunks equals a direct one
    (F.normalize, the margin at each target, the scale) and differs from the plain loss."""
    from benchmarks import head_kernels

    args = argparse.Namespace(
        seed=3, target_prob=0.25, logit_noise=1.0, momentum_dtype="fp32", grad_filter=2**-12, margin_type="none"
    )
    problem = head_kernels.make_problem((24, 16, 700), "peaked", torch.device("cpu"), args, with_buffer=False)
    features, weight, labels = problem.features.detach().double(), problem.weight.detach().double(), problem.labels
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    margin = torch.zeros_like(cos).scatter_(1, labels[:, None], head_kernels.COSFACE["margin"])
    want = torch.nn.functional.cross_entropy(head_kernels.COSFACE["scale"] * (cos - margin), labels)
    old_chunk = head_kernels.FLOAT64_CHUNK_BYTES
    head_kernels.FLOAT64_CHUNK_BYTES = 8 * 24 * 64  # 64 classes a chunk: targets fall in every chunk
    try:
        got = head_kernels.float64_loss(problem, 2**-12, "cosface")
        plain = head_kernels.float64_loss(problem, 2**-12)
    finally:
        head_kernels.FLOAT64_CHUNK_BYTES = old_chunk
    assert got["loss64"] == pytest.approx(float(want), rel=1e-12)
    assert abs(got["loss64"] - plain["loss64"]) > 0.1


def test_a_cosface_run_holds_the_margin_rows_and_refuses_the_others(tmp_path, monkeypatch):
    from benchmarks import head_kernels

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head_kernels.main(["--dry-run", "--kinds", "peaked", "--margin-type", "cosface", "--methods", "torch,reference"])
    result = json.loads((tmp_path / "head_kernels.json").read_text())
    assert result["settings"]["margin_type"] == "cosface" and "cosface" in result["what"]
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["ms"] > 0 and row["loss_rel_err"] < 1e-2  # against the cosface float64 loss: bf16 inputs
    with pytest.raises(SystemExit):
        head_kernels.main(["--dry-run", "--margin-type", "cosface", "--methods", "cce,torch"])


def test_the_profiling_helper_takes_only_its_targets_and_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    from benchmarks import profile_kernels

    with pytest.raises(SystemExit):  # argparse: not one of dw-update, step, host
        profile_kernels.main(["lse"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_kernels.main(["host", "--launches", "0"])
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_kernels.main(["timeline", "--min-gap-us", "0"])
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the steps it can run: eager, head.cuda_graph, the whole step captured
        profile_kernels.main(["host", "--method", "ours-fp8"])
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    for what in ("step", "host", "timeline"):
        with pytest.raises(SystemExit) as refused:
            profile_kernels.main([what, "--shape", "64x16x1000"])
        assert "no CUDA device" in str(refused.value)


def test_idle_stretches_are_the_gaps_between_kernels_with_the_host_ops_inside_them():
    """Kernels that overlap count as one busy span; a gap shorter than the threshold is not
    reported; host ops are those that started inside a gap, in order."""
    from benchmarks.profile_kernels import idle_stretches

    kernels = [(310, 400, "probs"), (100, 150, "lse"), (140, 300, "merge"), (160, 200, "fill"), (520, 600, "dw")]
    host = [
        (0, 90, "aten::sub"),
        (305, 306, "cuLaunchKernel"),
        (410, 430, "aten::add"),
        (405, 409, "aten::mul"),
        (530, 540, "aten::late"),
    ]
    stretches = idle_stretches(kernels, host, min_gap=20)
    assert stretches == [{"start": 400, "length": 120, "next": "dw", "host": ["aten::mul", "aten::add"]}]
    assert [s["next"] for s in idle_stretches(kernels, host, min_gap=10)] == ["probs", "dw"]
    assert idle_stretches([], host, min_gap=1) == []
    first = idle_stretches(kernels, host, min_gap=20, since=0)[0]  # from the step's start to its first kernel
    assert first == {"start": 0, "length": 100, "next": "lse", "host": ["aten::sub"]}


def test_kernel_totals_sum_each_kernels_launches_longest_first():
    from benchmarks.profile_kernels import kernel_totals

    kernels = [(0, 10, "fill"), (10, 110, "lse"), (120, 125, "fill"), (130, 180, "probs"), (200, 203, "fill")]
    assert kernel_totals(kernels) == [("lse", (1, 100)), ("probs", (1, 50)), ("fill", (3, 18))]
    assert kernel_totals([]) == []
