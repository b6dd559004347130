"""Registers, spills and shared memory of the exact step's two Triton passes, per tile shape,
compiled for a GPU architecture on any machine: no GPU is needed.

    python benchmarks/kernel_resources.py                                   # the table's entries, bf16 and fp8
    python benchmarks/kernel_resources.py --kernels probs --dtypes fp8 --tiles "128,256,128,8,3;64,128,128,4,4"
    python benchmarks/kernel_resources.py --json /tmp/resources.json

Each (kernel, dtype, tiles) is compiled by Triton for ``--arch`` (90: Hopper) with its
operands read and written through tensor descriptors, as the kernels run at D = 512, and
the cubin's resource usage is read with the ``cuobjdump`` that ships with Triton:

  regs         registers a thread (255 is the most a thread can hold)
  spill_bytes  the local-memory stack a thread needs: registers spilled to memory
  shared_kib   shared memory a program takes (pipeline stages, plus the epilogue's staging)
  per_sm       programs an SM holds at once by registers, shared memory and threads: the
               persistent P kernel launches this many per SM (``tiles.resident_programs``)

Counting before timing: a tile that spills or holds one program an SM is worth knowing
about before a GPU run is spent on it. What the compiler does is Triton's own: the figures
come from this machine's Triton, which need not be the GPU machine's (shared memory has
matched exactly; registers within a few). Arguments are compiled without the launch's
integer specialisations (which the descriptor loads do not use).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, never interpret them

import argparse  # noqa: E402
import json  # noqa: E402
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
from hydrahead.kernels import exact_gemm, filtered, tiles  # noqa: E402
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
_SCALARS = {"G", "C", "D", "c_lo", "c_hi", "g_store", "c_store", "classes_per_split"}
_FLOATS = {"scale", "target_shift"}


def _signature(kernel: str, dtype: str, tile: tuple[int, ...]) -> tuple:
    """(JIT function, argument types, compile-time constants) of one compilation."""
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


def resources(kernel: str, dtype: str, tile: tuple[int, ...], arch: int = 90) -> dict:
    """One compilation's registers, spill stack and shared memory, and programs per SM."""
    fn, types, constants = _signature(kernel, dtype, tile)
    warps, stages = tile[3], tile[4]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=types, constexprs=constants),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(
        item.split(":", 1) for line in dump.splitlines() if "REG:" in line for item in line.split() if ":" in item
    )
    regs, spill = int(usage["REG"]), int(usage["STACK"])
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
        values = tuple(int(v) for v in item.split(","))
        if len(values) != 5:
            raise SystemExit(f"--tiles takes BLOCK_G,BLOCK_C,BLOCK_K,num_warps,num_stages per item, got {item!r}")
        out.append(values)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="probs,lse", help="comma-separated: probs (the P kernel), lse")
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma-separated storage dtypes: bf16, fp8")
    parser.add_argument(
        "--tiles",
        default="",
        help="'BLOCK_G,BLOCK_C,BLOCK_K,warps,stages;...' for every kernel and dtype (default: the table's entry)",
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here, with the Triton version")
    args = parser.parse_args(argv)
    kernels, dtypes = args.kernels.split(","), args.dtypes.split(",")
    for name in kernels:
        if name not in ("probs", "lse"):
            raise SystemExit(f"--kernels: {name!r} is not one of probs, lse")
    for name in dtypes:
        if name not in _DTYPES:
            raise SystemExit(f"--dtypes: {name!r} is not one of {', '.join(_DTYPES)}")
    given = _parse_tiles(args.tiles)
    rows = []
    for kernel in kernels:
        for dtype in dtypes:
            entry = tiles.tile_config(_ENTRIES[kernel, dtype], torch.device("cuda"))
            for tile in given or [entry]:
                rows.append(resources(kernel, dtype, tile, args.arch))
                print(f"compiled {kernel} {dtype} {tile}", file=sys.stderr, flush=True)
    print_table(rows, ["kernel", "dtype", "tiles", "regs", "spill_bytes", "shared_kib", "per_sm"])
    if args.json:
        meta = dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch)
        Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
