"""The ping-pong LSE pass (``hydrahead.kernels.pingpong``): compiled for Hopper on this machine,
its grid and the operands it takes (the kernel itself runs only on an sm_90 GPU:
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
compiled = pingpong.compile_for(90, dim=int(os.environ["DIM"]))
open(os.environ["CUBIN"], "wb").write(compiled.asm["cubin"])
print(json.dumps(dict(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps)))
"""


@pytest.mark.skipif(not pingpong.GLUON or not CUOBJDUMP.exists(), reason="needs Gluon and Triton's NVIDIA tools")
@pytest.mark.parametrize("dim, tiles", [(512, None), (128, None), (384, "64,256,64,4"), (512, "128,128,128,3")])
def test_the_pass_compiles_for_hopper_within_its_registers_and_shared_memory(tmp_path, dim, tiles):
    cubin = tmp_path / "pingpong.cubin"
    compiled = compile_in_subprocess(_COMPILE, cubin, {"DIM": str(dim), "HYDRAHEAD_PINGPONG_TILES": tiles})
    assert int(resource_usage(cubin)["STACK"]) == 0, "spilled registers"
    # both consumers at their count (a 128 x 128 float32 tile is 128 registers a thread), the loader at its own
    counts = warpgroup_register_counts(cubin)
    assert {pingpong.CONSUMER_REGS, pingpong.LOADER_REGS} <= counts, counts
    assert compiled["num_warps"] == 12  # two consumer warpgroups and the loader's
    chosen = tuple(map(int, tiles.split(","))) if tiles else None
    expected = pingpong.shared_bytes(dim, chosen)
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


def test_the_pass_takes_bf16_rows_of_whole_k_slices_and_leaves_the_rest(monkeypatch):
    def takes(dim=512, dtype=torch.bfloat16, weight_dtype=torch.bfloat16, **flags):
        feats = torch.empty(64, dim, dtype=dtype)
        weight = torch.empty(1000, dim, dtype=weight_dtype)
        return pingpong.supported(feats, weight, **{"fp8": False, "cosine": False, "offset": False, **flags})

    assert takes() and takes(dim=64) and takes(dim=384)
    assert not takes(dim=768)  # F's rows would not fit beside the ring
    assert not takes(dim=96)  # not a whole number of 64-wide K slices
    assert not takes(dtype=torch.float32, weight_dtype=torch.float32)
    assert not takes(fp8=True) and not takes(cosine=True) and not takes(offset=True)
    monkeypatch.setattr(pingpong, "ENABLED", False)  # HYDRAHEAD_PINGPONG_LSE=0
    assert not takes()
    # on this machine (no sm_90 GPU) the Triton pass runs
    assert not pingpong.applies(torch.empty(64, 512, dtype=torch.bfloat16), torch.empty(10, 512, dtype=torch.bfloat16),
                                fp8=False, cosine=False, offset=False)  # fmt: skip


@pytest.mark.parametrize("given", ["128,128,64", "96,128,64,4", "128,256,64,4", "128,128,48,4", "128,128,64,1", "a,b"])
def test_bad_tiles_are_refused_with_what_the_pass_takes(given, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_PINGPONG_TILES", given)
    with pytest.raises(ValueError, match="BLOCK_G,BLOCK_C,BLOCK_K,STAGES"):
        pingpong._tiles()
