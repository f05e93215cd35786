"""The package's structure, read from its own imports (ast): the layers of DESIGN.md hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dflash_ray"
# below the Ray shell: the engine and everything it runs on
ENGINE_LEVEL = ("core", "worker", "models", "parallel", "ops", "spec_decode")
MAX_LINES = 450
# what the lowest layers may import of the package (themselves included)
BELOW = {"parallel": {"parallel"}, "ops": {"ops"}, "models": {"models", "ops", "parallel"}}


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: Path = PKG) -> set[str]:
    """Every module this file imports, at any depth of the file (lazy imports count)."""
    name = module_name(path, pkg)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            # `from . import x` / `from .pkg import mod`: the submodule is imported too
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module -> the package's modules it imports, plus the top-level names of all it imports."""
    files = {module_name(p, pkg): p for p in pkg.rglob("*.py")}
    out = {}
    for m, p in files.items():
        found = imports(p, pkg)
        out[m] = {i for i in found if i in files} | {i.split(".")[0] for i in found}
        out[m] |= {i for i in found if i == "torch.distributed"}
    return out


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_layers_import_only_downward():
    bad = []
    for mod, deps in graph().items():
        lay = layer(mod)
        if "ray" in deps and lay not in ("cluster", "server"):
            bad.append(f"{mod} imports ray (only cluster/ and server/ may)")
        if lay == "core" and "torch" in deps:
            bad.append(f"{mod} imports torch (core/ is bookkeeping on ints)")
        if lay in ENGINE_LEVEL:
            above = [d for d in deps if d.startswith("dflash_ray.")
                     and layer(d) not in ENGINE_LEVEL + ("config",)]
            bad += [f"{mod} (engine level) imports {d}" for d in above]
        below = BELOW.get(lay)
        if below is not None:
            bad += [f"{mod} imports {d} ({lay}/ may import only {sorted(below)})" for d in deps
                    if d.startswith("dflash_ray.") and layer(d) not in below]
        if lay == "models" and "torch.distributed" in deps:
            bad.append(f"{mod}: process-group code in models/ (use a Communicator)")
    assert not bad, "\n".join(bad)


def cycles(graph_: dict[str, set[str]]) -> list[list[str]]:
    g = {m: {d for d in deps if d.startswith("dflash_ray.") and d != m}
         for m, deps in graph_.items()}
    # a package's __init__ importing its own modules is a face, not a cycle
    for m in g:
        g[m] = {d for d in g[m] if not (d.startswith(m + ".") and m.count(".") == 1)}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_files_stay_small():
    big = [f"{p.relative_to(PKG.parent)}: {n} lines" for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"over {MAX_LINES} lines (usually two concepts): {big}"


def test_the_graph_sees_relative_lazy_and_package_imports(tmp_path):
    """The reader is real: relative, lazy and `from . import x` imports all become edges."""
    pkg = tmp_path / "dflash_ray"
    for f in ("__init__.py", "core/__init__.py", "core/a.py", "cluster/__init__.py",
              "cluster/b.py"):
        (pkg / f).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f).write_text("")
    (pkg / "core/a.py").write_text("import torch\n\ndef f():\n    from ..cluster import b\n")
    (pkg / "cluster/b.py").write_text("from ..core.a import f\n")
    g = graph(pkg)
    assert {"torch", "dflash_ray.cluster.b"} <= g["dflash_ray.core.a"]
    assert "dflash_ray.core.a" in g["dflash_ray.cluster.b"]
    assert cycles(g) == [["dflash_ray.cluster.b", "dflash_ray.core.a", "dflash_ray.cluster.b"]]


def test_importing_the_package_loads_no_ray_fastapi_or_triton():
    code = ("import sys, dflash_ray; "
            "print([m for m in ('ray', 'fastapi', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
