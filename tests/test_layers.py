"""The package's layers import downward only, and no module imports itself back through others.

How it checks: every ``.py`` file under ``qmace/`` is parsed with ``ast`` and every ``import``/``from ...
import`` statement is collected wherever it sits (module level, inside functions, under ``TYPE_CHECKING``),
relative imports resolved. ``from pkg import name`` counts as an import of ``pkg.name`` when that is a
module, else of ``pkg``. A module's layer is that of the longest prefix listed in ``LAYERS``; an import may
point to the same layer or a lower one, never higher. Cycles: Tarjan's strongly connected components over
the module graph (same edges) must all be single modules.

The layers, lowest first (docs/design notes in README "Layout"):
- base: errors, limits, fileio, qmath (quantization parameters and integer maths: the IR's Tensor holds
  QuantParams), config (YAML -> typed), data (sample files), metrics;
- ir; ops (each op: attributes, kernels, traits);
- onnx_bridge (IR <-> ONNX) and modelfile (IR <-> .qmace file);
- runtime (one Session over the reference kernels, ONNX Runtime and OpenVINO: it executes any IR graph, so
  it sits below its users: the frontends' validation oracles, calibration, QAT);
- passes (graph rewrites; shape inference through the bridge);
- frontends (source formats -> IR; they may run passes such as shape inference and use the runtime's ORT
  session as the ONNX oracle);
- pipeline (a YAML model entry -> optimized float graph; the build tree; samples);
- quantize (calibration, recipe, plan and rewrite, refinements); qat (PyTorch, built on quantize);
- api (the verbs as functions); cli (argument parsing and printing).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "qmace"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("qmace", "qmace.errors", "qmace.limits", "qmace.fileio", "qmace.qmath", "qmace.config",
              "qmace.data", "qmace.metrics")),
    ("ir", ("qmace.ir",)),
    ("ops", ("qmace.ops",)),
    ("bridge", ("qmace.onnx_bridge", "qmace.modelfile")),
    ("runtime", ("qmace.runtime",)),
    ("passes", ("qmace.passes",)),
    ("frontends", ("qmace.frontends",)),
    ("pipeline", ("qmace.pipeline",)),
    ("quantize", ("qmace.quantize",)),
    ("qat", ("qmace.qat",)),
    ("api", ("qmace.api",)),
    ("cli", ("qmace.cli", "qmace.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported qmace module, line) for every import statement in the file, function-local ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "qmace"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qmace":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module}: not in any layer of tests/test_layers.py LAYERS; add it"
    return best


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer_and_imports_point_down():
    upward = []
    for mod, imports in _graph().items():
        own = _layer(mod)
        for target, line in imports:
            if _layer(target) > own:
                upward.append(f"{mod}:{line} imports {target} "
                              f"({LAYERS[own][0]} -> {LAYERS[_layer(target)][0]})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    return sccs


def test_no_import_cycle():
    graph = {m: {t for t, _ in imps if t != m} for m, imps in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_function_local_imports_and_cycles():
    """The checker itself: a function-local import is an edge, and a two-module loop is a cycle."""
    src = "def f():\n    from qmace.api import run\n"
    tree_imports = [(n.module, n.lineno) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert tree_imports == [("qmace.api", 2)]
    assert _layer("qmace.api") > _layer("qmace.quantize.recipe")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
