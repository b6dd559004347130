"""A few launches of the head's kernels for a kernel profiler to attach to (no timing here).

    ncu --kernel-name regex:dw_update_wide --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_kernels.py dw-update --shape 1024x512x1048576
    ncu --kernel-name regex:"probs_kernel|pingpong_lse_kernel" --launch-skip 9 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_kernels.py step --shape 1024x512x1048576

``dw-update``: the fused dW-and-SGD kernel alone, twice, on random P, F, rows and a zero
buffer. ``step``: two exact bf16 head steps (``benchmarks/head_kernels.py``'s ``ours``,
peaked logits). With C_r = 1M and G = 1,024 a step launches the LSE pass once and the P
kernel once for each of its 8 class chunks, hence the second command's skip of 9. Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import head_kernels  # noqa: E402


def run_dw_update(shape: tuple[int, int, int], launches: int) -> None:
    from hydrahead.kernels.dw_update import fused_dw_update

    num_rows, dim, num_classes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    probs = (torch.randn(num_rows, num_classes, device="cuda", generator=gen) * 1e-3).bfloat16()
    feats = torch.randn(num_rows, dim, device="cuda", generator=gen).bfloat16()
    rows = (torch.randn(num_classes, dim, device="cuda", generator=gen) * 0.02).bfloat16()
    buffer = torch.zeros(num_classes, dim, device="cuda")
    for _ in range(launches):
        fused_dw_update(probs, feats, rows, buffer, lr=0.1, momentum=0.9, weight_decay=5e-4)


def run_step(shape: tuple[int, int, int], launches: int) -> None:
    args = argparse.Namespace(
        seed=0,
        target_prob=0.25,
        logit_noise=1.0,
        momentum_dtype="fp32",
        margin_type="none",
        grad_filter=head_kernels.CCE_BF16_FILTER,
    )
    problem = head_kernels.make_problem(shape, "peaked", torch.device("cuda"), args)
    step = head_kernels.build_step("ours", problem, args)
    for _ in range(launches):
        step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("dw-update", "step"), help="the fused dW kernel alone, or whole head steps")
    parser.add_argument("--shape", default="1024x512x1048576", help="GxDxC_r (default 1024x512x1048576)")
    parser.add_argument("--launches", type=int, default=2, help="kernel launches or steps (default 2)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py runs the GPU kernels: no CUDA device here")
    shape = head_kernels.parse_shape(args.shape)
    (run_dw_update if args.what == "dw-update" else run_step)(shape, args.launches)
    torch.cuda.synchronize()
    print(f"{args.what} at {args.shape}: {args.launches} launches done")


if __name__ == "__main__":
    main()
