"""The package's imports point one way and close no loop (issue 17, part 4).

Every module under ``torchrec_hstu/`` is parsed with ``ast`` and each import of a
``torchrec_hstu`` module becomes an edge, wherever it sits: at the top, inside a function
(a deferred import that closes a loop is still a loop) or under ``if TYPE_CHECKING:``.
``from package import name`` points at ``package.name`` when that is a module, else at the
package's ``__init__``. The implicit import of a parent package (importing ``a.b.c`` runs
``a/b/__init__.py``) is not an edge: Python finds the parent already initialising and every
``__init__`` that re-exports its submodules would form a "loop" with them.

Layers (a module may import its own layer and the layers listed for it)::

    ops  <-  modules  <-  config (builders)  <-  models  <-  distributed / export  <-  predict
    ops  <-  data  <-  models
    cli, aoti_toolchain: standard-library leaves for the layers above ``modules``

Nothing in ``ops`` imports a module of another layer; ``modules`` imports only ``ops``;
``config`` reaches ``modules`` only for its builders; the package root imports nothing heavy.
"""

import ast
import pathlib
from typing import Dict, List, Optional, Set, Tuple

PACKAGE = "torchrec_hstu"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

#: Stand-alone helpers (standard library only) that the layers above ``modules`` may use.
LEAVES = {"cli", "aoti_toolchain"}
_ABOVE_MODULES = {"ops", "modules", "config", "data"} | LEAVES

#: layer -> the other layers it may import (its own layer is always allowed).
ALLOWED: Dict[str, Set[str]] = {
    "ops": set(),
    "data": {"ops"} | LEAVES,
    "modules": {"ops"},
    "config": {"ops", "modules"},
    "models": _ABOVE_MODULES,
    "distributed": _ABOVE_MODULES | {"models"},
    "export": _ABOVE_MODULES | {"models"},
    "predict": _ABOVE_MODULES | {"models", "export"},
    "cli": set(),
    "aoti_toolchain": set(),
    "__init__": set(),
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _resolve_relative(current: str, is_package: bool, level: int, target: Optional[str]) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_edges(modules: Dict[str, pathlib.Path]) -> Dict[str, List[Tuple[str, int]]]:
    """module -> [(imported package module, line)]."""
    edges: Dict[str, List[Tuple[str, int]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        found: List[Tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        target = alias.name
                        while target not in modules and "." in target:
                            target = target.rsplit(".", 1)[0]
                        found.append((target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    source = _resolve_relative(name, is_package, node.level, node.module)
                if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                    continue
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    if candidate in modules:
                        found.append((candidate, node.lineno))
                    elif source in modules:
                        found.append((source, node.lineno))
        edges[name] = [(target, line) for target, line in found if target != name]
    return edges


def find_cycles(edges: Dict[str, List[Tuple[str, int]]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph = {name: sorted({target for target, _ in targets}) for name, targets in edges.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_package_is_found():
    modules = package_modules()
    assert f"{PACKAGE}.ops.common" in modules and f"{PACKAGE}.modules.stu" in modules


def test_no_import_cycle():
    edges = import_edges(package_modules())
    cycles = find_cycles(edges)
    lines = []
    for component in cycles:
        members = set(component)
        links = sorted({
            f"{source}:{line} -> {target}"
            for source in component
            for target, line in edges[source]
            if target in members
        })
        lines.append("cycle among " + ", ".join(component) + "\n    " + "\n    ".join(links))
    assert not cycles, "import cycles (move the shared piece into a leaf module):\n" + "\n".join(lines)


def test_imports_point_down_the_layers():
    modules = package_modules()
    edges = import_edges(modules)
    upward = []
    unknown = sorted({layer(name) for name in modules} - set(ALLOWED))
    assert not unknown, f"new top-level parts {unknown}: give each its place in ALLOWED"
    for source, targets in edges.items():
        source_layer = layer(source)
        for target, line in targets:
            target_layer = layer(target)
            if target_layer == source_layer:
                continue
            if target_layer not in ALLOWED.get(source_layer, set()):
                upward.append(f"{modules[source].relative_to(ROOT.parent)}:{line} ({source_layer}) imports "
                              f"{target} ({target_layer})")
    assert not upward, "imports that point up (or across) the layers:\n" + "\n".join(sorted(upward))


def test_config_import_does_not_load_torchrec():
    """``import torchrec_hstu.config`` (schema, loader, validation) needs no torchrec; the
    builder names load the builders (and the modules, torchrec with them) on first use, which
    ``tests/config/test_builders.py`` exercises."""
    import subprocess
    import sys

    code = (
        "import sys; import torchrec_hstu.config as c; "
        "from torchrec_hstu.config import load_config, validate_config, config_to_kwargs; "
        "assert 'torchrec' not in sys.modules, 'torchrec imported'; "
        "assert 'torchrec_hstu.modules' not in sys.modules, 'modules imported'; "
        "assert 'build_transducer' in dir(c)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
