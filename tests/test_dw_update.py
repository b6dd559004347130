"""The fused dW + update kernel (``hydrahead.kernels.dw_update``): compiled for Hopper on this
machine, and the gemm path's hand-off to it, chunk by chunk, with the kernel emulated in
torch (the kernel itself runs only on an sm_90 GPU: tests/test_kernels_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hopper_cubin import CUOBJDUMP, compile_in_subprocess, resource_usage, warpgroup_register_counts

from hydrahead.head import sharded_cross_entropy
from hydrahead.kernels import SGDUpdate, dw_update, exact_gemm, triton_sharded_cross_entropy

_COMPILE = """
import json, os
os.environ.pop("TRITON_INTERPRET", None)
from hydrahead.kernels import dw_update
compiled = dw_update.compile_for(90, num_rows=int(os.environ["ROWS"]))
open(os.environ["CUBIN"], "wb").write(compiled.asm["cubin"])
meta = compiled.metadata
print(json.dumps(dict(shared=meta.shared, num_warps=meta.num_warps, name=meta.name)))
"""


def _chosen(tiles, num_rows):
    return (tuple(map(int, tiles.split(","))) + (0,))[:6] if tiles else dw_update._tiles(num_rows)


@pytest.mark.skipif(not dw_update.GLUON or not CUOBJDUMP.exists(), reason="needs Gluon and Triton's NVIDIA tools")
@pytest.mark.parametrize(
    "tiles, num_rows",
    [
        (None, 256),
        (None, 1024),
        ("64,64,64,4,4,384", 384),
        ("64,64,64,4,4,768", 768),
        ("64,128,64,4,2", 768),
        ("64,64,64,6,4,384", 64),
        ("64,64,128,6,4,384", 128),
    ],
)  # the table's at 256 (one K block, dF in two partitions) and 1,024 rows (the wide variant); F's
# column held, six and twelve slices (the most that fit); the 64 x 128 tiles with two slots; dF in one
# partition (a batch of one 64- or 128-row block)
def test_the_fused_kernel_compiles_for_hopper_within_its_registers_and_shared_memory(tmp_path, tiles, num_rows):
    cubin = tmp_path / "dw_update.cubin"
    env = {"ROWS": str(num_rows), "HYDRAHEAD_DW_UPDATE_TILES": tiles}
    compiled = compile_in_subprocess(_COMPILE, cubin, env)
    assert int(resource_usage(cubin)["STACK"]) == 0, "spilled registers"
    # each warpgroup's count as the host reckons it, and the two consumers (which take
    # alternate tiles, so the slower sets the pace) within 8 registers of each other
    chosen = _chosen(tiles, num_rows)
    if chosen[4] > 0:  # the wide variant has no dF partitions and the table's counts
        counts = warpgroup_register_counts(cubin)
        regs = dw_update.partition_registers(dw_update.features_parts(num_rows, chosen))
        assert {regs["first_consumer"], regs["second_consumer"], regs["loaders"]} <= counts, (regs, counts)
        assert abs(regs["first_consumer"] - regs["second_consumer"]) <= 8, regs
    # the host's count, which decides whether a tile set runs, is the compiled kernel's to
    # within the margin it keeps for the compiler
    expected = dw_update.shared_bytes(
        chosen, dw_update._held_slices(num_rows, chosen), dw_update.features_parts(num_rows, chosen)
    )
    assert expected - 1024 <= compiled["shared"] <= expected <= dw_update.SHARED_LIMIT
    # one warpgroup each: two consumers, the two loaders, and each dF partition
    assert compiled["num_warps"] == 12 + 4 * dw_update.features_parts(num_rows, chosen)
    # the variant the batch takes: SLOTS = 0 is the wide kernel (the table's entry at 1,024 rows)
    assert ("wide" in compiled["name"]) == (chosen[4] == 0), (compiled["name"], chosen)


def _emulated_kernel(calls, lrs=None, skips=None):
    def fused(probs, feats, rows, buffer, *, lr, momentum, weight_decay, features_grad=False, skip=None):
        calls.append(rows.shape[0])
        if lrs is not None:
            lrs.append(lr)
        if skips is not None:
            skips.append(skip)
        grad_feat = probs.double().mm(rows.double()).float() if features_grad else None  # the rows before the step
        if skip is not None and int(skip):  # the loss's verdict: no row written
            return grad_feat
        buffer.mul_(momentum).add_(probs.double().t().mm(feats.double()).to(buffer.dtype) + weight_decay * rows)
        rows.sub_(lr * buffer)
        return grad_feat

    return fused


@pytest.mark.parametrize(
    "margin_type, lr_kind, kernel_df",
    [("none", "number", False), ("none", "tensor", False), ("cosface", "number", False), ("none", "number", True)],
)  # kernel_df: the kernel also returns dF's part of each chunk, and no product runs for it
def test_the_gemm_path_hands_each_chunk_to_the_fused_kernel_where_it_applies(
    margin_type, lr_kind, kernel_df, monkeypatch
):
    calls, lrs, skips = [], [], []
    monkeypatch.setattr(exact_gemm, "FUSED_DW_UPDATE", True)
    monkeypatch.setattr(dw_update, "fused_update_applies", lambda *args: True)
    monkeypatch.setattr(dw_update, "takes_features_grad", lambda *args: kernel_df)
    monkeypatch.setattr(dw_update, "fused_dw_update", _emulated_kernel(calls, lrs, skips))
    products = []
    matmul = exact_gemm.matmul_fp32
    monkeypatch.setattr(exact_gemm, "matmul_fp32", lambda *args: products.append(1) or matmul(*args))
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "0.001")  # 256-class chunks: three of them
    gen = torch.Generator().manual_seed(3)
    num_rows, dim, num_classes = 29, 24, 600
    features = torch.randn(num_rows, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen) * 0.3
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen)
    buffer = torch.randn_like(weight) * 0.01
    scale, margin = {"none": (2.0, 0.0), "cosface": (16.0, 0.3)}[margin_type]
    lr, momentum, weight_decay = 0.5, 0.9, 5e-4

    f64, w64 = features.double().requires_grad_(), weight.double().requires_grad_()
    ref = sharded_cross_entropy(f64, w64, labels, 0, scale=scale, margin=margin, margin_type=margin_type)
    ref.backward()
    ref_buf = momentum * buffer.double() + w64.grad + weight_decay * weight.double()
    ref_w = weight.double() - lr * ref_buf

    w, buf = weight.clone(), buffer.clone()
    f = features.clone().requires_grad_()
    # a tensor lr, as a captured step holds it: the kernel reads it on the device
    given_lr = torch.tensor([lr]) if lr_kind == "tensor" else lr
    update = SGDUpdate(lr=given_lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf)
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=scale, margin=margin, margin_type=margin_type, update=update, exact_kernels="gemm"
    )
    loss.backward()
    # cosine logits need the projection, which the fused kernel does not take: it is passed by
    assert calls == ([] if margin_type == "cosface" else [256, 256, 88])
    assert len(products) == (0 if kernel_df else 3)  # dF's product a chunk, unless the kernel took it
    if calls:  # one float32 lr on the device, made once for the step's chunks
        assert all(got is lrs[0] for got in lrs)
        assert lrs[0].dtype == torch.float32 and lrs[0].shape == (1,) and float(lrs[0]) == lr
        # the loss's verdict, on the device, the same tensor for every chunk: this step lands
        assert all(got is skips[0] for got in skips) and skips[0].dtype == torch.int32 and int(skips[0]) == 0
    assert _rel_err(f.grad, f64.grad) < 1e-5, "dF from the rows before the update"
    assert _rel_err(buf, ref_buf) < 1e-5
    assert _rel_err(w - weight, ref_w - weight.double()) < 1e-5, "the update itself, not just the rows"


def _rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_the_fused_kernel_is_handed_the_verdict_of_a_nan_loss(monkeypatch):
    """A NaN feature: every chunk's launch gets the loss's skip flag set (the kernel itself is
    held to it on a GPU: test_kernels_gpu.py), so an emulated kernel that honours it leaves
    the rows and buffer as they were."""
    calls, skips = [], []
    monkeypatch.setattr(exact_gemm, "FUSED_DW_UPDATE", True)
    monkeypatch.setattr(dw_update, "fused_update_applies", lambda *args: True)
    monkeypatch.setattr(dw_update, "fused_dw_update", _emulated_kernel(calls, skips=skips))
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "0.001")
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(29, 24, generator=gen)
    features[3, 3] = float("nan")
    weight = torch.randn(600, 24, generator=gen) * 0.3
    buffer = torch.randn_like(weight) * 0.01
    w, buf = weight.clone(), buffer.clone()
    labels = torch.randint(0, 600, (29,), generator=gen)
    update = SGDUpdate(lr=0.5, momentum=0.9, weight_decay=5e-4, momentum_buffer=buf)
    loss = triton_sharded_cross_entropy(features.requires_grad_(), w, labels, 0, update=update, exact_kernels="gemm")
    loss.backward()
    assert torch.isnan(loss) and calls == [256, 256, 88]
    assert all(got is skips[0] for got in skips) and int(skips[0]) == 1
    assert torch.equal(w, weight) and torch.equal(buf, buffer)


def test_the_fused_kernel_takes_only_the_step_it_implements():
    def case(width=64, rows_dtype=torch.bfloat16, buffer_dtype=torch.float32, batch=64, **changes):
        rows = torch.zeros(width, 128, dtype=rows_dtype)
        probs = torch.zeros(batch, width, dtype=torch.bfloat16)
        feats = torch.zeros(batch, 128, dtype=torch.bfloat16)
        options = dict(lr=0.1, momentum=0.9, momentum_buffer=torch.zeros(width, 128, dtype=buffer_dtype))
        return dw_update.step_supported(probs, feats, rows, SGDUpdate(**{**options, **changes}))

    assert case()
    assert not case(rows_dtype=torch.float32)
    assert not case(buffer_dtype=torch.bfloat16)
    assert not case(momentum=0.0, momentum_buffer=None)
    assert not case(rounding="stochastic")
    assert not case(compensation=torch.zeros(64, 128, dtype=torch.bfloat16))
    assert case(lr=torch.tensor(0.1))  # read on the device, as a captured step needs
    assert not case(width=36)  # P's rows 72 bytes apart: no tensor descriptor
    assert dw_update._tiles(256) != dw_update._tiles(512)  # one K block with dF inside, then the wide variant
    # past 4,096 rows the step keeps the product and the update pass (not measured there)
    assert case(batch=64) and case(batch=768) and case(batch=4096) and not case(batch=4097)
    assert dw_update._tiles(384) == dw_update._tiles(4096) == dw_update.WIDE_TILES != dw_update._tiles(383)
    assert not case(batch=32)  # below the smallest batch run on a GPU
    # no GPU here: never taken, whatever the step
    rows, probs, feats = torch.zeros(64, 128, dtype=torch.bfloat16), torch.zeros(32, 64), torch.zeros(32, 128)
    update = SGDUpdate(lr=0.1, momentum=0.9, momentum_buffer=torch.zeros(64, 128))
    assert not dw_update.fused_update_applies(probs.bfloat16(), feats.bfloat16(), rows, update)


def test_tiles_given_in_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "128,64,64,3,2")
    assert dw_update._tiles() == (128, 64, 64, 3, 2, 0)
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "64,64,64,4,4,384")
    assert dw_update._tiles(1024) == (64, 64, 64, 4, 4, 384)
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "128,128,64,6,0")  # the wide variant
    assert dw_update._tiles(1024) == (128, 128, 64, 6, 0, 0)
    for wrong in (
        "128,64,64,4",
        "64,64,64,4,3",
        "64,x,64,4,4",
        "64,64,64,4,4,384,1",
        "64,128,64,6,0",
        "128,128,64,6,0,256",
        "128,256,64,4,0",
        "64,64,64,1,4",
        "64,64,64,4,-2",
    ):
        monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", wrong)
        with pytest.raises(ValueError, match="BLOCK_C,BLOCK_D,BLOCK_K,STAGES,SLOTS"):
            dw_update._tiles()


def test_the_benchmark_reads_its_shapes_and_says_what_it_needs():
    import argparse

    from benchmarks import dw_update as bench

    assert bench._shape("256x512x1048576") == (256, 512, 1048576)
    with pytest.raises(argparse.ArgumentTypeError, match="GxDxC"):
        bench._shape("256x512")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sm_90"):
            bench.main(["--shapes", "64x64x64"])


def test_the_fused_kernel_names_operands_of_the_wrong_shape():
    probs, feats = torch.zeros(64, 128, dtype=torch.bfloat16), torch.zeros(64, 32, dtype=torch.bfloat16)
    rows, buffer = torch.zeros(128, 32, dtype=torch.bfloat16), torch.zeros(128, 32)
    for wrong in (
        (probs, feats[:, :16], rows, buffer),  # F narrower than the rows
        (probs[:32], feats, rows, buffer),  # P and F from different batches
        (probs, feats, rows, buffer[:64]),  # a buffer of other rows
        (probs[:, :64], feats, rows, buffer),  # P over other classes
    ):
        with pytest.raises(ValueError, match="takes P"):
            dw_update.fused_dw_update(*wrong, lr=0.1, momentum=0.9, weight_decay=0.0)


def test_a_held_f_takes_its_slices_and_a_grid_of_whole_d_columns():
    held_tiles = (64, 64, 64, 4, 4, 384)
    assert dw_update._held_slices(256, held_tiles) == 4
    assert dw_update._held_slices(257, held_tiles) == 5  # a slice past the batch's last row
    assert dw_update._held_slices(385, held_tiles) == 0  # past HOLD_ROWS: F rides the ring
    assert dw_update._held_slices(256, (64, 64, 64, 4, 4, 0)) == 0
    # 8 D columns: the grid is a multiple of 8, at least 8, at most the tiles
    assert dw_update._grid(num_tiles=8 * 1000, tiles_d=8, programs=132, held=4) == 128
    assert dw_update._grid(num_tiles=8 * 1000, tiles_d=8, programs=3, held=4) == 8
    assert dw_update._grid(num_tiles=8 * 2, tiles_d=8, programs=132, held=4) == 16
    assert dw_update._grid(num_tiles=8 * 1000, tiles_d=8, programs=132, held=0) == 132
    for tiles_d, programs, num_c in ((8, 132, 1000), (4, 7, 3), (6, 100, 50)):
        grid = dw_update._grid(num_c * tiles_d, tiles_d, programs, held=2)
        # each program's tiles (tile = program + i * grid) stay in the program's D column
        for program in range(grid):
            columns = {tile % tiles_d for tile in range(program, num_c * tiles_d, grid)}
            assert columns == {program % tiles_d}


def test_a_tile_set_past_shared_memory_is_refused_before_its_launch(monkeypatch):
    # 64 x 128 tiles holding 12 of F's slices: 328 KB of shared memory
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "64,128,64,4,2,768")
    probs = torch.zeros(768, 64, dtype=torch.bfloat16)
    feats = torch.zeros(768, 128, dtype=torch.bfloat16)
    rows = torch.zeros(64, 128, dtype=torch.bfloat16)
    update = SGDUpdate(lr=0.1, momentum=0.9, momentum_buffer=torch.zeros(64, 128))
    assert not dw_update.step_supported(probs, feats, rows, update)  # the step keeps the product and pass
    assert dw_update.step_supported(probs[:384], feats[:384], rows, update)  # six slices fit
    with pytest.raises(ValueError, match="shared memory"):
        dw_update.fused_dw_update(probs, feats, rows, update.momentum_buffer, lr=0.1, momentum=0.9, weight_decay=0.0)


def test_the_wide_variant_refuses_rows_it_cannot_index(monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "128,128,64,6,0")
    probs, feats = torch.zeros(64, 128, dtype=torch.bfloat16), torch.zeros(64, 32, dtype=torch.bfloat16)
    rows, buffer = torch.zeros(128, 32, dtype=torch.bfloat16), torch.zeros(128, 32)
    for wrong in (
        (rows.t().contiguous().t(), buffer),  # rows stepping by C along D
        (rows, buffer.t().contiguous().t()),
        (rows, buffer.bfloat16()),
        (rows.float(), buffer),
    ):
        with pytest.raises(ValueError, match="wide variant takes"):
            no_skip = torch.zeros((), dtype=torch.int32)
            dw_update._launch_wide(probs, feats, *wrong, (128, 128, 64, 6, 0, 0), 0.1, no_skip, 0.9, 0.0, programs=1)


@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False"), ("1", "True")])
def test_the_gemm_path_takes_the_fused_kernel_unless_told_not_to(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "HYDRAHEAD_FUSED_DW_UPDATE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    if setting is not None:
        env["HYDRAHEAD_FUSED_DW_UPDATE"] = setting
    code = "from hydrahead.kernels import exact_gemm; print(exact_gemm.FUSED_DW_UPDATE)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == expected, done.stderr[-2000:]


def test_the_kernel_takes_df_only_where_the_batch_is_one_k_block(monkeypatch):
    """dF inside the kernel needs F held in one K slice of at most 256 rows and epilogue slots:
    the table's one-block tiles up to 256 rows, not the 64-row slices past them, the 64 x 128
    tiles or the wide variant; a call that asks for it elsewhere is refused before any launch."""
    assert dw_update.takes_features_grad(256) and dw_update.features_parts(256) == 2
    assert (
        dw_update.takes_features_grad(100, (64, 64, 128, 6, 4, 384))
        and dw_update.features_parts(100, (64, 64, 128, 6, 4, 384)) == 1
    )
    assert not dw_update.takes_features_grad(300)  # 64-row slices, F held in five
    assert not dw_update.takes_features_grad(512) and not dw_update.takes_features_grad(1024)
    assert not dw_update.takes_features_grad(257, dw_update.FEATURES_TILES)  # two K blocks
    monkeypatch.setattr(dw_update, "FEATURES_GRAD", False)  # HYDRAHEAD_FUSED_DW_FEATURES=0
    assert not dw_update.takes_features_grad(256) and dw_update.features_parts(256) == 0
    monkeypatch.setattr(dw_update, "FEATURES_GRAD", True)
    monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", "64,128,64,4,2")
    probs, feats = torch.zeros(256, 128, dtype=torch.bfloat16), torch.zeros(256, 64, dtype=torch.bfloat16)
    rows, buffer = torch.zeros(128, 64, dtype=torch.bfloat16), torch.zeros(128, 64)
    with pytest.raises(ValueError, match="dF needs"):
        dw_update.fused_dw_update(
            probs, feats, rows, buffer, lr=0.1, momentum=0.9, weight_decay=0.0, features_grad=True
        )


@pytest.mark.skipif(not dw_update.GLUON, reason="needs Gluon")
def test_descriptors_share_one_layout_per_block_and_dtype_and_describe_their_own_tensor():
    rows = torch.empty(1024, 512, dtype=torch.bfloat16)
    first = dw_update._descriptor(rows, [128, 64])
    other = dw_update._descriptor(torch.empty(64, 128, dtype=torch.bfloat16), [128, 64])
    assert first.layout is other.layout  # built once: most of a descriptor's host time
    assert first.layout == dw_update.gl.NVMMASharedLayout.get_default_for([128, 64], dw_update.gl.bfloat16)
    assert (list(first.shape), list(other.shape)) == ([1024, 512], [64, 128]) and first.base is rows
    fp32 = dw_update._descriptor(torch.empty(256, 512), [128, 64])  # another dtype, another layout
    assert fp32.layout == dw_update.gl.NVMMASharedLayout.get_default_for([128, 64], dw_update.gl.float32)
    assert fp32.layout != first.layout
