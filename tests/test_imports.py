"""Import structure of the package, read with ``ast`` (nothing is imported): one test function per rule.

Every module under ``nasreid/``, ``search_spaces/`` and ``strategies/`` is mapped to its installed name
(``search_spaces/x.py`` -> ``nasreid.search_spaces.x``, ``strategies/x.py`` -> ``nasreid.strategies.x``). An import
is *module-level* when it runs on import: anywhere outside a function body (``if``/``try`` blocks and class bodies
included), except under ``if TYPE_CHECKING:``. A rule says which imports it looks at.

To add a rule: write a ``test_<rule>`` function over :func:`module_graph` (module-level edges),
:func:`import_graph` (the edges of every import statement, at any level) or :func:`imports` (every import
statement, with its line and whether it is module-level), with an explicit ``KNOWN_..`` set for accepted exceptions.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> installed package name (pyproject's package-dir)
PACKAGE_DIRS = {"nasreid": "nasreid", "search_spaces": "nasreid.search_spaces", "strategies": "nasreid.strategies"}


@dataclass(frozen=True)
class Import:
    """One ``import`` / ``from ... import`` statement of ``module``, resolved to a module of the package."""

    module: str          # the importing module
    target: str          # the imported module of the package (``from X import name``: X, or X.name when a module)
    names: tuple         # the names taken by ``from X import ...`` (empty for ``import X``)
    lineno: int
    module_level: bool   # runs when ``module`` is imported (not inside a function, not under TYPE_CHECKING)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Installed module name -> source file, for every ``.py`` file of the package."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = pkg.split(".") + [p for p in rel if p != "__init__"]
            name = ".".join(parts)
            if name in out and path.name != "__init__.py":
                continue  # a package and a module of one name (mid-move): the package is what imports
            out[name] = path
    return out


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """``name`` itself when it is a module of the package, else its longest prefix that is one (``import
    nasreid.x.y`` where y is a name inside x), None outside the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules():
            return cand
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module_level: bool):
    """(statement, module_level) for every import statement under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), module_level)
        else:
            yield from _walk(child, module_level)


@functools.lru_cache(maxsize=None)
def imports() -> tuple[Import, ...]:
    """Every import statement of the package that names one of its modules (at any level)."""
    out = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = mod if _is_package(mod) else mod.rpartition(".")[0]
        for stmt, top in _walk(tree, True):
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    target = _resolve(alias.name)
                    if target is not None:
                        out.append(Import(mod, target, (), stmt.lineno, top))
                continue
            if stmt.level:
                base = package.split(".")
                base = base[:len(base) - (stmt.level - 1)]
                src = ".".join(base + ([stmt.module] if stmt.module else []))
            else:
                src = stmt.module or ""
            names = tuple(a.name for a in stmt.names)
            submodules = [f"{src}.{n}" for n in names if f"{src}.{n}" in modules()]
            others = tuple(n for n in names if f"{src}.{n}" not in modules())
            for sub in submodules:  # ``from pkg import submodule``
                out.append(Import(mod, sub, (), stmt.lineno, top))
            target = _resolve(src)
            if target is not None and (others or not submodules):
                out.append(Import(mod, target, others, stmt.lineno, top))
    return tuple(out)


def module_graph() -> nx.DiGraph:
    """Module-level import edges between the package's modules (``a -> b``: importing a imports b)."""
    g = nx.DiGraph()
    g.add_nodes_from(modules())
    for imp in imports():
        if imp.module_level and imp.module != imp.target:
            g.add_edge(imp.module, imp.target, lineno=imp.lineno)
    return g


def import_graph(extra: tuple[tuple[str, str], ...] = ()) -> nx.DiGraph:
    """Edges of *every* import statement between the package's modules, wherever it stands (module level,
    inside a function, under ``if TYPE_CHECKING:``), plus the ``extra`` edges (a test re-adding an old import).

    How packages count: a package's ``__init__`` is a module like any other (``nasreid.x``): its own import
    statements are its edges, and ``from nasreid.x import name`` (a name its ``__init__`` defines or re-exports)
    is an edge to ``nasreid.x``, so ``nasreid.x.y`` taking a name from its package whose ``__init__`` imports
    ``nasreid.x.y`` is a cycle (it meets a half-initialised package). The import of ``nasreid.x`` that Python
    runs implicitly before ``nasreid.x.y`` is *not* an edge: counting it would make every package whose
    ``__init__`` re-exports a submodule a cycle with that submodule.
    """
    g = nx.DiGraph()
    g.add_nodes_from(modules())
    for imp in imports():
        if imp.module != imp.target:
            g.add_edge(imp.module, imp.target, lineno=imp.lineno)
    for a, b in extra:
        assert a in g and b in g, (a, b)  # a typo must not pass as "no cycle"
        g.add_edge(a, b, lineno=None)
    return g


# ---- rules ----------------------------------------------------------------------------------------
#: module-level import cycles accepted as they are, each as :func:`_cycle` writes it (starting at its smallest
#: module); none today (a subset of :func:`test_no_import_cycle_at_any_level`, kept for its clearer message)
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _cycle(c: list[str]) -> tuple[str, ...]:
    """A cycle in import order, rotated to start at its smallest module (one spelling per cycle)."""
    i = c.index(min(c))
    return tuple(c[i:] + c[:i])


def test_the_walk_sees_the_package():
    mods = modules()
    assert {"nasreid.engine.pipeline", "nasreid.engine.runs", "nasreid.evaluation.runner", "nasreid.cli",
            "nasreid.strategies.base", "nasreid.strategies.hpo_workers", "nasreid.search_spaces.osnet_ain"} <= set(mods)
    g = module_graph()
    assert g.has_edge("nasreid.engine.pipeline", "nasreid.engine.runs")  # relative import
    assert g.has_edge("nasreid.evaluation.runner", "nasreid.engine.runs")  # absolute import
    assert g.has_edge("nasreid.strategies.optuna_hpo", "nasreid.strategies.base")
    lazy = [i for i in imports() if i.module == "nasreid.engine.context" and i.target == "nasreid.evaluation.runner"]
    assert lazy and not any(i.module_level for i in lazy)  # inside RunContext.evaluate: not an edge


def test_no_module_level_import_cycle():
    cycles = {_cycle(c) for c in nx.simple_cycles(module_graph())}
    new = sorted(cycles - KNOWN_CYCLES, key=len)
    assert not new, f"{len(new)} module-level import cycles, e.g.: " + "; ".join(
        " -> ".join(c + c[:1]) for c in new[:5])


#: import cycles at any level (:func:`import_graph`) accepted as they are, spelled as :func:`_cycle` writes them;
#: none today
KNOWN_IMPORT_CYCLES: set[tuple[str, ...]] = set()


def _new_import_cycles(g: nx.DiGraph) -> list[tuple[str, ...]]:
    """The cycles of ``g`` not in :data:`KNOWN_IMPORT_CYCLES`, shortest first."""
    return sorted({_cycle(c) for c in nx.simple_cycles(g)} - KNOWN_IMPORT_CYCLES, key=len)


def test_no_import_cycle_at_any_level():
    """No import circle, counting the imports inside functions too (a lazy import hides a circle from the
    module-level graph, not from the design). See :func:`import_graph` for how packages count."""
    new = _new_import_cycles(import_graph())
    assert not new, f"{len(new)} import cycles, e.g.: " + "; ".join(" -> ".join(c + c[:1]) for c in new[:5])


#: the imports that closed the circles broken in issue 25 (each with the import that is still there)
OLD_CIRCLES = {
    # RecipeError lived in config, which imports the registry inside functions
    "config <-> registry": ("nasreid.registry", "nasreid.config"),
    # progress_enabled lived in the context, which imports the evaluation runner inside evaluate()
    "context -> runner -> runs -> context": ("nasreid.engine.runs", "nasreid.engine.context"),
    "context <-> runner": ("nasreid.evaluation.runner", "nasreid.engine.context"),
    # the pipeline re-exported run_hpo (imported lazily in its __getattr__); hpo_workers imports the pipeline
    "pipeline <-> hpo_workers": ("nasreid.engine.pipeline", "nasreid.strategies.hpo_workers"),
}


def test_the_cycle_rule_finds_each_old_circle():
    """The rule above would fail on each old circle: the same graph with its old import added back has a cycle
    through that import (and without it, none)."""
    g = import_graph()
    for what, (a, b) in OLD_CIRCLES.items():
        assert not g.has_edge(a, b), f"{what}: {a} imports {b} again"
        cycles = _new_import_cycles(import_graph(extra=((a, b),)))
        assert any(a in c and b in c and c[(c.index(a) + 1) % len(c)] == b for c in cycles), (what, cycles)


def test_the_engine_context_does_not_import_the_pipeline():
    """The old cycle: ``context.evaluate`` imported ``evaluate_dataset`` from the pipeline (inside the method,
    which hid it from the module-level graph); evaluation now lives in :mod:`nasreid.evaluation.runner`."""
    bad = [i for i in imports() if i.module == "nasreid.engine.context" and i.target == "nasreid.engine.pipeline"]
    assert not bad, bad


def test_no_private_pipeline_names_outside_the_engine():
    """Outside ``nasreid/engine/`` no import statement (at any level) takes a ``_private`` name from
    ``nasreid.engine.pipeline``; nor does code reach one as ``pipeline._name`` after importing the module."""
    bad = []
    for imp in imports():
        if imp.module.startswith("nasreid.engine.") or imp.target != "nasreid.engine.pipeline":
            continue
        bad += [f"{imp.module}:{imp.lineno} imports {n}" for n in imp.names if n.startswith("_")]
    for mod, path in modules().items():
        if mod.startswith("nasreid.engine."):
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or "pipeline" for s in ast.walk(tree) if isinstance(s, ast.ImportFrom)
                   and s.module in ("nasreid.engine", "engine") for a in s.names if a.name == "pipeline"}
        aliases |= {a.asname for s in ast.walk(tree) if isinstance(s, ast.Import) for a in s.names
                    if a.name == "nasreid.engine.pipeline" and a.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                v = node.value
                if (isinstance(v, ast.Name) and v.id in aliases) or ast.unparse(v) == "nasreid.engine.pipeline":
                    bad.append(f"{mod}:{node.lineno} uses {ast.unparse(node)}")
    assert not bad, bad


#: modules that implement one paper's method (a space, a strategy, a training method, a loss, a matcher ...);
#: the engine runs any of them by name through the registries and imports none
PAPER_SPECIFIC = ("nasreid.search_spaces.", "nasreid.methods.qaconv", "nasreid.methods.domainmix",
                  "nasreid.models.qaconv", "nasreid.models.rmgl", "nasreid.losses.msinet", "nasreid.losses.rmgl",
                  "nasreid.losses.sam", "nasreid.losses.class_memory", "nasreid.evaluation.qaconv",
                  "nasreid.evaluation.tlift", "nasreid.evaluation.rerank", "nasreid.strategies.gumbel",
                  "nasreid.strategies.darts_tcm", "nasreid.strategies.random", "nasreid.strategies.optuna_hpo")


def test_the_engine_imports_no_paper_specific_module():
    """At any level (inside functions too): the engine knows the loop, the run folders and the registries."""
    bad = sorted(f"{i.module}:{i.lineno} -> {i.target}" for i in imports()
                 if i.module.startswith("nasreid.engine.") and i.target.startswith(PAPER_SPECIFIC))
    assert not bad, bad
    assert any(m.startswith(PAPER_SPECIFIC) for m in modules())  # the list names real modules
