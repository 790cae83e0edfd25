"""The import-direction checker: mcp_server -> orchestration -> toolbus, never upward."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# package -> top-level modules it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "toolbus": frozenset({"orchestration", "mcp_server", "mcp", "anthropic"}),
    "orchestration": frozenset({"mcp_server", "mcp"}),
}
# the only module allowed to import `anthropic`
ANTHROPIC_HOME = "orchestration/providers/anthropic.py"


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.imported}"


def imported_modules(source: str) -> list[tuple[int, str]]:
    """Top-level names of every absolute import in the source, with line numbers."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def check_tree(root: Path) -> list[Violation]:
    """Every layering violation under `root` (a checkout with the three packages)."""
    violations: list[Violation] = []
    for package in ("toolbus", "orchestration", "mcp_server"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imported_modules(path.read_text(encoding="utf-8")):
                top = module.split(".")[0]
                if top in FORBIDDEN.get(package, frozenset()):
                    violations.append(Violation(rel, line, module))
                elif top == "anthropic" and rel != ANTHROPIC_HOME:
                    violations.append(Violation(rel, line, module))
    return violations


@dataclass(frozen=True)
class Cycle:
    """A module imports a module of its package that imports it back."""

    path: str
    line: int
    imported: str
    back: tuple[str, ...]  # the chain of imports from `imported` back to the importer

    def __str__(self) -> str:
        chain = " -> ".join(self.back)
        return f"{self.path}:{self.line} imports {self.imported}, which imports it back: {chain}"


def _module_name(package_root: Path, path: Path) -> str:
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_within(
    source: str, module: str, is_package: bool, modules: frozenset[str]
) -> list[tuple[int, str]]:
    """The modules of `modules` that `source` imports anywhere (functions, `TYPE_CHECKING`
    blocks), with line numbers. `import a.b` names `a.b`, not its parent packages."""
    found: list[tuple[int, str]] = []

    def deepest(name: str) -> str | None:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                return candidate
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = deepest(alias.name)
                if target is not None:
                    found.append((node.lineno, target))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                target = deepest(f"{base}.{alias.name}") or deepest(base)
                if target is not None:
                    found.append((node.lineno, target))
    return found


def _path_back(graph: dict[str, dict[str, int]], start: str, goal: str) -> tuple[str, ...] | None:
    """The shortest chain of imports from `start` to `goal`, both included."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt in previous:
                    continue
                previous[nxt] = node
                if nxt == goal:
                    chain = [nxt]
                    while (step := previous[chain[-1]]) is not None:
                        chain.append(step)
                    return tuple(reversed(chain))
                following.append(nxt)
        frontier = following
    return None


def check_cycles(root: Path) -> list[Cycle]:
    """Every import inside a package (toolbus, orchestration, mcp_server) whose target imports
    the importer back, directly or through other modules of the same package."""
    cycles: list[Cycle] = []
    for package in ("toolbus", "orchestration", "mcp_server"):
        package_root = root / package
        paths = {_module_name(package_root, p): p for p in sorted(package_root.rglob("*.py"))}
        modules = frozenset(paths)
        graph: dict[str, dict[str, int]] = {}
        for module, path in paths.items():
            edges: dict[str, int] = {}
            source = path.read_text(encoding="utf-8")
            for line, target in _imports_within(source, module, path.stem == "__init__", modules):
                if target != module:
                    edges.setdefault(target, line)
            graph[module] = edges
        for module, edges in sorted(graph.items()):
            for target, line in sorted(edges.items()):
                back = _path_back(graph, target, module)
                if back is not None:
                    rel = paths[module].relative_to(root).as_posix()
                    cycles.append(Cycle(rel, line, target, back))
    return cycles
