"""The ping-pong LSE pass and P kernel (``hydrahead.kernels.pingpong``): compiled for Hopper here,
their grid and the operands they take (the kernels themselves run only on an sm_90 GPU:
tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from hopper_cubin import CUOBJDUMP, compile_in_subprocess, resource_usage, warpgroup_register_counts

from hydrahead.kernels import pingpong

_COMPILE = """
import json, os
os.environ.pop("TRITON_INTERPRET", None)
from hydrahead.kernels import pingpong
compiled = pingpong.compile_for(90, dim=int(os.environ["DIM"]), kind=os.environ["KIND"], cosine="COSINE" in os.environ)
open(os.environ["CUBIN"], "wb").write(compiled.asm["cubin"])
print(json.dumps(dict(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps)))
"""


@pytest.mark.skipif(not pingpong.GLUON or not CUOBJDUMP.exists(), reason="needs Gluon and Triton's NVIDIA tools")
@pytest.mark.parametrize(
    "kind, dim, tiles, cosine, store",
    [
        ("lse", 512, None, False, None),
        ("lse", 128, None, False, None),
        ("lse", 384, "64,256,64,4", False, None),
        ("lse", 512, "128,128,128,3", False, None),
        ("lse", 512, None, True, None),  # a column scale a tile
        ("probs", 512, None, False, "copy"),
        ("probs", 256, "64,128,64,4", False, "copy"),
        ("probs", 512, None, True, "copy"),
        ("probs", 512, None, False, "direct"),  # P from the registers: 128-class tiles, no tile of P
        ("probs", 512, None, True, "direct"),
    ],
)
def test_the_pass_compiles_for_hopper_within_its_registers_and_shared_memory(
    tmp_path, kind, dim, tiles, cosine, store, monkeypatch
):
    cubin = tmp_path / "pingpong.cubin"
    variable = "HYDRAHEAD_PINGPONG_TILES" if kind == "lse" else "HYDRAHEAD_PINGPONG_PROBS_TILES"
    env = {"DIM": str(dim), "KIND": kind, variable: tiles, "COSINE": "1" if cosine else None}
    env["HYDRAHEAD_PINGPONG_PROBS_STORE"] = store
    monkeypatch.setattr(pingpong, "PROBS_STORE", store or "copy")  # shared_bytes below, as the child counts it
    compiled = compile_in_subprocess(_COMPILE, cubin, env)
    assert int(resource_usage(cubin)["STACK"]) == 0, "spilled registers"
    # both consumers at their count (a 128 x 128 float32 tile is 128 registers a thread), the loader at its own
    counts = warpgroup_register_counts(cubin)
    assert {pingpong.CONSUMER_REGS, pingpong.LOADER_REGS} <= counts, counts
    assert compiled["num_warps"] == 12  # two consumer warpgroups and the loader's
    chosen = tuple(map(int, tiles.split(","))) if tiles else None
    expected = pingpong.shared_bytes(dim, chosen, kind)
    assert expected - 1024 <= compiled["shared"] <= expected <= pingpong.SHARED_LIMIT


@pytest.mark.parametrize("num_rows", [1, 128, 129, 1024, 4096])
@pytest.mark.parametrize("num_classes", [1, 255, 256, 257, 50_001, 1 << 20])
def test_the_grid_covers_every_class_in_whole_tile_pairs(num_rows, num_classes):
    block_g, block_c = 128, 128
    row_blocks, splits, per_split = pingpong._grid(num_rows, num_classes, block_g, block_c, programs=132)
    assert row_blocks * block_g >= num_rows > (row_blocks - 1) * block_g
    assert per_split % (2 * block_c) == 0  # each consumer a whole number of tiles a split
    assert (splits - 1) * per_split < num_classes <= splits * per_split  # no split left empty
    assert row_blocks * splits <= max(4 * 132, row_blocks)  # about four waves of one program an SM


@pytest.mark.parametrize("kind", ["lse", "probs"])
def test_the_pass_takes_bf16_rows_of_whole_k_slices_and_leaves_the_rest(kind, monkeypatch):
    def takes(dim=512, dtype=torch.bfloat16, weight_dtype=torch.bfloat16, **flags):
        feats = torch.empty(64, dim, dtype=dtype)
        weight = torch.empty(1000, dim, dtype=weight_dtype)
        flags = {"fp8": False, "cosine": False, "offset": False, **flags}
        return pingpong.supported(feats, weight, **flags, kind=kind)

    monkeypatch.setitem(pingpong.ENABLED, kind, True)  # at every batch (the P kernel: HYDRAHEAD_PINGPONG_PROBS=1)
    assert takes() and takes(dim=64) and takes(dim=384)
    assert not takes(dim=768)  # F's rows would not fit beside the ring
    assert not takes(dim=96)  # not a whole number of 64-wide K slices
    assert not takes(dtype=torch.float32, weight_dtype=torch.float32)
    assert takes(cosine=True)  # a column scale a tile
    assert not takes(fp8=True) and not takes(offset=True)
    monkeypatch.setitem(pingpong.ENABLED, kind, False)  # HYDRAHEAD_PINGPONG_LSE=0 / _PROBS=0
    assert not takes()
    # on this machine (no sm_90 GPU) the Triton pass runs
    feats, weight = torch.empty(64, 512, dtype=torch.bfloat16), torch.empty(10, 512, dtype=torch.bfloat16)
    assert not pingpong.applies(feats, weight, fp8=False, cosine=False, offset=False, kind=kind)


@pytest.mark.parametrize("setting", [None, True, False])  # unset, HYDRAHEAD_PINGPONG_PROBS=1, =0
def test_the_p_kernel_takes_the_batches_where_it_was_measured_faster(setting, monkeypatch):
    monkeypatch.setitem(pingpong.ENABLED, "probs", setting)
    weight = torch.empty(1000, 512, dtype=torch.bfloat16)
    fewest, most = pingpong.PROBS_BATCHES
    for rows in (1, 256, fewest - 1, fewest, 768, most, most + 1, 4096):
        feats = torch.empty(rows, 512, dtype=torch.bfloat16)
        taken = pingpong.supported(feats, weight, fp8=False, cosine=False, offset=False, kind="probs")
        assert taken == (fewest <= rows <= most if setting is None else setting), rows
    monkeypatch.setitem(pingpong.ENABLED, "lse", True)  # the LSE pass: on at every batch (no batch gate)
    assert pingpong.enabled("lse", 1) and pingpong.enabled("lse", 1 << 16)


def test_bad_operands_of_the_pingpong_kernels_are_refused_before_they_launch():
    feats, weight = torch.empty(64, 512, dtype=torch.bfloat16), torch.empty(1000, 512, dtype=torch.bfloat16)
    lse, scale = torch.zeros(64), torch.ones(1)
    with pytest.raises(ValueError, match="chunk inside W"):  # a chunk past W's classes
        pingpong.write_probs(torch.empty(64, 200, dtype=torch.bfloat16), feats, weight, lse, scale, 1.0, 900)
    with pytest.raises(ValueError, match="P .G x width."):  # P's rows are not the batch's
        pingpong.write_probs(torch.empty(32, 200, dtype=torch.bfloat16), feats, weight, lse, scale, 1.0, 0)
    with pytest.raises(ValueError, match="bf16 P"):
        pingpong.write_probs(torch.empty(64, 200), feats, weight, lse, scale, 1.0, 0)
    with pytest.raises(ValueError, match="16-byte rows"):  # rows 2 x 201 bytes apart: no descriptor
        pingpong.write_probs(torch.empty(64, 201, dtype=torch.bfloat16), feats, weight, lse, scale, 1.0, 0)
    last_row_short = torch.empty(63 * 208 + 201, dtype=torch.bfloat16).as_strided((64, 201), (208, 1))
    with pytest.raises(ValueError, match="last row must reach its width rounded up to 8"):
        pingpong.write_probs(last_row_short, feats, weight, lse, scale, 1.0, 0)
    probs = torch.empty(64, 200, dtype=torch.bfloat16)
    for inv_norm in (torch.ones(200), torch.ones(1000, dtype=torch.bfloat16), torch.ones(2000)[::2]):
        with pytest.raises(ValueError, match="inv_norm must be a contiguous float32 tensor of one value per class"):
            pingpong.write_probs(probs, feats, weight, lse, scale, 1.0, 0, inv_norm)  # one per class of W, not of P
        with pytest.raises(ValueError, match="inv_norm must be"):
            pingpong.split_stats(feats, weight, torch.zeros(64, dtype=torch.long), 1.0, inv_norm)


@pytest.mark.parametrize("kind", ["lse", "probs"])
@pytest.mark.parametrize("given", ["128,128,64", "96,128,64,4", "128,256,64,4", "128,128,48,4", "128,128,64,1", "a,b"])
def test_bad_tiles_are_refused_with_what_the_pass_takes(kind, given, monkeypatch):
    variable = "HYDRAHEAD_PINGPONG_TILES" if kind == "lse" else "HYDRAHEAD_PINGPONG_PROBS_TILES"
    monkeypatch.setenv(variable, given)
    with pytest.raises(ValueError, match=f"{variable} takes BLOCK_G,BLOCK_C,BLOCK_K,STAGES"):
        pingpong._tiles(kind)


def test_the_p_kernel_store_is_copy_or_direct_with_the_tiles_each_takes(monkeypatch):
    monkeypatch.delenv("HYDRAHEAD_PINGPONG_PROBS_TILES", raising=False)
    monkeypatch.setattr(pingpong, "PROBS_STORE", "copy")
    assert pingpong._tiles("probs") == pingpong.TILES["probs"]
    monkeypatch.setattr(pingpong, "PROBS_STORE", "direct")
    assert pingpong._tiles("probs") == pingpong.DIRECT_TILES == pingpong._tiles("lse")
    # no tiles of P in shared memory: the LSE pass's ring and held rows, the same bytes
    assert pingpong.shared_bytes(512, kind="probs") == pingpong.shared_bytes(512, kind="lse")
    monkeypatch.setattr(pingpong, "PROBS_STORE", "tma")
    with pytest.raises(ValueError, match="HYDRAHEAD_PINGPONG_PROBS_STORE must be copy or direct"):
        pingpong._tiles("probs")


def consumer_stats(logits, labels, splits: int, per_split: int, block_c: int):
    """What the LSE pass writes, from float64 logits (G x C): per split and consumer (the
    consumer takes alternate BLOCK_C-class tiles of its split), each row's max logit and
    sum of exp(logit - max), its target left out; G x 2·splits each (-inf and 0 where a
    consumer has no class of the row)."""
    num_rows, num_classes = logits.shape
    targets = torch.where(labels >= 0, labels, 0)
    counted = logits.scatter(1, targets[:, None], float("-inf")).where(labels[:, None] >= 0, logits)
    classes = torch.arange(num_classes, device=logits.device)
    owner = (classes // per_split * 2 + (classes % per_split) // block_c % 2).expand(num_rows, -1)
    empty = torch.full((num_rows, 2 * splits), float("-inf"), dtype=torch.float64, device=logits.device)
    row_max = empty.scatter_reduce(1, owner, counted, "amax")
    safe = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = torch.zeros_like(empty).scatter_add(1, owner, (counted - safe.gather(1, owner)).exp())
    return row_max, row_sum


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
@pytest.mark.parametrize("with_update", [False, True])
def test_the_head_hands_both_passes_to_the_pingpong_kernels_where_they_apply(with_update, margin_type, monkeypatch):
    """With both kernels emulated in torch from the arguments the head gives them (the stats
    in the kernel's layout of two consumers a split, P for each chunk's classes), the step
    follows float64: the hand-off's rows, chunks, log-sum-exp and scales are the right ones."""
    from hydrahead.head import sharded_cross_entropy
    from hydrahead.kernels import SGDUpdate, dw_update, triton_sharded_cross_entropy

    calls = []

    def logits_of(feats, rows, scale, inv_norm):
        logits = scale * feats.double() @ rows.double().t()
        return logits if inv_norm is None else logits * inv_norm.double()[None, :]

    def split_stats(feats, weight, labels, scale, inv_norm=None):
        block_g, block_c = pingpong._tiles("lse")[:2]
        _, splits, per_split = pingpong._grid(feats.shape[0], weight.shape[0], block_g, block_c, programs=4)
        logits = logits_of(feats, weight, scale, inv_norm)
        row_max, row_sum = consumer_stats(logits, labels, splits, per_split, block_c)
        calls.append(("lse", splits))
        return torch.stack([row_max.t(), row_sum.t()]).float()

    def write_probs(probs, feats, weight, lse, grad_scale, scale, chunk_lo, inv_norm=None):
        chunk = slice(chunk_lo, chunk_lo + probs.shape[1])
        inv_norm = None if inv_norm is None else inv_norm[chunk]
        probs_64 = (logits_of(feats, weight[chunk], scale, inv_norm) - lse.double()[:, None]).exp()
        probs.copy_(probs_64 * grad_scale.double() * (1.0 if inv_norm is None else inv_norm.double()[None, :]))
        calls.append(("probs", chunk_lo, probs.shape[1]))

    monkeypatch.setattr(pingpong, "applies", lambda *args, **kwargs: True)
    monkeypatch.setattr(pingpong, "split_stats", split_stats)
    monkeypatch.setattr(pingpong, "write_probs", write_probs)
    monkeypatch.setattr(dw_update, "fused_update_applies", lambda *args: False)  # the product and pass
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "0.001")  # 256-class chunks: three of them
    gen = torch.Generator().manual_seed(5)
    num_rows, dim, num_classes = 29, 24, 600
    features = torch.randn(num_rows, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen) * 0.3
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen)
    labels[::6] = -100  # ignored rows: P is zero there
    f64, w64 = features.double().requires_grad_(), weight.double().requires_grad_()
    margin = 0.2 if margin_type == "cosface" else 0.0
    ref = sharded_cross_entropy(f64, w64, labels, 0, scale=2.0, margin=margin, margin_type=margin_type)
    ref.backward()

    f, w = features.clone().requires_grad_(), weight.clone()
    buf = torch.zeros_like(weight)
    if with_update:
        update = SGDUpdate(lr=0.5, momentum=0.9, weight_decay=0.0, momentum_buffer=buf)
    else:
        update, w = None, w.requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=2.0, margin=margin, margin_type=margin_type, update=update, exact_kernels="gemm"
    )
    loss.backward()
    assert calls[0][0] == "lse" and calls[0][1] >= 2  # splits past the first: the merge folds 2 a split
    assert [c[1:] for c in calls[1:]] == [(0, 256), (256, 256), (512, 88)]
    assert abs(float(loss) - float(ref)) < 1e-5 * abs(float(ref))
    assert float((f.grad.double() - f64.grad).norm() / f64.grad.norm()) < 1e-5
    grad_w = buf.double() if with_update else w.grad.double()
    assert float((grad_w - w64.grad).norm() / w64.grad.norm()) < 1e-5
