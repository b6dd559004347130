"""Tile shapes of the fused kernels, and the fallback that keeps every width and dtype running.

Each kernel has a preferred tile tuple, tuned on an H200 at D = 512 with bf16 weights (the
``*_fp8_tma`` entries with fp8 rows; docs/kernels.md). Wider rows or wider elements need
more shared memory than a GPU has (fp32 at D = 512: 279 KB against the H200's 227 KB), so
a launch goes through ``launch_fitted``: it tries the preferred tiles, then smaller ones
(fewer pipeline stages, then half as many classes or samples per block, down to 16),
skipping those whose estimated footprint cannot fit, and keeps the first that compiles for
that kernel, width and dtype. The exact kernels hold whole rows (BLOCK_D = the next power
of two of D); the filtered kernels and the gemm path's P kernel ("probs") stream D in
BLOCK_K slices.

Tile tuples: stationary kernels (BLOCK_G, BLOCK_C, num_warps, num_stages), except the
sliced weight kernel ("weight_sliced": BLOCK_C, BLOCK_K, num_warps, num_stages; its
BLOCK_G is the whole batch); streaming kernels (BLOCK_G, BLOCK_C, BLOCK_K, num_warps,
num_stages). ``HYDRAHEAD_TILES=kernel:v,v,...;...``
puts a tuple of one's own first.

The streaming kernels load their operand slices through tensor descriptors (Hopper's bulk
tensor copies) where the operands allow it (``descriptor_loads``): the copy engine fetches
each slice, so no thread spends instructions on 64-bit addresses and masks beside the
epilogue's exps. At 4096 x 512 x 1M on an H200 the LSE pass went from 11.5 to 7.0 ms that way
(docs/kernels.md). Their tiles are the ``*_tma`` entries; the pointer loads remain for other
operands (a row stride that is not a multiple of 16 bytes, GPUs before Hopper) and for
``HYDRAHEAD_TMA=0``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = [
    "TilesDoNotFit",
    "block_operand",
    "candidate_tiles",
    "descriptor_loads",
    "launch_fitted",
    "programs_per_sm",
    "resident_programs",
    "tile_config",
]

# Measured on an H200 at G=4096, D=512, C_r=1M: the weight kernel takes 29.7 ms with
# 32-class blocks and 4 warps against 49.8 ms with 64 and 8; the forward wants 64 and 8
# warps. The filtered kernels: 256 x 128 x 64 measured best. The fp8 weight kernel (its
# tiles hold half the bytes) measured 39.0 ms at 64 x 64 with 8 warps against 79.6 ms at
# 64 x 32 with 4. With descriptor loads (4096 x 512 x 1M bf16): the LSE pass 7.0 ms at
# 256 x 128 x 64, 8 warps, 4 stages (7.8 with 3); the P kernel 9.5 ms at 128 x 128 x 64 with
# 4 warps, 3 stages (9.9 at 128 x 256 with 8 warps). fp8 rows take 128-wide K slices (128
# bytes, as bf16's 64): at 4096 x 512 x 1M the fp8 LSE pass 6.6 -> 5.7 ms at 256 x 128 x 128
# with 3 stages, the fp8 P kernel 12.7 -> 9.7 ms at 128 x 256 x 128 with 8 warps. The P
# kernel is persistent (one program per resident slot, tiles in a flat loop): on an H100 at
# 4096 x 512 x 1M, fp8 8.6 ms at 64 x 128 x 128 with 4 warps, two programs an SM (9.4 for
# one tile per program at 128 x 256), bf16 9.4 at 128 x 256 x 64 with 8 (10.0). With the
# targets' branch out of both passes nothing spills, and fp8 128 x 256 x 128 takes 7.9 ms
# (64 x 128: 8.7) and its LSE pass 6.4 -> 5.4 ms; docs/kernels.md. The sliced weight kernel
# (batches of up to 256 rows) on an H100 at 256 x 512 x 1M: 3.50 ms at 64 x 64 with 4 warps,
# two programs an SM (64 x 32: 4.4; 32 x 64: 4.5; 8 warps: 4.4-5.2), against 6.1 ms for the
# row-holding kernel's entry.
_GPU_TILES = {
    "forward": (64, 64, 8, 2),
    "weight": (64, 32, 4, 2),
    "weight_fp8": (64, 64, 8, 2),
    "weight_sliced": (64, 64, 4, 2),  # two programs an SM
    "filtered": (256, 128, 64, 8, 3),
    "probs": (128, 256, 64, 8, 3),
    "filtered_tma": (256, 128, 64, 8, 4),
    "probs_tma": (128, 256, 64, 8, 3),
    "lse_fp8_tma": (256, 128, 128, 8, 3),
    "probs_fp8_tma": (128, 256, 128, 8, 3),
}
_CPU_TILES = {
    "forward": (16, 16, 4, 1),
    "weight": (16, 16, 4, 1),
    "weight_fp8": (16, 16, 4, 1),
    "weight_sliced": (16, 16, 4, 1),
    "filtered": (16, 16, 16, 4, 1),
    "probs": (16, 16, 16, 4, 1),
    "filtered_tma": (16, 16, 16, 4, 1),
    "probs_tma": (16, 16, 16, 4, 1),
    "lse_fp8_tma": (16, 16, 16, 4, 1),
    "probs_fp8_tma": (16, 16, 16, 4, 1),
}  # the interpreter: small is quick
_MIN_BLOCK = 16  # tl.dot's smallest side
_MIN_FP8_BLOCK = 32  # fp8 operands: wgmma sums at least 32 deep, and a block may be a product's depth
_MAX_BOX = 256  # the copy engine's largest box side, in elements
# GEMM-shaped kernels: D streamed in BLOCK_K slices
_STREAMED_K = ("filtered", "probs", "filtered_tma", "probs_tma", "lse_fp8_tma", "probs_fp8_tma")
_TUPLE_FIELDS = {"weight_sliced": "BLOCK_C, BLOCK_K"}  # where the leading fields are not (BLOCK_G, BLOCK_C)
_SLICED_ROWS = 256  # shard_ce.SLICED_MAX_ROWS: the batch the sliced weight kernel holds
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

T = TypeVar("T")


class TilesDoNotFit(ValueError):
    """No tile shape of a kernel fits the GPU for this row width and dtype."""


def tile_config(kernel: str, device: torch.device) -> tuple[int, ...]:
    """The preferred tile tuple of ``kernel`` on ``device`` (HYDRAHEAD_TILES first).

    HYDRAHEAD_TILES names kernels as this table does: with descriptor loads on, the
    streaming kernels are the ``*_tma`` entries. A name it does not know, or a tuple of the
    wrong length, is a ValueError rather than an override that silently does nothing."""
    table = dict(_GPU_TILES if device.type == "cuda" else _CPU_TILES)
    for item in filter(None, os.environ.get("HYDRAHEAD_TILES", "").split(";")):
        name, _, values = item.partition(":")
        if name not in table:
            raise ValueError(f"HYDRAHEAD_TILES names {name!r}, which is no fused kernel; kernels: {', '.join(table)}")
        try:
            override = tuple(int(v) for v in values.split(","))
        except ValueError:
            override = ()
        if len(override) != len(table[name]):
            blocks = "BLOCK_G, BLOCK_C, BLOCK_K" if name in _STREAMED_K else "BLOCK_G, BLOCK_C"
            raise ValueError(
                f"HYDRAHEAD_TILES: {name} takes {len(table[name])} integers "
                f"({_TUPLE_FIELDS.get(name, blocks)}, num_warps, num_stages), got {values!r}"
            )
        if name.endswith("_tma") and name in _STREAMED_K and override[2] > _MAX_BOX:
            raise ValueError(f"HYDRAHEAD_TILES: {name} loads through descriptors, whose BLOCK_K is at most {_MAX_BOX}")
        table[name] = override
    return table[kernel]


def descriptor_loads(*tensors: torch.Tensor) -> bool:
    """Whether the streaming kernels can read (and write) these 2-D tensors through tensor
    descriptors: a Hopper or newer GPU (or the interpreter), unit inner stride, and a base
    and row stride that are multiples of 16 bytes, as the copy engine requires."""
    if os.environ.get("HYDRAHEAD_TMA", "1") == "0":
        return False
    for tensor in tensors:
        if tensor.dim() != 2 or tensor.stride(1) != 1 or tensor.shape[1] * tensor.element_size() < 16:
            return False
        if (tensor.stride(0) * tensor.element_size()) % 16 or tensor.data_ptr() % 16:
            return False
        if tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) < (9, 0):
            return False
        if not tensor.is_cuda and not _INTERPRETED:
            return False
    return True


def block_operand(tensor: torch.Tensor, block_shape: list[int], tma: bool):
    """``tensor`` as a kernel reads it: a descriptor of ``block_shape`` tiles, or the tensor itself."""
    return TensorDescriptor.from_tensor(tensor, block_shape) if tma else tensor


def _shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use (what Triton checks a kernel against)."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])
    except Exception:  # an unknown driver: the per-SM figure, a little above the per-program one
        return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


def _footprint(kernel: str, tiles: tuple[int, ...], dim: int, element_bytes: int) -> int:
    """Shared-memory bytes the operand tiles take (a lower bound: the compiler adds scratch)."""
    if kernel in _STREAMED_K:
        block_g, block_c, block_k, _, stages = tiles
        return stages * (block_g + block_c) * block_k * element_bytes
    if kernel == "weight_sliced":  # (BLOCK_C, BLOCK_K, ...): slices of the whole batch and the rows, P^T
        block_c, block_k, _, stages = tiles
        return (stages * (_SLICED_ROWS + block_c) * block_k + block_c * _SLICED_ROWS) * element_bytes
    block_g, block_c, _, stages = tiles
    width = max(_MIN_BLOCK, triton.next_power_of_2(dim))
    streamed, resident = (block_c, block_g) if kernel == "forward" else (block_g, block_c)
    if kernel == "weight_fp8":
        streamed *= 2  # F and its transpose
    return (stages * streamed + resident) * width * element_bytes


def _shrinking(kernel: str, preferred: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The preferred tiles, then ever smaller ones: fewer stages first, then the larger of
    the two blocks halved (with the preferred stages again), down to 16 x 16 with one stage."""
    blocks, (warps, stages) = list(preferred[:2]), preferred[-2:]
    middle = preferred[2:-2]  # the filtered kernels' BLOCK_K
    while True:
        for s in range(stages, 0, -1):
            yield (*blocks, *middle, warps, s)
        largest = 0 if blocks[0] >= blocks[1] else 1
        if blocks[largest] <= _MIN_BLOCK:
            return
        blocks[largest] //= 2


def candidate_tiles(kernel: str, dim: int, dtype: torch.dtype, device: torch.device) -> list[tuple[int, ...]]:
    """Tile tuples to try for ``kernel`` at width ``dim`` and element ``dtype``, best first;
    those whose operand tiles alone exceed the device's shared memory are left out."""
    preferred = tile_config(kernel, device)
    if device.type != "cuda":
        return [preferred]
    limit = _shared_memory_limit(device)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    shapes = list(_shrinking(kernel, preferred))
    if kernel.endswith("_tma"):  # a tensor descriptor's box has at most 256 elements a side
        shapes = [t for t in shapes if max(t[:3]) <= _MAX_BOX]
    if element_bytes == 1:  # the shrinking blocks would reach a dot that fp8 cannot compile
        blocks = 3 if kernel in _STREAMED_K else 2
        shapes = [t for t in shapes if min(t[:blocks]) >= _MIN_FP8_BLOCK] or shapes
    fitting = [t for t in shapes if _footprint(kernel, t, dim, element_bytes) <= limit]
    return fitting or [min(shapes, key=lambda t: _footprint(kernel, t, dim, element_bytes))]


_INTERPRETED_PROGRAMS = 3  # the interpreter's persistent grids: a few programs, each with several tiles


def programs_per_sm(regs: int, warps: int, shared: int, sm_registers: int, sm_shared: int, sm_threads: int) -> int:
    """Programs of a kernel (``regs`` a thread, ``warps``, ``shared`` bytes) an SM holds at
    once: the least that its registers (handed out 8 a thread at a time), shared memory (1 KB
    reserved per program) and threads allow, and at least one."""
    per_thread = -(-max(1, regs) // 8) * 8
    by_registers = sm_registers // (per_thread * 32 * warps)
    by_shared = sm_shared // (shared + 1024)
    by_threads = sm_threads // (32 * warps)
    return max(1, min(by_registers, by_shared, by_threads))


def resident_programs(compiled, device: torch.device) -> int:
    """How many programs of ``compiled`` (a kernel compiled, not yet run) the device holds at
    once: the grid of a persistent kernel. Loading it raises OutOfResources if one program
    does not fit, as a launch would, so ``launch_fitted`` moves on to smaller tiles."""
    if device.type != "cuda":
        return _INTERPRETED_PROGRAMS
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    per_sm = programs_per_sm(
        compiled.n_regs,
        compiled.metadata.num_warps,
        compiled.metadata.shared,
        props.regs_per_multiprocessor,
        props.shared_memory_per_multiprocessor,
        props.max_threads_per_multi_processor,
    )
    return props.multi_processor_count * per_sm


_FITTED: dict[tuple, tuple[int, ...]] = {}


def launch_fitted(
    kernel: str, dim: int, dtype: torch.dtype, device: torch.device, launch: Callable[[tuple], T], variant: tuple = ()
) -> T:
    """``launch(tiles)`` with the first candidate tile tuple whose kernel fits the device.

    A kernel that needs more shared memory than the device has fails when it is compiled,
    before it runs, so trying the next candidate is safe. The tuple that worked is kept
    per (kernel, width, dtype, device, ``variant``: the launch's other compile-time
    choices) and tried first next time.
    """
    key = (kernel, dim, dtype, device.type, device.index, variant)
    failures = []
    fitted = _FITTED.get(key)
    if fitted is not None:  # the common case, every step: no candidates to work out
        try:
            return launch(fitted)
        except OutOfResources as error:
            failures.append(f"{fitted}: {error}")
    for tiles in candidate_tiles(kernel, dim, dtype, device):
        if tiles == fitted:
            continue
        try:
            result = launch(tiles)
        except OutOfResources as error:
            failures.append(f"{tiles}: {error}")
            continue
        _FITTED[key] = tiles
        return result
    raise TilesDoNotFit(
        f"the fused {kernel} kernel does not fit this GPU at D={dim} with {dtype} rows; tiles tried:\n  "
        + "\n  ".join(failures)
    )
