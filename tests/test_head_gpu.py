"""The sharded loss on a CUDA device against a float64 CPU reference (bf16 needs a real GPU)."""

from __future__ import annotations

import zlib

import pytest
import torch
from test_head import MARGINS, assert_close, reference

from hydrahead.head import sharded_cross_entropy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-3)])
@pytest.mark.parametrize("margin_type", ["none", "cosface", "arcface"])
def test_cuda_matches_float64_reference(dtype, tol, margin_type):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{margin_type}".encode()))
    batch, dim, num_classes = 512, 128, 50_000
    features = torch.randn(batch, dim, generator=gen).to(dtype)
    weight = (torch.randn(num_classes, dim, generator=gen) * 0.1).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[::7] = -100
    scale, margin = MARGINS[margin_type]
    f = features.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    loss = sharded_cross_entropy(
        f,
        w,
        labels.cuda(),
        0,
        num_classes=num_classes,
        scale=scale,
        margin=margin,
        margin_type=margin_type,
        chunk_size=4096,
    )
    loss.backward()
    ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, margin_type, scale, margin)
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(ref_loss)) < tol * abs(float(ref_loss))
    assert_close(f.grad.cpu(), ref_fgrad, tol * 2, "feature grad")
    assert_close(w.grad.cpu(), ref_wgrad, tol * 2, "weight grad")


@pytest.mark.parametrize("fixed_size, most_in_head", [(False, 2), (True, 0)])
def test_knn_training_step_reads_the_device_a_few_times_only(fixed_size, most_in_head):
    """A training step with knn selection over a torch IVF index and fp8 weights: each host
    read drains the GPU's queue, so the step makes one (the trainer's flags, which carry the
    loss's checks and finiteness too) and the head only what it cannot do without: the
    active rows' count, none with head.knn_fixed_size. profile_step.py --syncs counts them
    by the hydrahead line that asked."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "1",
        str(root / "benchmarks" / "profile_step.py"),
        "--config",
        str(root / "configs" / "quickstart.yaml"),
        "--warmup",
        "3",
        "--steps",
        "1",
        "--syncs",
        "--per-gpu-batch",
        "256",
        "dist.backend=nccl",
        "head.num_classes=200000",
        "head.impl=triton",
        "head.weight_dtype=fp8_e4m3",
        "head.rounding=stochastic",
        "head.selection=knn",
        "head.index=torch",
        "head.index_type=ivf",
        "head.index_nlist=256",
        "head.index_nprobe=4",
        f"head.knn_fixed_size={str(fixed_size).lower()}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.search(r"host-device synchronisations in one step: (\d+)\n((?:\s+\d+\s+\S.*\n)*)", out.stdout)
    assert found, out.stdout[-3000:]
    lines = [line.split(None, 1) for line in found.group(2).strip().splitlines()]
    head = sum(
        int(count)
        for count, where in lines
        if where.startswith(("hydrahead/head/", "hydrahead/kernels/", "hydrahead/optim/"))
    )
    ours = sum(int(count) for count, where in lines if where.startswith("hydrahead/"))
    assert head <= most_in_head and ours <= most_in_head + 1, found.group(0)


def test_fused_fp32_head_at_width_512_trains_and_resumes_exactly(tmp_path):
    """Through the launcher on one GPU: fp32 rows at D=512 (which once asked for more shared
    memory than the GPU has) over random active rows, stopped at step 5 and resumed, as the
    run that never stopped (its rows owe deferred steps at the save)."""
    from launcher import launch, train_losses

    options = ["dist.backend=nccl", "head.impl=triton", "head.weight_dtype=fp32", "model.embed_dim=512",
               "head.selection=random", "head.budget=0.3", "head.weight_decay=0.001", "train.eval_every=0"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch(straight, 1, *options)
    launch(stopped, 1, *options, "train.stop_after=5")
    launch(stopped, 1, *options)
    want = train_losses(straight)
    assert sorted(want) == list(range(1, 13)) and all(v == v for v in want.values())
    assert train_losses(stopped) == want
