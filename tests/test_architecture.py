"""The engine knows no family: ``distill.core`` imports nothing outside ``distill.core`` and
``distill.errors`` (lazily or not) and has no import cycle among its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import distill

CORE = Path(distill.__file__).parent / "core"
ALLOWED = ("distill.core", "distill.errors")


def imports_of(path: Path) -> list[str]:
    """Every ``distill`` module a file imports, at any depth (function bodies, TYPE_CHECKING blocks)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against distill.core
                base = "distill.core" if node.level == 1 else "distill"
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out += [mod] + [f"{mod}.{a.name}" for a in node.names if mod == "distill.core"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            out += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return [m for m in out if m == "distill" or m.startswith("distill.")]


def core_graph() -> dict[str, set[str]]:
    modules = {f"distill.core.{p.stem}": p for p in CORE.glob("*.py") if p.stem != "__init__"}
    return {m: {i for i in imports_of(p) if i in modules} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_core_imports_no_family():
    bad = {f"{p.relative_to(CORE.parent.parent)}: {i}" for p in CORE.glob("*.py") for i in imports_of(p)
           if not i.startswith(ALLOWED)}
    assert not bad, f"distill.core imports outside core: {sorted(bad)}"


def test_core_has_no_import_cycle():
    assert find_cycle(core_graph()) is None, f"import cycle in distill.core: {find_cycle(core_graph())}"


def test_the_checks_can_fail(tmp_path):
    """The walker sees lazy imports and the cycle finder finds cycles (so the two tests above can fail)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from distill.lm.merge import resolve_merge\n    import distill.tasks\n")
    assert imports_of(f) == ["distill.lm.merge", "distill.tasks"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
