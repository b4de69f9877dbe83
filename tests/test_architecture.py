"""The packages' imports go one way, with no loops: read from the source, not from a running
interpreter, so an import hidden inside a function counts as much as one at the top.

Layers, bottom to top:

- ``esmc_proto``: the wire contract (generated code, the status table); imports none of ours;
- ``esmc``: the model library; imports none of ours (no gRPC, no client, no server);
- ``esmc_client``: the torch-free client; imports the contract only. Its esm-SDK adapter
  (``esmc_client.esm_sdk``) may use the library, never the server;
- ``esmc_server``: the service; imports the library and the contract, never the client.
- ``esmc_ray``: the bulk jobs on Ray; may import all of the above (its in-process mode runs
  the server's engine, its server mode the client).

Jobs that need both the client and the server live in a package allowed to depend on both
(:data:`BOTH`). Imports under ``if TYPE_CHECKING:`` are annotations, not imports.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "esmc_proto": ROOT / "protos" / "esmc_proto",
    "esmc": ROOT / "esmc",
    "esmc_client": ROOT / "client" / "esmc_client",
    "esmc_server": ROOT / "server" / "esmc_server",
    "esmc_ray": ROOT / "client" / "esmc_ray",
}
ALLOWED = {
    "esmc_proto": set(),
    "esmc": set(),
    "esmc_client": {"esmc_proto"},
    "esmc_server": {"esmc", "esmc_proto"},
    "esmc_ray": {"esmc_proto", "esmc_client", "esmc", "esmc_server"},
}
"""Which of our packages each package may import."""
EXCEPTIONS = {"esmc_client.esm_sdk": {"esmc"}}
"""Modules allowed one more layer: the esm-SDK adapter builds on the library's SDK types."""
BOTH: set[str] = {"esmc_ray"}
"""Packages allowed to import every other one (jobs that need the client and the server)."""

KNOWN_LAYER_BREAKS: set[tuple[str, str]] = set()
"""Layer breaks still being taken apart; each entry must be real (a stale one fails)."""

KNOWN_LOOPS: set[frozenset[str]] = set()
"""Import loops still being taken apart; each entry must be real (a stale one fails)."""

MAX_LINES = 500
KNOWN_LONG_FILES: set[str] = set()
"""Source files over :data:`MAX_LINES` still to be split along a job boundary (must be real)."""


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (one of ours)
    line: int
    in_function: bool


def _module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            found[_module_name(package, path)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours ``name`` denotes (its longest known prefix), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _edges() -> list[Edge]:
    modules = _modules()
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        functions = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        inside = {
            line for f in functions for line in range(f.lineno, (f.end_lineno or f.lineno) + 1)
        }
        package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                targets = {_resolve(a.name, modules) for a in node.names}
            else:
                base = node.module or ""
                if node.level:
                    anchor = package_parts[: len(package_parts) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from pkg import sub" imports pkg.sub (a module) or a name of pkg itself
                targets = {_resolve(f"{base}.{a.name}", modules) for a in node.names}
            targets = {t for t in targets if t is not None and t != module}
            for target in sorted(targets):
                edges.append(Edge(module, target, node.lineno, node.lineno in inside))
    return edges


def _package(module: str) -> str:
    return module.split(".")[0]


def _layer_breaks(edges: list[Edge]) -> set[tuple[str, str]]:
    breaks = set()
    for edge in edges:
        source, target = _package(edge.source), _package(edge.target)
        if source == target or source in BOTH:
            continue
        allowed = ALLOWED[source] | EXCEPTIONS.get(edge.source, set())
        if target not in allowed:
            breaks.add((edge.source, edge.target))
    return breaks


def _loops(edges: list[Edge]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_go_one_way():
    breaks = _layer_breaks(_edges())
    assert breaks - KNOWN_LAYER_BREAKS == set(), "imports against the layers"
    assert KNOWN_LAYER_BREAKS - breaks == set(), "mended: remove from KNOWN_LAYER_BREAKS"


NETWORK_IMPORTS = {"esmc.attention", "esmc.batch", "esmc.config", "esmc.tokenizer"}
"""What the network (``esmc.model``) may import of ours: the class users load builds on it
elsewhere (``esmc.pretrained``), so weights, SDK types and generation stay out of it."""


def test_the_network_imports_only_low_level_modules():
    imported = {e.target for e in _edges() if e.source == "esmc.model"}
    assert imported <= NETWORK_IMPORTS, imported - NETWORK_IMPORTS


def test_no_import_loops():
    loops = _loops(_edges())
    assert loops - KNOWN_LOOPS == set(), "import loops"
    assert KNOWN_LOOPS - loops == set(), "mended: remove from KNOWN_LOOPS"


def test_no_source_file_over_500_lines():
    long = set()
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            if len(path.read_text().splitlines()) > MAX_LINES:
                long.add(path.relative_to(ROOT).as_posix())
    assert long - KNOWN_LONG_FILES == set(), f"files over {MAX_LINES} lines"
    assert KNOWN_LONG_FILES - long == set(), "split: remove from KNOWN_LONG_FILES"


def test_the_probe_sees_a_break_and_a_loop():
    edges = [
        Edge("esmc.a", "esmc_server.b", 1, True),
        Edge("esmc_server.b", "esmc.a", 1, False),
        Edge("esmc_client.c", "esmc_proto.v1", 1, False),
    ]
    assert _layer_breaks(edges) == {("esmc.a", "esmc_server.b")}
    assert _loops(edges) == {frozenset({"esmc.a", "esmc_server.b"})}
