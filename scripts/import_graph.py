"""The package's import graph, read from the source with ``ast``, and the rules
the code's shape keeps (exit status 1 when one is broken):

1. no cycle among the modules (imports inside functions count: a lazy import
   that dodges a cycle is still one);
2. no decoding front end (the CLI's eval / translate, the server, the
   CTranslate2 export, the inference entry point, the plots) reaches
   ``transformer.training``, directly or through what it imports (importing a
   module runs its package's ``__init__`` too);
3. no module imports another module's ``_private`` names.

    python scripts/import_graph.py            # the rules, and the offenders
    python scripts/import_graph.py --edges    # and every import edge
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "transformer"
FRONT_ENDS = (
    "transformer.cli.evaluate",
    "transformer.cli.translate",
    "transformer.cli.score",
    "transformer.cli.options",
    "transformer.cli.common",
    "transformer.serve",
    "transformer.export",
    "transformer.inference",
    "transformer.plots",
)
FORBIDDEN = "transformer.training"


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The package module that ``name`` (a module or a name in one) is."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(
    module: str, path: Path, known: dict[str, Path]
) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken from it, at module level?) per import."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    top = set(map(id, _module_level(tree)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _target(alias.name, known)
                if target:
                    found.append((target, [], id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if not base.startswith(PACKAGE):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in known else _target(base, known)
                if target:
                    found.append((target, [alias.name], id(node) in top))
    return found


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The import statements that run when the module is imported (not those in
    functions or classes' methods)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def parents(module: str) -> list[str]:
    """The packages whose ``__init__`` importing ``module`` runs first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def reach(start: str, graph: dict[str, set[str]]) -> dict[str, str]:
    """Every module importing ``start`` runs -> the module that imported it."""
    seen = {start: ""}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph.get(v, set()) | set(parents(v))):
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def path_to(seen: dict[str, str], end: str) -> list[str]:
    out = [end]
    while seen[out[-1]]:
        out.append(seen[out[-1]])
    return out[::-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    private = []
    for module, path in known.items():
        for target, names, eager in imports(module, path, known):
            if target != module:
                graph[module].add(target)
            if args.edges:
                print(f"{module} -> {target}{'' if eager else ' (in a function)'}")
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    private.append(f"{module} imports {target}.{name}")
    problems = 0
    found = cycles({m: {t for t in ts if t != m} for m, ts in graph.items()})
    # a package's __init__ gathering its own submodules is not a cycle unless a
    # submodule imports the package back
    print(f"modules: {len(known)}, import edges: {sum(map(len, graph.values()))}")
    for component in found:
        problems += 1
        print("cycle: " + " <-> ".join(component))
    for front in sorted(m for m in known if m.startswith(FRONT_ENDS)):
        seen = reach(front, graph)
        bad = sorted(m for m in seen if m.startswith(FORBIDDEN))
        if bad:
            problems += 1
            print(f"{front} reaches {FORBIDDEN}: " + " -> ".join(path_to(seen, bad[0])))
    for line in private:
        problems += 1
        print(f"private import: {line}")
    print(
        f"cycles: {len(found)}; front ends reaching {FORBIDDEN}: "
        f"{problems - len(found) - len(private)}; private imports: {len(private)}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
