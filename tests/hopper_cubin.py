"""Compiling a Gluon kernel for sm_90 on a machine without a GPU, and reading its cubin: the
launch's registers and spills, and the counts its warpgroups set at run time (setmaxnreg)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_REPO = Path(__file__).resolve().parent.parent


def compile_in_subprocess(script: str, cubin: Path, env: dict[str, str]) -> dict:
    """Run ``script`` (which writes the cubin to $CUBIN and prints its metadata as JSON last)
    in a process of its own: the compiler's bindings report leaks when a process that
    compiled exits. ``env``: variables set (None: removed) over this process's."""
    full = {**os.environ, "CUBIN": str(cubin), "PYTHONPATH": str(_REPO)}
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def resource_usage(cubin: Path) -> dict[str, str]:
    """cuobjdump's resource line: REG (registers a thread), STACK (spilled bytes), SHARED, ..."""
    dump = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    return dict(item.split(":", 1) for line in dump.stdout.splitlines() if "REG:" in line for item in line.split())


def warpgroup_register_counts(cubin: Path) -> set[int]:
    """The register counts the kernel's warpgroups set with setmaxnreg, read from its assembly."""
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True).stdout
    return {int(v, 16) for v in re.findall(r"USETMAXREG\.\w+\.CTAPOOL (?:UP\d, )?(0x[0-9a-f]+)", sass)}
