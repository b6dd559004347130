"""Registers, spills and shared memory of the exact step's Triton kernels, per tile shape,
compiled for a GPU architecture on any machine: no GPU is needed.

    python benchmarks/kernel_resources.py                                   # the table's entries, bf16 and fp8
    python benchmarks/kernel_resources.py --kernels probs --dtypes fp8 --tiles "128,256,128,8,3;64,128,128,4,4"
    python benchmarks/kernel_resources.py --kernels weight,sliced --dtypes bf16 --tiles "32,16,8,2;64,64,4,2"
    python benchmarks/kernel_resources.py --json /tmp/resources.json
    python benchmarks/kernel_resources.py --kernels dw_update --rows 128,256,1024     # the batch table's tiles
    python benchmarks/kernel_resources.py --kernels dw_update --rows 256 --dw-tiles "64,64,256,3,4,384"

The gemm path's two passes, probs (the P kernel) and lse, are compiled with their operands
read and written through tensor descriptors, as they run at D = 512; the stationary
kernels (forward; weight, which holds whole rows; sliced, the weight kernel for batches of
up to 256 rows) with pointer loads, the weight kernels with the update and a float32
momentum buffer. Each (kernel, dtype, tiles) is compiled by Triton for ``--arch`` (90:
Hopper), and the cubin's resource usage is read with the ``cuobjdump`` that ships with Triton:

  regs         registers a thread (255 is the most a thread can hold)
  spill_bytes  the local-memory stack a thread needs: registers spilled to memory
  shared_kib   shared memory a program takes (pipeline stages, plus the epilogue's staging)
  per_sm       programs an SM holds at once by registers, shared memory and threads: the
               persistent P kernel launches this many per SM (``tiles.resident_programs``)

dw_update, the fused dW + SGD kernel (Gluon, bf16 rows, one program an SM), is compiled for
each batch of ``--rows`` as a step of that batch would launch it (its tiles from the batch
table, or ``--dw-tiles``). Its warpgroups share the launch's registers and each sets its own
count, so its row also gives them (``warpgroups``: first consumer / second consumer /
loaders / each dF partition, as ``dw_update.partition_registers`` reckons them) and whether
the cubin sets those counts (``cubin_agrees``). The launch's ``regs`` is then the count a
thread starts with, not what any partition holds.

Counting before timing: a tile that spills or holds one program an SM is worth knowing
about before a GPU run is spent on it. What the compiler does is Triton's own: the figures
come from this machine's Triton, which need not be the GPU machine's (shared memory has
matched exactly; registers within a few). Arguments carry the alignment a launch at D = 512
gives them (pointers, strides and D divisible by 16): without it, pointer loads compile
unvectorised and unpipelined, and the counts are not the launch's.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, never interpret them

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_table  # noqa: E402
from hydrahead.kernels import dw_update, exact_gemm, filtered, shard_ce, tiles  # noqa: E402
from hydrahead.kernels.rounding import rounding_plan  # noqa: E402
from hydrahead.kernels.shard_ce import _precision  # noqa: E402

# Hopper's per-SM limits (H100 and H200 alike): registers, shared memory, threads
_SM_REGISTERS, _SM_SHARED, _SM_THREADS = 65536, 233472, 2048
_DTYPES = {"bf16": (torch.bfloat16, "bf16", "bf16"), "fp8": (torch.float8_e4m3fn, "fp8e4nv", "fp8e5")}
_ENTRIES = {  # (kernel, dtype) -> the tile table's entry name
    ("probs", "bf16"): "probs_tma",
    ("probs", "fp8"): "probs_fp8_tma",
    ("lse", "bf16"): "filtered_tma",
    ("lse", "fp8"): "lse_fp8_tma",
}
_STATIONARY = {  # kernel -> (JIT function, the tile table's entry, the tuple's leading fields)
    "forward": (shard_ce._forward_kernel, "forward", "BLOCK_G,BLOCK_C"),
    "weight": (shard_ce._weight_kernel, "weight", "BLOCK_G,BLOCK_C"),
    "sliced": (shard_ce._weight_sliced_kernel, "weight_sliced", "BLOCK_C,BLOCK_K"),
}
_KERNELS = ("probs", "lse", *_STATIONARY, "dw_update")
_SCALARS = {"G", "C", "D", "c_lo", "c_hi", "g_store", "c_store", "classes_per_split", "first_class", "key1", "key2"}
_FLOATS = {"scale", "target_shift", "lr", "momentum", "weight_decay"}
_D = 512


def _tuple_length(kernel: str) -> int:
    return 4 if kernel in _STATIONARY else 5


def _stationary_signature(kernel: str, dtype: str, tile: tuple[int, ...], batch: int) -> tuple:
    """The stationary kernels at D = 512, the weight kernels with the update (nearest
    rounding for bf16 rows, stochastic for fp8) and a float32 momentum buffer."""
    torch_dtype, operand, _ = _DTYPES[dtype]
    fn = _STATIONARY[kernel][0]
    fp8 = dtype == "fp8"
    constants = dict(COSINE=False, FP8=fp8, PRECISION=_precision(torch_dtype), EXACT_CAST=False)
    if kernel == "forward":
        constants.update(BLOCK_G=tile[0], BLOCK_C=tile[1], BLOCK_D=_D)
    else:
        update = shard_ce.SGDUpdate(lr=0.1, momentum=0.9, rounding="stochastic" if fp8 else "nearest")
        plan = rounding_plan(torch.empty(1, _D, dtype=torch_dtype), update)
        constants.update(HAS_BUF=True, HAS_COMP=False, HAS_IDS=False, **plan.constants)
        if kernel == "weight":
            constants.update(UPDATE=True, BLOCK_G=tile[0], BLOCK_C=tile[1], BLOCK_D=_D)
        else:
            constants.update(BLOCK_G=shard_ce.sliced_block_g(batch, fp8), BLOCK_C=tile[0], BLOCK_K=tile[1])
    pointers = {"F": operand, "FT": operand, "W": operand, "DW": "fp32", "LOCAL_LABEL": "i64", "CLASS_IDS": "i64"}
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in _SCALARS or name.startswith("stride"):
            types[name] = "i32"
        elif name in _FLOATS:
            types[name] = "fp32"
        else:
            types[name] = "*" + pointers.get(name, "fp32")
    return fn, types, constants


def _signature(kernel: str, dtype: str, tile: tuple[int, ...], batch: int) -> tuple:
    """(JIT function, argument types, compile-time constants) of one compilation."""
    if kernel in _STATIONARY:
        return _stationary_signature(kernel, dtype, tile, batch)
    torch_dtype, operand, probs = _DTYPES[dtype]
    block_g, block_c, block_k = tile[:3]
    fn = exact_gemm._probs_kernel if kernel == "probs" else filtered._lse_kernel
    descriptors = {
        "F": f"tensordesc<{operand}[{block_g}, {block_k}]>",
        "W": f"tensordesc<{operand}[{block_c}, {block_k}]>",
        "P": f"tensordesc<{probs}[{block_g}, {block_c}]>",
        "P_T": f"tensordesc<{probs}[{block_c}, {block_g}]>",
        "LOCAL_LABEL": "*i64",
    }
    constants = dict(
        COSINE=False,
        HAS_OFFSET=False,
        FP8=dtype == "fp8",
        PRECISION=_precision(torch_dtype),
        EVEN_K=True,
        BLOCK_G=block_g,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        TMA=True,
    )
    if kernel == "probs":
        constants["EXACT_CAST"] = False
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in descriptors:
            types[name] = descriptors[name]
        elif name in _SCALARS or name.startswith("stride"):
            types[name] = "i32"
        elif name in _FLOATS:
            types[name] = "fp32"
        else:
            types[name] = "*fp32"
    return fn, types, constants


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"no cuobjdump at {path}: this Triton does not ship the NVIDIA tools")
    return str(path)


def _cubin_usage(cubin_bytes: bytes, warpgroup_counts: bool = False) -> tuple[int, int, set[int]]:
    """A cubin's registers a thread, spill stack in bytes, and (``warpgroup_counts``: read
    from its assembly) the register counts its warpgroups set at run time with setmaxnreg."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(cubin_bytes)
        cubin.flush()
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
        sass = ""
        if warpgroup_counts:
            sass = subprocess.run([_cuobjdump(), "-sass", cubin.name], capture_output=True, text=True, check=True)
            sass = sass.stdout
    usage = dict(
        item.split(":", 1) for line in dump.splitlines() if "REG:" in line for item in line.split() if ":" in item
    )
    counts = {int(v, 16) for v in re.findall(r"USETMAXREG\.\w+\.CTAPOOL (?:UP\d, )?(0x[0-9a-f]+)", sass)}
    return int(usage["REG"]), int(usage["STACK"]), counts


def dw_update_resources(num_rows: int, tile: tuple[int, ...] | None = None, arch: int = 90) -> dict:
    """The fused dW + SGD kernel compiled for a batch of ``num_rows`` (``tile``: its
    HYDRAHEAD_DW_UPDATE_TILES fields; None: the batch table's): the launch's registers, spills
    and shared memory, and each warpgroup's register count."""
    saved = os.environ.pop("HYDRAHEAD_DW_UPDATE_TILES", None)
    if tile:
        os.environ["HYDRAHEAD_DW_UPDATE_TILES"] = ",".join(map(str, tile))
    try:
        chosen = dw_update._tiles(num_rows)
        compiled = dw_update.compile_for(arch, _D, num_rows)
    finally:
        os.environ.pop("HYDRAHEAD_DW_UPDATE_TILES", None)
        if saved is not None:
            os.environ["HYDRAHEAD_DW_UPDATE_TILES"] = saved
    regs, spill, counts = _cubin_usage(compiled.asm["cubin"], warpgroup_counts=True)
    parts = dw_update.features_parts(num_rows, chosen) if chosen[4] else 0
    groups = dw_update.partition_registers(parts)
    mine = [groups["first_consumer"], groups["second_consumer"], groups["loaders"]] + [groups["features"]] * parts
    return dict(
        kernel="dw_update",
        dtype="bf16",
        rows=num_rows,
        tiles=",".join(map(str, chosen)),
        regs=regs,
        spill_bytes=spill,
        shared_kib=round(compiled.metadata.shared / 1024, 1),
        per_sm=1,
        warpgroups="/".join(map(str, mine)),
        cubin_agrees=set(mine) <= counts,
    )


def resources(
    kernel: str, dtype: str, tile: tuple[int, ...], arch: int = 90, batch: int = shard_ce.SLICED_MAX_ROWS
) -> dict:
    """One compilation's registers, spill stack and shared memory, and programs per SM
    (``batch``: the rows the sliced kernel is compiled for)."""
    fn, types, constants = _signature(kernel, dtype, tile, batch)
    warps, stages = tile[-2:]
    # as a launch specialises: pointers 16-byte aligned, strides and D multiples of 16 (D = 512)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if types[name].startswith("*") or name.startswith("stride") or name == "D"
    }
    compiled = triton.compile(
        ASTSource(fn=fn, signature=types, constexprs=constants, attrs=aligned),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    regs, spill, _ = _cubin_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    per_sm = tiles.programs_per_sm(regs, warps, shared, _SM_REGISTERS, _SM_SHARED, _SM_THREADS)
    return dict(
        kernel=kernel,
        dtype=dtype,
        tiles=",".join(map(str, tile)),
        regs=regs,
        spill_bytes=spill,
        shared_kib=round(shared / 1024, 1),
        per_sm=per_sm,
    )


def _parse_tiles(text: str) -> list[tuple[int, ...]]:
    out = []
    for item in filter(None, text.split(";")):
        try:
            values = tuple(int(v) for v in item.split(","))
        except ValueError:
            values = ()
        if len(values) not in (4, 5):
            raise SystemExit(
                "--tiles takes BLOCK_G,BLOCK_C,BLOCK_K,num_warps,num_stages (probs, lse) or four "
                f"integers (forward, weight: BLOCK_G,BLOCK_C,...; sliced: BLOCK_C,BLOCK_K,...) per item, got {item!r}"
            )
        out.append(values)
    return out


def _parse_dw_update(rows: str, tiles: str) -> tuple[list[int], list[tuple[int, ...]]]:
    most = dw_update.TILES_BY_BATCH[-1][0]
    try:
        batches = [int(v) for v in rows.split(",")]
    except ValueError:
        raise SystemExit(f"--rows takes comma-separated integers, got {rows!r}") from None
    for num_rows in batches:
        if not dw_update.FEWEST_ROWS <= num_rows <= most:
            raise SystemExit(f"--rows: dw_update takes {dw_update.FEWEST_ROWS} to {most} rows, got {num_rows}")
    sets = []
    for item in filter(None, tiles.split(";")):
        os.environ["HYDRAHEAD_DW_UPDATE_TILES"] = item
        try:
            sets.append(dw_update._tiles()[: len(item.split(","))])  # the kernel's own check of the fields
        except ValueError as error:
            raise SystemExit(f"--dw-tiles: {error}") from None
        finally:
            os.environ.pop("HYDRAHEAD_DW_UPDATE_TILES")
    return batches, sets


def _entry(kernel: str, dtype: str) -> tuple[int, ...]:
    if kernel in _STATIONARY:
        name = _STATIONARY[kernel][1]
        name = "weight_fp8" if (name, dtype) == ("weight", "fp8") else name
    else:
        name = _ENTRIES[kernel, dtype]
    return tiles.tile_config(name, torch.device("cuda"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kernels",
        default="probs,lse",
        help="comma-separated: probs (the P kernel), lse, forward, weight, sliced (the stationary kernels), "
        "dw_update (the fused dW + SGD kernel)",
    )
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma-separated storage dtypes: bf16, fp8")
    parser.add_argument(
        "--tiles",
        default="",
        help="'BLOCK_G,BLOCK_C,BLOCK_K,warps,stages;...' (probs, lse) and four-integer tuples (the stationary "
        "kernels); each kernel takes those of its length (default: the table's entry)",
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    parser.add_argument(
        "--batch",
        type=int,
        default=shard_ce.SLICED_MAX_ROWS,
        help=f"rows the sliced kernel is compiled for, 1 to {shard_ce.SLICED_MAX_ROWS} (its batch block follows them)",
    )
    parser.add_argument(
        "--rows",
        default="256",
        help=f"comma-separated batches dw_update is compiled for, {dw_update.FEWEST_ROWS} to "
        f"{dw_update.TILES_BY_BATCH[-1][0]} (each takes the batch table's tiles unless --dw-tiles names some)",
    )
    parser.add_argument(
        "--dw-tiles",
        default="",
        help="dw_update's 'BLOCK_C,BLOCK_D,BLOCK_K,STAGES,SLOTS[,HOLD_ROWS];...' (HYDRAHEAD_DW_UPDATE_TILES' fields)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows here, with the Triton version")
    args = parser.parse_args(argv)
    kernels, dtypes = args.kernels.split(","), args.dtypes.split(",")
    for name in kernels:
        if name not in _KERNELS:
            raise SystemExit(f"--kernels: {name!r} is not one of {', '.join(_KERNELS)}")
    for name in dtypes:
        if name not in _DTYPES:
            raise SystemExit(f"--dtypes: {name!r} is not one of {', '.join(_DTYPES)}")
    if not 1 <= args.batch <= shard_ce.SLICED_MAX_ROWS:
        raise SystemExit(f"--batch: the sliced kernel takes 1 to {shard_ce.SLICED_MAX_ROWS} rows, got {args.batch}")
    batches, dw_tiles = _parse_dw_update(args.rows, args.dw_tiles) if "dw_update" in kernels else ([], [])
    given = _parse_tiles(args.tiles)
    for kernel in kernels:
        if kernel == "dw_update":
            continue
        if given and not any(len(t) == _tuple_length(kernel) for t in given):
            fields = _STATIONARY[kernel][2] + ",num_warps,num_stages" if kernel in _STATIONARY else None
            fields = fields or "BLOCK_G,BLOCK_C,BLOCK_K,num_warps,num_stages"
            raise SystemExit(f"--tiles holds no tuple for {kernel}, which takes {fields}")
    rows = []
    for kernel in kernels:
        if kernel == "dw_update":  # bf16 rows only: --dtypes does not apply
            for num_rows in batches:
                for tile in dw_tiles or [None]:
                    rows.append(dw_update_resources(num_rows, tile, args.arch))
                    print(f"compiled dw_update, {num_rows} rows, {rows[-1]['tiles']}", file=sys.stderr, flush=True)
            continue
        for dtype in dtypes:
            mine = [t for t in given if len(t) == _tuple_length(kernel)]
            for tile in mine or [_entry(kernel, dtype)]:
                rows.append(resources(kernel, dtype, tile, args.arch, args.batch))
                print(f"compiled {kernel} {dtype} {tile}", file=sys.stderr, flush=True)
    columns = ["kernel", "dtype", "tiles", "regs", "spill_bytes", "shared_kib", "per_sm"]
    if batches:
        columns += ["rows", "warpgroups", "cubin_agrees"]
    print_table(rows, columns)
    if args.json:
        meta = dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch)
        Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
