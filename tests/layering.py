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
