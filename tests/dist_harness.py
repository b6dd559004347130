"""Run a function on N gloo ranks in separate processes; a hang fails instead of blocking."""

from __future__ import annotations

import io
import os
import queue
import random
import tempfile
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hydrahead.train.collector import startup_objects_frozen

# The ranks are forked from a server process that imported these once, when the first
# ranks of the session started; without it every rank of every test would import torch and
# hydrahead anew and tear them down at exit (seconds a rank on a small CI machine). The
# server is a fresh interpreter, not a fork of pytest: no test's state reaches the ranks.
PRELOAD = ["dist_harness", "hydrahead.train.trainer", "hydrahead.kernels"]


def _entry(fn, rank, world_size, init_method, results, args, environ):
    # Start as a freshly spawned process would: the caller's environment as it is now, and
    # random seeds of its own (a fork would share the server's with every other rank).
    os.environ.clear()
    os.environ.update(environ)
    torch.seed()
    random.seed()
    np.random.seed()
    torch.set_num_threads(1)  # N ranks share the test machine's few cores
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        with startup_objects_frozen():  # the preloaded imports, as launch/train.py freezes them
            out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Call ``fn(rank, world_size, *args)`` on every rank; return the results in rank order.

    Raises AssertionError naming the ranks that failed (with their tracebacks) or that did
    not answer within ``timeout`` seconds (a hang in a collective).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, init_method, results, args, dict(os.environ)))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        answers: dict[int, tuple[bool, object]] = {}
        try:
            while len(answers) < world_size:
                rank, ok, payload = results.get(timeout=timeout)
                answers[rank] = (ok, payload)
        except queue.Empty:
            missing = sorted(set(range(world_size)) - set(answers))
            raise AssertionError(f"ranks {missing} gave no answer within {timeout}s (hung?)") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    failures = {r: payload for r, (ok, payload) in answers.items() if not ok}
    if failures:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())))
    return [torch.load(io.BytesIO(answers[r][1]), weights_only=True) for r in range(world_size)]
