"""Two torchrun agents with --nnodes 2 on this machine, joined by a c10d rendezvous on 127.0.0.1,
train exactly as one agent with the same number of ranks."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from launcher import REPO, TINY, environment, metrics, train_losses

from hydrahead.train.checkpoint import latest_checkpoint, read_meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(run_dir, port: int) -> list[str]:
    """One node's torchrun, as docs/cluster.md tells every node to run it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-agents",
        str(REPO / "launch" / "train.py"),
        f"run.dir={run_dir}",
        *TINY,
    ]


@pytest.mark.slow
def test_two_agents_with_nnodes_2_train_as_one_node_does(tiny_two_rank_run, tmp_path):
    one_node = tiny_two_rank_run  # one agent, 2 ranks, the same TINY command line (conftest.py)
    two_nodes = tmp_path / "two_nodes"
    port = free_port()
    agents = [
        subprocess.Popen(
            agent_command(two_nodes, port),
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for i, (agent, (out, err)) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, (
            f"agent {i} exited {agent.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
        )

    # Both agents' workers formed one world of 2 ranks, and the run matches the single node's.
    assert read_meta(latest_checkpoint(two_nodes))["world_size"] == 2
    want, got = train_losses(one_node), train_losses(two_nodes)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert got == want, {step: (got[step], want[step]) for step in got if got[step] != want[step]}
    evals = lambda run_dir: [(r["step"], r["eval_top1"], r["eval_loss"]) for r in metrics(run_dir) if "eval_top1" in r]  # noqa: E731
    assert evals(two_nodes) == evals(one_node) and len(evals(one_node)) == 2
