"""The trainer on NCCL: 1 vs 2 GPUs, resume across GPU counts, and a killed rank restarted."""

from __future__ import annotations

import pytest
import torch
from launcher import launch, metrics, train_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
NCCL = ["dist.backend=nccl", "model.autocast=none", "head.impl=reference"]  # fp32 throughout: comparable across layouts


def assert_close_losses(run_dir, reference, steps):
    got, want = train_losses(run_dir), train_losses(reference)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), f"step {step}"


@pytest.fixture(scope="module")
def two_gpu_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nccl") / "two"
    launch(run_dir, 2, *NCCL)
    return run_dir


def test_one_gpu_matches_two_gpus(two_gpu_run, tmp_path):
    launch(tmp_path / "one", 1, *NCCL)
    assert_close_losses(tmp_path / "one", two_gpu_run, range(1, 13))


def test_two_gpu_checkpoint_resumes_on_one_gpu(two_gpu_run, tmp_path):
    run_dir = tmp_path / "resumed"
    launch(run_dir, 2, *NCCL, "train.stop_after=6")
    launch(run_dir, 1, *NCCL)
    assert_close_losses(run_dir, two_gpu_run, range(1, 13))


def test_killed_rank_is_restarted_and_resumes(two_gpu_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = launch(run_dir, 2, *NCCL, faults="kill@7:1", torchrun_args=["--max-restarts=1"], timeout=400)
    assert "resumed at step 4" in proc.stdout + proc.stderr
    assert_close_losses(run_dir, two_gpu_run, range(1, 13))


def test_triton_head_follows_the_reference_curve(tmp_path):
    """Two GPUs: the fused bf16 head (update inside the backward) against the fp32 reference."""
    reference, fused = tmp_path / "reference", tmp_path / "triton"
    launch(reference, 2, *NCCL, "head.impl=reference")
    launch(fused, 2, *NCCL, "head.impl=triton")  # bf16 weights by default
    want, got = train_losses(reference), train_losses(fused)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=3e-2), f"step {step}"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_overlap_follows_the_whole_batch_step_on_nccl(two_gpu_run, tmp_path, impl):
    """comm.overlap on NCCL (async gathers and reduce-scatters on their own communicator)."""
    whole, overlap = tmp_path / "whole", tmp_path / "overlap"
    extra = [f"head.impl={impl}", "head.weight_dtype=fp32"]
    launch(whole, 2, *NCCL, *extra)
    launch(overlap, 2, *NCCL, *extra, "comm.overlap=true", "comm.micro_batches=3")
    assert_close_losses(overlap, whole, range(1, 13))
    rows = [r for r in metrics(overlap) if "loss" in r]
    assert all(0 <= r["comm_hidden"] <= 1 and r["ms_grad_scatter"] >= r["ms_grad_scatter_waited"] >= 0 for r in rows)
