"""The dW product with the SGD step fused (``hydrahead.kernels.dw_update``) against its simple
alternative on the same work: cuBLAS's dW = P^T F, then the gemm path's update pass.

    python benchmarks/dw_update.py                                       # the batch table's tiles
    python benchmarks/dw_update.py --shapes 256x512x1048576 --tiles "64,64,64,4,4;64,128,64,4,2"

A row per (shape, method); the fused kernel's rows name their tiles (BLOCK_C, BLOCK_D,
BLOCK_K, STAGES, SLOTS, HOLD_ROWS). Both sides read P (G x C, bf16) and F and update bf16 rows with a
float32 momentum buffer (momentum 0.9, weight decay 5e-4, round-to-nearest):

  floor_ms  max(products: 2·G·D·C FLOPs at the rate cuBLAS reaches on this very product,
            bytes: the rows and buffer read and written and P read once, 12·C·D + 2·G·C,
            at the copy bandwidth), both measured in this run
  ratio     ms / floor_ms
  peak_mib  the peak allocation above the operands during the call (the pair writes dW_c)

--features-grad: both sides also compute dF = P W_c (float32) from the rows before the step,
as the gemm path does: the pair with a cuBLAS product before its update, the fused kernel
inside itself where the batch is one K block (``dw_update.takes_features_grad``; the row's
features_grad says "kernel"), else with the same product before it ("cuBLAS"). The floor's
products then count dF's too, at the rate cuBLAS reaches on it.

Needs an sm_90 GPU with Gluon (Triton 3.4 or later); writes benchmarks/results/dw_update.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import copy_bandwidth_gbps, cuda_time_ms, environment, median, print_table, write_results
from hydrahead.kernels import SGDUpdate, dw_update
from hydrahead.kernels.exact_gemm import matmul_fp32
from hydrahead.kernels.filtered import apply_sgd_rows

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
_PAIR = "torch.mm dW + hydrahead update pass"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        batch, dim, classes = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is GxDxC, got {text!r}") from None
    return batch, dim, classes


def _timed(fn, reps: int) -> tuple[float, float]:
    """Median ms of ``fn`` and the MiB it allocates above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = median(cuda_time_ms(fn, warmup=2, reps=reps))
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(shape, tile_sets, reps: int, copy_gbps: float, features_grad: bool = False) -> list[dict]:
    batch, dim, classes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    probs = (torch.randn(batch, classes, device="cuda", generator=gen) * 1e-3).bfloat16()
    feats = torch.randn(batch, dim, device="cuda", generator=gen).bfloat16()
    rows = (torch.randn(classes, dim, device="cuda", generator=gen) * 0.02).bfloat16()
    buffer = torch.randn(classes, dim, device="cuda", generator=gen) * 1e-3
    update = SGDUpdate(**SGD, momentum_buffer=buffer)

    product_ms = median(cuda_time_ms(lambda: torch.mm(probs.t(), feats), warmup=2, reps=reps))
    df_ms = median(cuda_time_ms(lambda: matmul_fp32(probs, rows), warmup=2, reps=reps)) if features_grad else 0.0
    flops = 2 * batch * dim * classes
    moved = 12 * classes * dim + 2 * batch * classes
    floor = max(product_ms + df_ms, moved / (copy_gbps * 1e6))
    base = dict(shape=f"{batch}x{dim}x{classes}", floor_ms=floor, product_tflops=flops / product_ms / 1e9)
    if features_grad:
        base.update(df_product_ms=df_ms)

    def pair():
        if features_grad:  # before the update moves the rows, as in the gemm path
            matmul_fp32(probs, rows)
        apply_sgd_rows(rows, torch.mm(probs.t(), feats), update, 0)

    ms, peak = _timed(pair, reps)
    out = [dict(base, method=_PAIR, tiles=None, ms=ms, peak_mib=peak, ratio=ms / floor)]
    if features_grad:
        out[0].update(features_grad="cuBLAS")
    for tiles in tile_sets:
        if tiles is None:  # the batch table's choice
            chosen = dw_update._tiles(batch)
            if chosen is None:
                continue
            os.environ.pop("HYDRAHEAD_DW_UPDATE_TILES", None)
        else:
            chosen = tiles + (0,) * (6 - len(tiles))
            os.environ["HYDRAHEAD_DW_UPDATE_TILES"] = ",".join(map(str, tiles))
        # the lr on the device, as the gemm path hands it over (made once a step, not once a call)
        options = dict(SGD, lr=torch.full((1,), SGD["lr"], dtype=torch.float32, device=rows.device))
        in_kernel = features_grad and dw_update.takes_features_grad(batch, chosen)

        def fused():
            if features_grad and not in_kernel:
                matmul_fp32(probs, rows)
            dw_update.fused_dw_update(probs, feats, rows, buffer, features_grad=in_kernel, **options)

        try:
            ms, peak = _timed(fused, reps)
        finally:
            os.environ.pop("HYDRAHEAD_DW_UPDATE_TILES", None)
        method = "hydrahead-gluon dW + SGD" + (" (batch table)" if tiles is None else "")
        tag = ",".join(map(str, chosen))
        out.append(dict(base, method=method, tiles=tag, ms=ms, peak_mib=peak, ratio=ms / floor))
        if features_grad:
            out[-1].update(features_grad="kernel" if in_kernel else "cuBLAS")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default="256x512x262144,512x512x262144,1024x512x262144,256x512x1048576,512x512x1048576,1024x512x1048576",
        help="comma-separated GxDxC shapes",
    )
    parser.add_argument(
        "--tiles",
        default="",
        help="more tile sets, 'c,d,k,stages,slots[,hold_rows]' (slots 0: the wide variant) separated by ';'",
    )
    parser.add_argument("--reps", type=int, default=10, help="timed calls a row (median)")
    parser.add_argument(
        "--features-grad",
        action="store_true",
        help="both sides also compute dF = P W_c from the rows before the step: the pair with a cuBLAS "
        "product, the fused kernel inside itself where the batch is one K block (else the same product)",
    )
    parser.add_argument("--name", default="dw_update", help="results file name under benchmarks/results/")
    args = parser.parse_args(argv)
    shapes = [_shape(s) for s in args.shapes.split(",") if s]
    tile_sets = [None] + [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";") if t]
    if not (torch.cuda.is_available() and dw_update.GLUON and torch.cuda.get_device_capability()[0] == 9):
        raise SystemExit("benchmarks/dw_update.py needs an sm_90 GPU and a Triton with Gluon")

    copy_gbps = copy_bandwidth_gbps(torch.device("cuda"))
    rows = []
    for index, shape in enumerate(shapes):
        print(f"[{index + 1}/{len(shapes)}] {'x'.join(map(str, shape))}", flush=True)
        rows += measure(shape, tile_sets, args.reps, copy_gbps, args.features_grad)
        torch.cuda.empty_cache()
    payload = dict(
        environment(),
        benchmark="dw_update",
        what="dW_c = P^T F and the SGD step on bf16 rows with a float32 buffer: fused kernel against product + pass",
        copy_gbps=copy_gbps,
        sgd=SGD,
        rows=rows,
    )
    path = write_results(args.name, payload)
    print(f"copy {copy_gbps:.0f} GB/s; wrote {path}")
    columns = ["method", "tiles", "shape", "ms", "floor_ms", "ratio", "peak_mib"]
    print_table(rows, columns + (["features_grad"] if args.features_grad else []))


if __name__ == "__main__":
    main()
