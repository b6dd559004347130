"""The package's layout stays readable: imports between subpackages run one way, and no
subpackage reaches into another's private (underscore) names."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hydrahead"


def _node(root: Path, parts: list[str]) -> str | None:
    """The subpackage (or top-level module) that dotted ``parts`` below the package name
    falls in, or None for the package itself."""
    return parts[0] if parts else None


def _is_module(root: Path, parts: list[str]) -> bool:
    path = root.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_edges(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(subpackage -> subpackages it imports, private names imported across subpackages),
    from every import in every file below ``root`` (function-level imports included)."""
    name = root.name
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for file in sorted(root.rglob("*.py")):
        here = file.relative_to(root).with_suffix("").parts
        source = _node(root, list(here))
        if source == "__init__":
            continue
        edges.setdefault(source, set())
        aliases: dict[str, list[str]] = {}  # local name -> module parts, for attribute access
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            targets = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module.split(".")[0] == name
            ):
                parts = node.module.split(".")[1:]
                for alias in node.names:
                    as_module = parts + [alias.name]
                    if _is_module(root, as_module):
                        targets.append((as_module, None))
                        aliases[alias.asname or alias.name] = as_module
                    else:
                        targets.append((parts, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == name:
                        targets.append((parts[1:], None))
                        if alias.asname:
                            aliases[alias.asname] = parts[1:]
            for parts, imported in targets:
                target = _node(root, parts)
                if target is None or target == source:
                    continue
                edges[source].add(target)
                if imported is not None and imported.startswith("_"):
                    private.append(f"{file.relative_to(root)}: {'.'.join([name, *parts])}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                parts = aliases[node.value.id]
                if node.attr.startswith("_") and not node.attr.startswith("__") and _node(root, parts) != source:
                    private.append(f"{file.relative_to(root)}: {'.'.join([name, *parts])}.{node.attr}")
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_subpackages_import_each_other_one_way():
    edges, _ = import_edges(PACKAGE)
    assert {"head", "kernels", "distributed", "optim", "train"} <= edges.keys()  # the walk saw the package
    assert find_cycle(edges) is None, f"import cycle between subpackages: {' -> '.join(find_cycle(edges))}"


def test_no_subpackage_uses_another_ones_private_names():
    _, private = import_edges(PACKAGE)
    assert private == [], "private names used across subpackages:\n" + "\n".join(private)


@pytest.fixture()
def tangled(tmp_path) -> Path:
    """A small package with both faults: a -> b -> a, and a private name of b used in a."""
    root = tmp_path / "pkg"
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("from pkg.b.y import _hidden\n")
    (root / "b" / "y.py").write_text("def f():\n    from pkg.a import x\n    return x\n_hidden = 1\n")
    (root / "c" / "z.py").write_text(
        "from pkg.b import y as why\nvalue = why._hidden\nfrom pkg.a.x import _hidden as own  # noqa\n"
    )
    return root


def test_the_checks_can_fail(tangled):
    edges, private = import_edges(tangled)
    assert edges == {"a": {"b"}, "b": {"a"}, "c": {"a", "b"}}
    assert set(find_cycle(edges)) == {"a", "b"}
    assert sorted(private) == ["a/x.py: pkg.b.y._hidden", "c/z.py: pkg.a.x._hidden", "c/z.py: pkg.b.y._hidden"]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(check):
    """ruff's lint and formatter (pyproject.toml: line length 120) over the whole repository."""
    proc = subprocess.run([sys.executable, "-m", "ruff", *check, "."], cwd=REPO, capture_output=True, text=True)
    found = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"ruff {' '.join(check)} found problems (ruff format . fixes the layout):\n{found}"


def test_training_on_cpu_needs_no_triton(tmp_path):
    """The README's first command installs no triton (it is a test extra): the trainer and
    launcher must import without it, and a CPU training step (the reference head) must run."""
    import subprocess
    import sys

    code = "import sys; sys.modules['triton'] = None; import hydrahead.train.trainer, hydrahead.comm.compression"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from spawn_ranks import next_port

    step = f"""
import os, sys
sys.modules["triton"] = None  # importing it raises
sys.path.insert(0, {str(REPO / "tests")!r})
import torch, torch.distributed as dist
from launcher import TINY
from hydrahead.config import load_config
from hydrahead.data.build import batches
from hydrahead.train.trainer import DistEnv, Trainer
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{next_port()}")
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = load_config(None, ["run.dir={tmp_path}", *TINY])
trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None, None))
assert trainer.head.impl == "reference", trainer.head.impl
data = batches(trainer.train_data, start_step=0, global_batch=cfg.train.global_batch, rank=0, world_size=1)
print("loss", float(trainer.train_step(*next(data), timed=False)["loss"]))
data.close()
trainer.selector.close()
"""
    done = subprocess.run([sys.executable, "-c", step], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0 and "loss" in done.stdout, done.stderr[-3000:]
