"""The package's layers point one way: a module imports only from its own layer or below, and no
import cycles exist (function-local imports count). The layers, bottom to top, are listed in
LAYERS; ARCHITECTURE.md explains them."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "openrlaif"

# Bottom to top. A module may import from its own group and from any group below it.
LAYERS: list[set[str]] = [
    {"errors", "redaction"},
    {"config"},
    {"data"},
    {"models"},
    {"inference"},
    {"judges"},
    {"cards"},
    {"labeling", "generation", "distill", "training"},
    {"evaluation"},
    {"pipeline"},
    {"cli", "__main__"},
]
# Same layer, different groups, that must not import each other.
SIBLINGS_APART = [{"labeling", "training"}]


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(group: str) -> int:
    for i, layer in enumerate(LAYERS):
        if group in layer:
            return i
    raise AssertionError(f"openrlaif.{group} is in no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported openrlaif module, line, function-local?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(
                    (a.name, child.lineno, local) for a in child.names if a.name.startswith("openrlaif")
                )
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if base.startswith("openrlaif"):
                    found.append((base, child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def test_every_import_points_down_or_sideways_within_its_layer():
    upward = []
    for name, path in MODULES.items():
        if name == "openrlaif":
            continue
        mine = group_of(name)
        for target, line, _ in imports_of(path):
            theirs = group_of(target)
            if theirs in ("__init__", mine):
                continue
            if layer_of(theirs) > layer_of(mine) or any({mine, theirs} <= s for s in SIBLINGS_APART):
                upward.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {
        name: {t for t, _, _ in imports_of(path) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
            # A package whose __init__ re-exports its own modules loops with them harmlessly.
            top = min(component, key=len)
            if len(component) > 1 and not all(m == top or m.startswith(top + ".") for m in component):
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(", ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openrlaif"):
                private += [
                    f"{path.relative_to(SRC.parent)}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_function_local_imports_of_the_package_say_why():
    """A project module is imported inside a function only to keep a heavy library (torch) out of
    start-up, and the line says so with a `# why:` comment."""
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, local in imports_of(path):
            first = line - 1  # the comment may sit above the block of imports this one is in
            while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                first -= 1
            if local and not any("# why" in text for text in lines[max(first - 1, 0) : line]):
                unexplained.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}")
    assert not unexplained, "function-local imports without a `# why:` comment:\n" + "\n".join(unexplained)
