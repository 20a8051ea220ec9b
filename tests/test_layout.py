"""The package's shape (DESIGN.md §2): the import graph of hh_jax, read with `ast` (function-
local imports included), has no cycle and points down only:
  - a stage (hh_jax.stages.*) imports no other stage;
  - nothing outside hh_jax.report imports the report, except the CLI (hh_jax.main);
  - the library (the top-level modules but the drivers main and experiment, and the data,
    pretrained and label packages) imports no stage, no evaluation and not the report;
  - an evaluation imports no stage and not the report; the report imports no stage;
  - every `hh_jax` import names a module, or a name a module defines, that exists (one
    inside `try: ... except ImportError` or its fallback may not);
and every module imports. `test_the_checks_fail_on_a_bad_tree` shows each rule fails.
"""

from __future__ import annotations

import ast
import importlib
import os
from dataclasses import dataclass

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hh_jax")
DRIVERS = {"main", "experiment"}  # top-level modules that may import stages / evals
CLI = "main"  # the one module outside the report that may import it


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    guarded: bool  # inside try/except ImportError


def modules(root: str, package: str) -> dict[str, str]:
    """Dotted module name → file, for every .py under `root` (package = its __init__)."""
    out = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                name = parts if f == "__init__.py" else parts + [f[:-3]]
                out[".".join(name)] = os.path.join(folder, f)
    return out


def _guarded_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a `try` whose handlers catch ImportError, or inside
    those handlers (a fallback)."""
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        if names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
            stmts = node.body + [s for h in node.handlers for s in h.body]
            out |= {id(n) for stmt in stmts for n in ast.walk(stmt)}
    return out


def defined_names(path: str) -> set[str] | None:
    """Names a module defines at its top level (inside top-level if/try too); None when it
    could define any (a star import or a module __getattr__)."""
    with open(path) as f:
        body = list(ast.parse(f.read(), path).body)
    names = set()
    while body:
        node = body.pop()
        if isinstance(node, ast.If | ast.Try):
            body += node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any(a.name == "*" for a in node.names):
                return None
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return None if "__getattr__" in names else names


def imports(name: str, path: str, package: str, mods: dict[str, str]) -> list[Edge]:
    """The `package` modules `name` imports: `from a.b import c` is an edge to the module
    a.b.c when there is one, else to a.b, and then to "a.b.c (missing)" unless a.b defines
    c."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    guarded = _guarded_nodes(tree)
    is_pkg = path.endswith("__init__.py")
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding `name`
                parent = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(parent + ([base] if base else []))
            targets = []
            for a in node.names:
                if f"{base}.{a.name}" in mods or base not in mods:
                    targets.append(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
                    continue
                defined = defined_names(mods[base])
                ok = defined is None or a.name in defined
                targets.append(base if ok else f"{base}.{a.name} (missing)")
        else:
            continue
        for t in targets:
            if t == package or t.startswith(package + "."):
                edges.append(Edge(name, t, node.lineno, id(node) in guarded))
    return edges


def graph(root: str, package: str) -> tuple[dict[str, str], list[Edge]]:
    mods = modules(root, package)
    edges = [e for name, path in mods.items() for e in imports(name, path, package, mods)]
    return mods, edges


def cycles(mods, edges) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self
    import), as a path."""
    succ = {m: sorted({e.dst for e in edges if e.src == m and e.dst in mods}) for m in mods}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                out.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return out


def _part(module: str, package: str) -> str:
    """"stages", "report", "evals", "data", "pretrained", "label", or "top" (a top-level
    module)."""
    parts = module.split(".")
    if module == package or len(parts) == 2 and parts[1] not in (
            "stages", "report", "evals", "data", "pretrained", "label"):
        return "top"
    return parts[1]


def violations(root: str, package: str) -> list[str]:
    mods, edges = graph(root, package)
    out = [f"import cycle: {' ↔ '.join(c)}" for c in cycles(mods, edges)]
    packages = {m for m, p in mods.items() if p.endswith("__init__.py")}
    for e in edges:
        where = f"{e.src} (line {e.line}) imports {e.dst}"
        if e.dst not in mods:
            if not e.guarded:
                out.append(f"{where}, which does not exist")
            continue
        src, dst = _part(e.src, package), _part(e.dst, package)
        top_name = e.src.split(".")[-1]
        if src == "stages" == dst and e.src != e.dst and e.dst not in packages:
            out.append(f"{where}: a stage imports another stage")
        if dst == "report" and src != "report" and e.src != f"{package}.{CLI}":
            out.append(f"{where}: only the CLI imports the report")
        if dst in ("stages", "report", "evals") and (
                src in ("data", "pretrained", "label") or src == "top"
                and top_name not in DRIVERS):
            out.append(f"{where}: the library imports a stage, an evaluation or the report")
        if src == "evals" and dst in ("stages", "report"):
            out.append(f"{where}: an evaluation imports a stage or the report")
        if src == "report" and dst == "stages":
            out.append(f"{where}: the report imports a stage")
    return out


def test_import_graph_has_no_cycle_and_points_down():
    assert violations(ROOT, "hh_jax") == []


def test_the_graph_sees_the_layout():
    """The checks look at something: the stages import the library, function-local
    imports count."""
    mods, edges = graph(ROOT, "hh_jax")
    assert {"hh_jax.stages.ppo", "hh_jax.report.run", "hh_jax.data.hh",
            "hh_jax.pretrained.registry", "hh_jax.evals.pm_accuracy"} <= set(mods)
    pairs = {(e.src, e.dst) for e in edges}
    assert ("hh_jax.stages.ppo", "hh_jax.ppo") in pairs
    assert ("hh_jax.stages.ppo", "hh_jax.policy") in pairs  # `from hh_jax.policy import X`
    assert ("hh_jax.main", "hh_jax.report") in pairs  # a function-local import


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_the_checks_fail_on_a_bad_tree(tmp_path):
    root = str(tmp_path / "pkg")
    _write(root, {
        "__init__.py": "",
        "main.py": "from pkg import report\n",
        "model.py": "def f():\n    from pkg.stages import lm  # library → stage\n",
        "a.py": "from pkg import b\n",
        "b.py": "def g():\n    from pkg import a  # a cycle, hidden in a function\n",
        "stages/__init__.py": "",
        "stages/lm.py": "from pkg import model\n",
        "stages/ppo.py": "from pkg.stages import lm\nfrom pkg.report import run\n",
        "report/__init__.py": "",
        "report/run.py": "from pkg.stages import lm\n",
        "evals/__init__.py": "",
        "evals/acc.py": "from pkg import report\n\n\ndef f():\n    from pkg import gone\n",
        "data/__init__.py": "",
        "data/hh.py": "try:\n    from pkg import missing\nexcept ImportError:\n    pass\n",
        "label/__init__.py": "",
        "label/store.py": "from pkg.evals import acc\n",
    })
    found = violations(root, "pkg")
    want = ["import cycle: pkg.a ↔ pkg.b",
            "pkg.stages.ppo (line 1) imports pkg.stages.lm: a stage imports another stage",
            "pkg.stages.ppo (line 2) imports pkg.report.run: only the CLI imports the report",
            "pkg.evals.acc (line 1) imports pkg.report: only the CLI imports the report",
            "pkg.model (line 2) imports pkg.stages.lm: the library imports a stage, an "
            "evaluation or the report",
            "pkg.evals.acc (line 1) imports pkg.report: an evaluation imports a stage or the "
            "report",
            "pkg.report.run (line 1) imports pkg.stages.lm: the report imports a stage",
            "pkg.evals.acc (line 5) imports pkg.gone (missing), which does not exist",
            "pkg.label.store (line 1) imports pkg.evals.acc: the library imports a stage, an "
            "evaluation or the report"]
    for w in want:
        assert w in found, (w, found)
    assert not any("main" in f for f in found)  # the CLI may import the report
    assert not any("pkg.missing" in f or "pkg.data" in f for f in found)  # guarded import


@pytest.mark.parametrize("name", sorted(modules(ROOT, "hh_jax")))
def test_every_module_imports(name):
    importlib.import_module(name)
