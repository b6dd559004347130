"""Tile choices of the fused kernels: candidates that fit shared memory, and the fallback
from a tile shape that does not compile to the next one."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from hydrahead.kernels import tiles
from hydrahead.kernels.tiles import TilesDoNotFit, candidate_tiles, launch_fitted

H200_SHARED = 232_448  # bytes a program may use on an H200 (Triton's limit there)
CUDA = torch.device("cuda", 0)  # only a name here: nothing runs on it


@pytest.fixture()
def h200(monkeypatch):
    monkeypatch.setattr(tiles, "_shared_memory_limit", lambda device: H200_SHARED)
    monkeypatch.setattr(tiles, "_FITTED", {})


@pytest.mark.parametrize("kernel", ["forward", "weight", "weight_fp8", "filtered"])
def test_shrinking_goes_from_the_preferred_tiles_down_to_the_smallest(kernel):
    preferred = tiles._GPU_TILES[kernel]
    chain = list(tiles._shrinking(kernel, preferred))
    assert chain[0] == preferred and len(set(chain)) == len(chain)
    assert chain[-1][:2] == (16, 16) and chain[-1][-1] == 1  # 16 x 16 blocks, one stage
    assert all(t[-2] == preferred[-2] and t[2:-2] == preferred[2:-2] for t in chain)  # warps and BLOCK_K kept
    assert all(min(t[:2]) >= 16 for t in chain)


def test_the_preferred_tiles_stay_first_where_they_fit(h200):
    for kernel in ("forward", "weight", "filtered"):
        assert candidate_tiles(kernel, 512, torch.bfloat16, CUDA)[0] == tiles._GPU_TILES[kernel]
    assert candidate_tiles("weight_fp8", 512, torch.float8_e4m3fn, CUDA)[0] == tiles._GPU_TILES["weight_fp8"]


@pytest.mark.parametrize("dim", [64, 128, 256, 384, 512, 768, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_every_width_and_dtype_has_candidates_within_shared_memory(h200, dim, dtype):
    element = torch.empty((), dtype=dtype).element_size()
    kernels = ["forward", "weight_fp8" if dtype == torch.float8_e4m3fn else "weight", "filtered"]
    for kernel in kernels:
        found = candidate_tiles(kernel, dim, dtype, CUDA)
        assert found, kernel
        assert all(tiles._footprint(kernel, t, dim, element) <= H200_SHARED for t in found), (kernel, found)


@pytest.mark.parametrize("kernel", ["weight_fp8", "weight_sliced", "lse_fp8_tma", "probs_fp8_tma"])
def test_fp8_rows_fall_back_only_to_blocks_their_dots_compile_at(h200, kernel):
    """A 16-deep fp8 product does not compile (wgmma takes fp8 32 deep at least), and a
    compile error other than shared memory ends the fallback: no block below 32 is offered."""
    found = candidate_tiles(kernel, 512, torch.float8_e4m3fn, CUDA)
    blocks = 3 if kernel.endswith("_tma") else 2
    assert found[0] == tiles._GPU_TILES[kernel] and len(found) > 1
    assert min(min(t[:blocks]) for t in found) == 32
    # bf16 rows still shrink to 16
    assert min(min(t[:2]) for t in candidate_tiles("weight_sliced", 512, torch.bfloat16, CUDA)) == 16


def test_fp32_rows_at_512_leave_the_preferred_forward_tiles_out(h200):
    """The failure this guards: fp32 weights at D=512 asked for 279 KB of shared memory."""
    preferred = tiles._GPU_TILES["forward"]
    assert tiles._footprint("forward", preferred, 512, 4) > H200_SHARED
    assert preferred not in candidate_tiles("forward", 512, torch.float32, CUDA)


def test_launch_falls_back_to_the_next_tiles_and_remembers_them(h200, monkeypatch):
    monkeypatch.setattr(tiles, "candidate_tiles", lambda *args: [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)])
    tried = []

    def launch(tile_shape):
        tried.append(tile_shape)
        if tile_shape[1] == 64:  # as a kernel that needs more shared memory than there is
            raise OutOfResources(300_000, H200_SHARED, "shared memory")
        return f"ran {tile_shape}"

    assert launch_fitted("forward", 512, torch.float32, CUDA, launch) == "ran (64, 32, 8, 2)"
    assert tried == [(64, 64, 8, 2), (64, 32, 8, 2)]
    tried.clear()
    assert launch_fitted("forward", 512, torch.float32, CUDA, launch) == "ran (64, 32, 8, 2)"
    assert tried == [(64, 32, 8, 2)]  # the tiles that worked are tried first
    tried.clear()
    launch_fitted("forward", 512, torch.float32, CUDA, launch, variant=("cosine",))
    assert tried[0] == (64, 64, 8, 2)  # another variant of the kernel is fitted on its own


def test_launch_names_the_kernel_width_and_dtype_when_nothing_fits(h200, monkeypatch):
    monkeypatch.setattr(tiles, "candidate_tiles", lambda *args: [(64, 64, 8, 2), (16, 16, 8, 1)])

    def launch(tile_shape):
        raise OutOfResources(300_000, H200_SHARED, "shared memory")

    message = r"forward kernel does not fit this GPU at D=1024 with torch.float32"
    with pytest.raises(TilesDoNotFit, match=message) as error:
        launch_fitted("forward", 1024, torch.float32, CUDA, launch)
    assert "(16, 16, 8, 1)" in str(error.value) and isinstance(error.value, ValueError)


def test_the_interpreter_takes_its_small_tiles():
    cpu = torch.device("cpu")
    assert candidate_tiles("forward", 512, torch.float32, cpu) == [tiles._CPU_TILES["forward"]]


def test_tile_overrides_name_known_kernels_and_full_tuples(monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_TILES", "probs_tma:64,128,64,4,2")
    assert tiles.tile_config("probs_tma", CUDA) == (64, 128, 64, 4, 2)
    assert tiles.tile_config("probs", CUDA) == tiles._GPU_TILES["probs"]
    for bad, message in [
        ("prob:64,128,64,4,2", "'prob', which is no fused kernel; kernels: forward"),
        ("probs_tma:64,128,4,2", "probs_tma takes 5 integers"),
        ("forward:64,x,8,2", "forward takes 4 integers"),
        ("probs_tma:128,128,512,4,3", "BLOCK_K is at most 256"),
    ]:
        monkeypatch.setenv("HYDRAHEAD_TILES", bad)
        with pytest.raises(ValueError, match=message):
            tiles.tile_config("forward", CUDA)


def test_descriptor_kernels_never_get_a_box_side_over_256(h200, monkeypatch):
    """A descriptor's box is at most 256 elements a side: an override of 512 classes per
    block shrinks to 256 for the descriptor kernel, while the pointer kernel keeps it."""
    monkeypatch.setenv("HYDRAHEAD_TILES", "probs_tma:64,512,64,4,2;probs:64,512,64,4,2")
    found = candidate_tiles("probs_tma", 512, torch.bfloat16, CUDA)
    assert found[0] == (64, 256, 64, 4, 2) and all(max(t[:3]) <= 256 for t in found)
    assert candidate_tiles("probs", 512, torch.bfloat16, CUDA)[0] == (64, 512, 64, 4, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_fp8_rows_take_their_own_descriptor_tiles(monkeypatch, dtype):
    """fp8 rows stream 128-wide K slices (128 bytes, as bf16's 64): the LSE pass and the P
    kernel launch under their own table entries, bf16 rows under theirs."""
    from hydrahead.kernels import exact_gemm, filtered
    from hydrahead.kernels.shard_ce import feature_operand

    launched = []

    def recording(kernel, *args, **kwargs):
        launched.append(kernel)
        return launch_fitted(kernel, *args, **kwargs)

    monkeypatch.setattr(filtered, "launch_fitted", recording)
    monkeypatch.setattr(exact_gemm, "launch_fitted", recording)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 32, generator=gen).to(dtype)
    operand = feature_operand(torch.randn(16, 32, generator=gen), dtype)
    labels = torch.randint(0, 48, (16,), generator=gen)
    options = dict(scale=1.0, target_shift=0.0, cosine=False)
    row_max, row_sum, _ = filtered.shard_lse(operand, weight, None, labels, **options)
    lse = row_max + row_sum.log()
    probs_pass = exact_gemm._ProbsPass(operand, weight, None, labels, lse, torch.ones(1), options)
    probs_pass.write(0, 48, 48)
    fp8 = dtype == torch.float8_e4m3fn
    assert launched == (["lse_fp8_tma", "probs_fp8_tma"] if fp8 else ["filtered_tma", "probs_tma"])
    assert tiles._GPU_TILES["lse_fp8_tma"][2] == 2 * tiles._GPU_TILES["filtered_tma"][2]
    assert tiles._GPU_TILES["probs_fp8_tma"][2] == 2 * tiles._GPU_TILES["probs_tma"][2]


@pytest.mark.parametrize(
    "regs, warps, shared, per_sm",
    [
        (237, 4, 114_824, 2),  # the fp8 P kernel's entry: two programs an SM, by shared memory
        (255, 8, 213_136, 1),  # 128 x 256 tiles: one, by shared memory and registers alike
        (200, 4, 115_736, 1),  # two would need 2 x (115,736 + 1,024) bytes, past the SM's 233,472
        (128, 4, 40_000, 4),  # four by registers (128 x 32 x 4 = 16k of 64k), shared memory allows five
        (64, 4, 20_000, 8),  # eight by registers; shared memory allows eleven, threads sixteen
        (113, 1, 1_000, 17),  # 113 registers take 120: 17 one-warp programs, not 18
        (16, 16, 1_000, 4),  # sixteen-warp programs: the 2,048 threads an SM allow four (registers eight)
    ],
)
def test_resident_programs_counts_what_bounds_a_persistent_grid(monkeypatch, regs, warps, shared, per_sm):
    """A persistent kernel's grid is the programs the GPU holds at once: the least of what
    its registers (8 a thread at a time), shared memory (1 KB reserved per
    program) and threads allow on each SM, times the SMs; the kernel is loaded first."""
    from types import SimpleNamespace

    loaded = []
    compiled = SimpleNamespace(
        n_regs=regs,
        metadata=SimpleNamespace(num_warps=warps, shared=shared),
        _init_handles=lambda: loaded.append(True),
    )
    props = SimpleNamespace(
        multi_processor_count=132,
        regs_per_multiprocessor=65536,
        shared_memory_per_multiprocessor=233_472,
        max_threads_per_multi_processor=2048,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert tiles.resident_programs(compiled, CUDA) == 132 * per_sm
    assert loaded == [True]


def test_resident_programs_lets_a_kernel_too_large_to_load_fail_as_a_launch_would():
    """Loading raises OutOfResources for a program that does not fit, so ``launch_fitted``
    moves on to smaller tiles instead of launching a grid of zero programs."""
    from types import SimpleNamespace

    def too_large():
        raise OutOfResources(300_000, 232_448, "shared memory")

    compiled = SimpleNamespace(
        n_regs=255, metadata=SimpleNamespace(num_warps=8, shared=300_000), _init_handles=too_large
    )
    with pytest.raises(OutOfResources):
        tiles.resident_programs(compiled, CUDA)
