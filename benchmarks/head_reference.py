"""One shard's forward + backward: the chunked reference loss against plain PyTorch.

    python benchmarks/head_reference.py                     # G=4096, D=512, C_r=1,048,576, bf16
    python benchmarks/head_reference.py --classes 65536 --reps 3

Rows: plain ``F.cross_entropy(features @ W.T)``; hydrahead's chunked reference at several
chunk sizes; cut-cross-entropy (with and without its gradient filter) and liger-kernel
when installed (``pip install -e .[bench]``). Each row gives the median time, the ratio to
the arithmetic floor (6·G·D·C_r FLOPs: logits, dF, dW; at the bf16 matmul rate measured in
the same run) and the peak memory, total and above the inputs. Results go to
``benchmarks/results/head_reference.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bf16_matmul_tflops, cuda_time_ms, environment, median, print_table, write_results  # noqa: E402
from hydrahead.head import sharded_cross_entropy  # noqa: E402


def plain_torch(features, weight, labels):
    return F.cross_entropy(features @ weight.t(), labels)


def hydrahead_reference(chunk_size):
    def loss(features, weight, labels):
        return sharded_cross_entropy(features, weight, labels, 0, num_classes=weight.shape[0], chunk_size=chunk_size)

    return loss


def optional_methods() -> dict:
    methods = {}
    try:
        from cut_cross_entropy import linear_cross_entropy

        methods["cut-cross-entropy"] = lambda f, w, y: linear_cross_entropy(f, w, y)
        methods["cut-cross-entropy (no filter)"] = lambda f, w, y: linear_cross_entropy(f, w, y, filter_eps=None)
    except ImportError as exc:
        print(f"cut-cross-entropy not available ({exc}): skipped", file=sys.stderr)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger-kernel"] = lambda f, w, y: liger_fused_linear_cross_entropy(f, w, y)
    except ImportError as exc:
        print(f"liger-kernel not available ({exc}): skipped", file=sys.stderr)
    return methods


def measure(name, loss_fn, features, weight, labels, reps, reference_loss):
    def step():
        features.grad = weight.grad = None
        loss = loss_fn(features, weight, labels)
        loss.backward()
        return loss

    row = {"method": name}
    try:
        torch.cuda.synchronize()
        features.grad = weight.grad = None
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = float(step().detach())  # the first call also compiles/autotunes: memory only
        torch.cuda.synchronize()
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["extra_mib"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        row["loss"] = loss
        row["loss_diff"] = None if reference_loss is None else abs(loss - reference_loss)
        row["ms"] = median(cuda_time_ms(step, warmup=1, reps=reps))
    except torch.cuda.OutOfMemoryError:
        row.update(ms=None, note="out of memory")
    except Exception as exc:  # a competitor failing must not lose the other rows
        row.update(ms=None, note=f"{type(exc).__name__}: {str(exc)[:200]}")
    features.grad = weight.grad = None
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="global batch G")
    parser.add_argument("--dim", type=int, default=512, help="feature width D")
    parser.add_argument("--classes", type=int, default=1_048_576, help="classes in the shard C_r")
    parser.add_argument(
        "--chunk-sizes", default="8192,32768,131072", help="comma-separated chunk sizes of the reference"
    )
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per method (median reported)")
    parser.add_argument("--slow-reps", type=int, default=3, help="repetitions for methods known to take seconds")
    parser.add_argument("--name", default="head_reference", help="results file name (without .json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device")

    torch.manual_seed(0)
    G, D, C = args.batch, args.dim, args.classes
    features = torch.randn(G, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(C, D, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, C, (G,), device="cuda")

    tflops = bf16_matmul_tflops()
    floor_ms = 6 * G * D * C / (tflops * 1e12) * 1e3
    floor8_ms = floor_ms * 8 / 6

    methods = {"torch (F.cross_entropy on full logits)": plain_torch}
    for chunk in (int(c) for c in args.chunk_sizes.split(",")):
        methods[f"hydrahead-reference (chunk {chunk})"] = hydrahead_reference(chunk)
    methods.update(optional_methods())

    rows, reference_loss = [], None
    for name, fn in methods.items():
        reps = args.slow_reps if name == "liger-kernel" else args.reps
        row = measure(name, fn, features, weight, labels, reps, reference_loss)
        if reference_loss is None and row.get("loss") is not None and name.startswith("hydrahead"):
            reference_loss = row["loss"]
        row.update(shape=f"{G}x{D}x{C}", dtype="bf16", floor_ms=floor_ms, floor8_ms=floor8_ms)
        row["ratio"] = None if row.get("ms") is None else row["ms"] / floor_ms
        rows.append(row)
        print(f"{name}: {row.get('ms')} ms, peak {row.get('peak_mib')} MiB {row.get('note', '')}", flush=True)

    payload = {
        **environment(),
        "benchmark": "head_reference",
        "what": "one shard, forward + backward of mean softmax cross-entropy, bf16 inputs",
        "matmul_tflops_bf16": tflops,
        "floor": "6*G*D*C_r FLOPs at the measured bf16 matmul rate (floor8_ms: 8*G*D*C_r, with the logits recomputed)",
        "rows": rows,
    }
    path = write_results(args.name, payload)
    print(
        f"\nbf16 matmul {tflops:.0f} TFLOP/s; floor {floor_ms:.1f} ms (6GDC), {floor8_ms:.1f} ms (8GDC); wrote {path}"
    )
    print_table(rows, ["method", "ms", "ratio", "peak_mib", "extra_mib", "loss_diff", "note"])


if __name__ == "__main__":
    main()
