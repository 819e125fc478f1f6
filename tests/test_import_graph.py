"""The package's import graph: no cycle between ``llada_cpt`` subpackages, and ``stages`` only behind the CLI.

Every ``import`` / ``from ... import`` in every ``.py`` under ``llada_cpt`` is
read with :mod:`ast` -- module level and inside functions alike (a lazy import
is still a dependency) -- and mapped to its *node*: the subpackage
(``llada_cpt/inference/...`` -> ``inference``) or, for a top-level module, the
module itself (``llada_cpt/cli.py`` -> ``cli``).  Nothing is imported, so
the check runs in well under a second without Megatron.

The rules (issue 18):

1. no cycle between nodes;
2. ``inference``, ``convert``, ``checkpoint`` and ``runtime`` never import
   ``stages``: the CLI's subcommand table is the one place that dispatches to a stage;
3. ``checkpoint`` never imports ``training`` (training saves and loads through it), and
   no ``training`` module imports the offline merge tool ``checkpoint.merge`` (item 1:
   top-k selection and retention live in ``checkpoint/selection.py``);
4. the offline checkpoint tools import no Megatron-Core (checked per module below).

Edges that break them today are listed in :data:`ALLOWED`, each with the
issue-18 item that removes it.  An allowed edge that no longer exists fails the
test too, so the list can only shrink.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llada_cpt"

Edge = Tuple[str, str]

# imported node -> (the nodes that must never import it, why)
FORBIDDEN: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "stages": (("inference", "convert", "checkpoint", "runtime"),
               "only cli.py's subcommand table dispatches to stages"),
    "training": (("checkpoint",), "checkpoint code is the layer below training (issue 18 item 1)"),
}

# Edges that break a rule today, each with what removes it.  Only delete entries (a stale one fails the test).
ALLOWED: Dict[Edge, str] = {}


# ------------------------------------------------------------------------------ the checker


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _node(module: str, package: str) -> str:
    """``package.sub.x`` -> ``sub``; ``package.cli`` -> ``cli``; ``package`` -> ``package``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else package


def _statements(body: Iterable[ast.AST]) -> Iterable[ast.AST]:
    """Every statement, nested ones (functions, classes, if/try/with/match bodies) included.

    Imports are statements, so this finds all of them without visiting every expression node as ``ast.walk`` would.
    """
    for stmt in body:
        yield stmt
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(stmt, block, ()))


def _targets(tree: ast.Module, module: str, is_package: bool, modules: Set[str], package: str
             ) -> Iterable[Tuple[str, int]]:
    """``(imported module, line)`` for every import anywhere in ``tree`` (relative ones resolved)."""
    for stmt in _statements(tree.body):
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                yield alias.name, stmt.lineno
        elif isinstance(stmt, ast.ImportFrom):
            if stmt.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (stmt.level - 1)]
                target = ".".join(base + ([stmt.module] if stmt.module else []))
            else:
                target = stmt.module or ""
            for alias in stmt.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), stmt.lineno


def import_graph(root: Path, package: str = PACKAGE) -> Dict[Edge, List[str]]:
    """``{(importer node, imported node): ["path:line", ...]}`` over every ``.py`` under ``root / package``."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(f, root) for f in files}
    edges: Dict[Edge, List[str]] = defaultdict(list)
    for f in files:
        module = _module_name(f, root)
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for target, line in _targets(tree, module, f.name == "__init__.py", modules, package):
            if target != package and not target.startswith(package + "."):
                continue
            src, dst = _node(module, package), _node(target, package)
            site = f"{f.relative_to(root).as_posix()}:{line}"
            if src != dst and site not in edges[(src, dst)]:
                edges[(src, dst)].append(site)
    return dict(edges)


def cycles(edges: Iterable[Edge]) -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def forbidden(edges: Iterable[Edge]) -> List[Edge]:
    """The edges that :data:`FORBIDDEN` rules out."""
    return sorted((a, b) for a, b in edges if b in FORBIDDEN and a in FORBIDDEN[b][0])


def violations(graph: Dict[Edge, List[str]], allowed: Dict[Edge, str]) -> List[str]:
    """One line per broken rule, with the import sites; empty when the graph is clean."""
    live = {e: sites for e, sites in graph.items() if e not in allowed}
    lines = []
    for component in cycles(live):
        inside = [f"{a} -> {b} ({', '.join(live[(a, b)][:2])})" for (a, b) in sorted(live)
                  if a in component and b in component]
        lines.append(f"import cycle between {', '.join(component)}: " + "; ".join(inside))
    for a, b in forbidden(live):
        lines.append(f"{a} imports {b} ({', '.join(live[(a, b)][:3])}): {FORBIDDEN[b][1]}")
    tangled = [set(c) for c in cycles(graph)]
    for a, b in sorted(allowed):
        if (a, b) not in graph:
            lines.append(f"allowed edge {a} -> {b} no longer exists: delete it from ALLOWED")
        elif not forbidden([(a, b)]) and not any(a in c and b in c for c in tangled):
            lines.append(f"allowed edge {a} -> {b} breaks no rule: delete it from ALLOWED")
    return lines


# ------------------------------------------------------------------------------ the package


def test_subpackages_import_without_cycles_and_stages_only_from_the_cli():
    problems = violations(import_graph(ROOT), ALLOWED)
    assert not problems, "\n".join(problems)


def test_sampler_depends_only_on_the_denoiser_interface_and_the_kv_cache():
    """Item 4: the sampler imports neither the Megatron engine nor the generate() glue."""
    path = ROOT / PACKAGE / "inference" / "sampler.py"
    modules = {_module_name(f, ROOT) for f in (ROOT / PACKAGE).rglob("*.py")}
    got = {t for t, _ in _targets(ast.parse(path.read_text()), f"{PACKAGE}.inference.sampler", False, modules,
                                  PACKAGE) if t.startswith(PACKAGE)}
    assert got <= {f"{PACKAGE}.errors", f"{PACKAGE}.inference.kv_cache"}, sorted(got)


def _imports_of(path: Path) -> Set[str]:
    modules = {_module_name(f, ROOT) for f in (ROOT / PACKAGE).rglob("*.py")}
    module = _module_name(path, ROOT)
    return {t for t, _ in _targets(ast.parse(path.read_text()), module, path.name == "__init__.py", modules, PACKAGE)}


def test_training_does_not_import_the_merge_tool():
    """Item 1: retention takes top-k selection from checkpoint/selection.py, not from the merge CLI."""
    users = sorted(str(f.relative_to(ROOT)) for f in (ROOT / PACKAGE / "training").rglob("*.py")
                   if f"{PACKAGE}.checkpoint.merge" in _imports_of(f))
    assert not users, users


# the save / load of a live training run (Megatron's dist_checkpointing and optimizer); every other module of
# llada_cpt/checkpoint/ serves the offline tools too and stays light
MEGATRON_CHECKPOINT_MODULES = {"megatron.py", "optimizer_state.py"}
# what the offline checkpoint modules may import from the package: nothing that builds or runs a model
OFFLINE_CHECKPOINT_DEPENDENCIES = ("checkpoint", "errors", "arg_types", "files", "config", "diffusion")


def test_offline_checkpoint_modules_import_no_megatron():
    """The offline tools (merge, verify, inspect's readers, CheckpointInfo) stay light: no Megatron-Core, no
    training or model code, and not the Megatron save / load next to them."""
    bad = {}
    for f in sorted((ROOT / PACKAGE / "checkpoint").glob("*.py")):
        if f.name in MEGATRON_CHECKPOINT_MODULES:
            continue
        got = sorted(t for t in _imports_of(f) if t.split(".")[0] == "megatron"
                     or t.startswith(f"{PACKAGE}.") and _node(t, PACKAGE) not in OFFLINE_CHECKPOINT_DEPENDENCIES
                     or t.removeprefix(f"{PACKAGE}.checkpoint.") + ".py" in MEGATRON_CHECKPOINT_MODULES)
        if got:
            bad[f.name] = got
    assert not bad, bad
    assert {f.name for f in (ROOT / PACKAGE / "checkpoint").glob("*.py")} >= MEGATRON_CHECKPOINT_MODULES


def test_checkpoint_code_has_one_home():
    """Item 1: everything that saves, loads, reads, names, selects or merges checkpoints is in checkpoint/."""
    strays = sorted(str(f.relative_to(ROOT)) for f in (ROOT / PACKAGE).rglob("*checkpoint*.py")
                    if f.parent.name != "checkpoint" and "megatron_patches" not in f.parts)
    assert not strays, strays


# ------------------------------------------------------------------------------ the checker itself


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_forbidden_edges_and_stale_allowances(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/checkpoint.py": "import os\nfrom pkg.training import loop\n",
        "pkg/data/__init__.py": "",
        "pkg/data/loader.py": "def f():\n    from .. import checkpoint  # function level\n",
        "pkg/training/__init__.py": "from .loop import run\n",
        "pkg/training/loop.py": "from ..data import loader\n\ndef run():\n    pass\n",
        "pkg/stages/__init__.py": "",
        "pkg/stages/cpt.py": "from pkg.training.loop import run\n",
        "pkg/inference/__init__.py": "",
        "pkg/inference/engine.py": "def g():\n    import pkg.stages.cpt\n",
        "pkg/cli.py": "from .stages import cpt\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert set(graph) == {("checkpoint", "training"), ("data", "checkpoint"), ("training", "data"),
                          ("stages", "training"), ("inference", "stages"), ("cli", "stages")}
    assert graph[("data", "checkpoint")] == ["pkg/data/loader.py:2"]
    assert cycles(graph) == [["checkpoint", "data", "training"]]
    assert forbidden(graph) == [("checkpoint", "training"), ("inference", "stages")]  # cli -> stages is allowed
    problems = violations(graph, {})
    assert len(problems) == 3
    assert problems[0].startswith("import cycle between checkpoint, data, training: checkpoint -> training "
                                  "(pkg/checkpoint.py:2); data -> checkpoint (pkg/data/loader.py:2); training -> data")
    assert problems[1].startswith("checkpoint imports training (pkg/checkpoint.py:2)")
    assert problems[2].startswith("inference imports stages (pkg/inference/engine.py:2)")
    # allowing the edges that break the rules clears them; an allowance for an edge that is gone is reported
    allowed = {("checkpoint", "training"): "", ("inference", "stages"): ""}
    assert violations(graph, allowed) == []
    assert violations(graph, {**allowed, ("convert", "stages"): "", ("stages", "training"): ""}) == [
        "allowed edge convert -> stages no longer exists: delete it from ALLOWED",
        "allowed edge stages -> training breaks no rule: delete it from ALLOWED"]


@pytest.mark.parametrize("module, source, want", [
    ("pkg.a.x", "from . import y", "pkg.a.y"),
    ("pkg.a.x", "from .y import f", "pkg.a.y"),
    ("pkg.a.x", "from ..b import z", "pkg.b"),
    ("pkg.a", "from .y import f", "pkg.a.y"),  # in an __init__, `.` is the package itself
    ("pkg.a.x", "from .. import merge", "pkg.merge"),  # a name that is a module is that module
    ("pkg.a.x", "from .. import b, VERSION", "pkg.b"),
    ("pkg.a.x", "class C:\n    def f(self):\n        try:\n            pass\n        except ImportError:\n"
                "            import pkg.b as b\n", "pkg.b"),  # nested anywhere
])
def test_relative_imports_resolve(module, source, want):
    modules = {"pkg", "pkg.a", "pkg.a.x", "pkg.a.y", "pkg.b", "pkg.merge"}
    got = {t for t, _ in _targets(ast.parse(source), module, module == "pkg.a", modules, "pkg")}
    assert got == {want} if "VERSION" not in source else got == {want, "pkg"}
