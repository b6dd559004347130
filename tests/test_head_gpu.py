"""The sharded loss on a CUDA device against a float64 CPU reference (bf16 needs a real GPU)."""

from __future__ import annotations

import zlib

import pytest
import torch

from hydrahead.head import sharded_cross_entropy
from test_head import MARGINS, assert_close, reference

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
    loss = sharded_cross_entropy(f, w, labels.cuda(), 0, num_classes=num_classes, scale=scale, margin=margin, margin_type=margin_type, chunk_size=4096)
    loss.backward()
    ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, margin_type, scale, margin)
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(ref_loss)) < tol * abs(float(ref_loss))
    assert_close(f.grad.cpu(), ref_fgrad, tol * 2, "feature grad")
    assert_close(w.grad.cpu(), ref_wgrad, tol * 2, "weight grad")
