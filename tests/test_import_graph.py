"""The import graph of src/opnorm, read with ``ast`` (nothing is imported).

Asserts three rules of the package's layout:

* no circle of imports between its modules (imports inside functions count too);
* no private (``_name``) name taken from another module, by ``from m import _x`` or ``m._x``;
* an import inside a function is of an optional dependency, or has a comment (same or
  previous line) saying why it cannot be at the top.

Edges: ``import opnorm.a.b`` and ``from opnorm.a import b`` (b a submodule) point to
``opnorm.a.b``; ``from opnorm.a import name`` (name not a submodule) points to the package
``opnorm.a`` (its ``__init__``). Importing ``opnorm.a.b`` from outside ``opnorm.a`` also points
to ``opnorm.a``, whose ``__init__`` runs first. Relative imports are resolved against the
importing module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "opnorm"

# third-party packages that may be imported inside a function: optional, or slow to import and
# needed by one command only
OPTIONAL = {"torchvision", "torchattacks", "matplotlib", "sklearn", "scipy"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    lines: list[str]
    edges: dict[str, int] = field(default_factory=dict)  # imported module -> first line


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_modules(src: Path = SRC) -> dict[str, Module]:
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        text = path.read_text()
        name = module_name(path, src)
        modules[name] = Module(name, path, path.name == "__init__.py", ast.parse(text, str(path)), text.splitlines())
    return modules


def resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module name that ``from ... import`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def targets(mod: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> list[tuple[str, str]]:
    """(imported opnorm module, imported name or '') pairs of one import statement."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                out.append((alias.name, ""))
        return out
    source = resolve_from(mod, node)
    if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
        return out
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, "") if sub in modules else (source, alias.name))
    return out


def type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, which never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def scopes(tree: ast.Module):
    """Every import node that runs, with whether it sits inside a function (the imports under
    ``if TYPE_CHECKING:`` run only for a type checker, so they close no circle)."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            if type_checking_only(child):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            stack.append((child, inside))


def build_graph(modules: dict[str, Module]) -> list[str]:
    """Fills each module's edges; returns the imports of opnorm names that resolve to no module."""
    unresolved = []
    for mod in modules.values():
        for node, _ in scopes(mod.tree):
            for target, _name in targets(mod, node, modules):
                if target not in modules:
                    unresolved.append(f"{mod.path}:{node.lineno}: {target} is no module of {PACKAGE}")
                    continue
                # importing opnorm.a.b from outside the package opnorm.a runs opnorm/a/__init__.py first
                parts = target.split(".")
                for package in [".".join(parts[:k]) for k in range(2, len(parts))]:
                    if package != mod.name and not mod.name.startswith(package + "."):
                        mod.edges.setdefault(package, node.lineno)
                if target != mod.name:
                    mod.edges.setdefault(target, node.lineno)
    return unresolved


def find_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].edges):
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
                components.append(set(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return [circle_in(component, modules) for component in components]


def circle_in(component: set[str], modules: dict[str, Module]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first)."""
    start = min(component)
    parents = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(modules[v].edges):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle found in {component}")


def describe(circle: list[str], modules: dict[str, Module]) -> str:
    return " -> ".join(
        f"{a} (line {modules[a].edges[b]})" if b is not None else a
        for a, b in zip(circle, [*circle[1:], None], strict=True)
    )


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(modules: dict[str, Module]) -> list[str]:
    found = []
    for mod in modules.values():
        aliases = {}  # local name -> opnorm module it is bound to
        for node, _ in scopes(mod.tree):
            for target, name in targets(mod, node, modules):
                if name and is_private(name) and target != mod.name:
                    found.append(f"{mod.path}:{node.lineno}: from {target} import {name}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name
            else:
                for target, name in targets(mod, node, modules):
                    if not name:  # a submodule bound to a local name
                        alias = next(a for a in node.names if target.endswith("." + a.name))
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(mod.tree):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not (isinstance(value, ast.Name) and value.id in aliases):
                continue
            root = aliases[value.id] or value.id
            owner = ".".join([root, *reversed(chain)])
            if owner in modules and owner != mod.name:
                found.append(f"{mod.path}:{node.lineno}: {owner}.{node.attr}")
    return found


def unexplained_function_imports(modules: dict[str, Module]) -> list[str]:
    found = []
    for mod in modules.values():
        for node, in_function in scopes(mod.tree):
            if not in_function:
                continue
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            else:
                roots = {resolve_from(mod, node).split(".")[0]}
            if roots <= OPTIONAL:
                continue
            line = mod.lines[node.lineno - 1]
            previous = mod.lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in line and not previous.startswith("#"):
                found.append(f"{mod.path}:{node.lineno}: {line.strip()}")
    return found


def test_every_import_of_the_package_resolves():
    modules = load_modules()
    assert build_graph(modules) == []


def test_no_import_cycles():
    modules = load_modules()
    build_graph(modules)
    cycles = find_cycles(modules)
    assert not cycles, "import circles (module (line of the import) -> ...):\n" + "\n".join(
        describe(c, modules) for c in cycles
    )


def test_no_private_names_across_modules():
    found = private_imports(load_modules())
    assert not found, "private names taken from another module (make them public in one module):\n" + "\n".join(found)


def test_function_level_imports_are_optional_or_explained():
    found = unexplained_function_imports(load_modules())
    assert not found, (
        "imports inside functions that are of no optional dependency and carry no comment "
        "(move them to the top of the module):\n" + "\n".join(found)
    )


def test_the_checker_sees_circles_private_names_and_late_imports(tmp_path):
    """The rules above can fail: a made-up package breaking each of them is caught."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from opnorm.sub.b import thing\n")
    (pkg / "a.py").write_text("from opnorm.sub import b\n\ndef f():\n    from opnorm.sub.b import _helper\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\nthing = 1\nx = c._other\n")
    (pkg / "c.py").write_text("def g():\n    # circle: a imports c late\n    import opnorm.a\n")
    modules = load_modules(tmp_path)
    assert build_graph(modules) == []
    assert find_cycles(modules) == [["opnorm.a", "opnorm.sub.b", "opnorm.c", "opnorm.a"]]
    assert [s.split(": ", 1)[1] for s in private_imports(modules)] == [
        "from opnorm.sub.b import _helper",
        "opnorm.c._other",
    ]
    assert [s.split(": ", 1)[1] for s in unexplained_function_imports(modules)] == ["from opnorm.sub.b import _helper"]


def test_the_checker_sees_circles_through_package_inits(tmp_path):
    """A submodule reading a name from its own package's ``__init__``, which imports it, is a
    circle; so is reaching into a package whose ``__init__`` imports the importer."""
    pkg = tmp_path / PACKAGE
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("from opnorm.p.x import y\n")
    (pkg / "p" / "x.py").write_text("from opnorm.p import z\ny = 1\n")
    (pkg / "q.py").write_text("from opnorm.r.s import t\n")
    (pkg / "r").mkdir()
    (pkg / "r" / "__init__.py").write_text("from opnorm import q\n")
    (pkg / "r" / "s.py").write_text("t = 1\n")
    modules = load_modules(tmp_path)
    assert build_graph(modules) == []
    assert find_cycles(modules) == [["opnorm.p", "opnorm.p.x", "opnorm.p"], ["opnorm.q", "opnorm.r", "opnorm.q"]]
