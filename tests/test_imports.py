"""The package's import layering, read from the source with ``ast`` (nothing is executed).

Rules:
  1. ``wgan_kernels/ops`` never imports ``wgan_kernels.nn``, ``.losses``, ``.train``, ``.eager``,
     ``.models`` or the top-level package ``wgan_kernels`` itself (which imports ``nn``): ops are
     the bottom layer. Absolute and relative imports, module-level and function-local alike.
  2. ``wgan_kernels/nn`` never imports ``.losses``, ``.train``, ``.eager`` or the top-level package.
  3. No import cycle among the package's modules through module-level imports (those that run
     when a module is imported: at the top, in ``if`` / ``try`` blocks, in class bodies).
     Function-local imports run later and may break a cycle; the ones that do (that would close a
     cycle if they moved to module level) must be listed in ``CYCLE_BREAKERS`` below, and here, so
     a new one is a decision, not an accident. Today there are none: the function-local imports
     left in the package (``cli``'s subcommands, ``train``'s optional plotting and sweep helpers,
     ``losses`` / ``models`` reaching ``nn``, ``_backend`` loading the extension) only defer work.

Importing a module also imports the packages above it; those edges are counted, except to
the importing module's own ancestor packages (Python has already started them).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "wgan_kernels"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# importing layer -> the layers it must never import (rules 1 and 2)
FORBIDDEN = {
    f"{PACKAGE}.ops": (PACKAGE, f"{PACKAGE}.nn", f"{PACKAGE}.losses", f"{PACKAGE}.train", f"{PACKAGE}.eager",
                       f"{PACKAGE}.models"),
    f"{PACKAGE}.nn": (PACKAGE, f"{PACKAGE}.losses", f"{PACKAGE}.train", f"{PACKAGE}.eager"),
}

# (importer, imported) function-local imports that would close a cycle at module level (rule 3)
CYCLE_BREAKERS: set[tuple[str, str]] = set()


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root`` and every
    compiled extension (``_C.<abi>.so``: a module that imports nothing of the package; ``_C`` is
    counted as a module even where it is not built, so ``from . import _C`` never reads as an
    import of the package itself)."""
    names = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".so", ".pyd") or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).parts)
        parts[-1] = parts[-1].split(".")[0]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    names.setdefault(f"{root.name}._C", root / "_C")
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(tree: ast.Module):
    """(node, local) for every Import / ImportFrom; ``local`` when inside a function or lambda."""
    def walk(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            yield from walk(child, inner)
    yield from walk(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module a dotted name refers to (the longest known prefix), None outside the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(root: Path = ROOT) -> list[tuple[str, str, bool, int]]:
    """(importer, imported, local, line) for every import of a package module by a package module,
    the implicit imports of parent packages included (not the importer's own ancestors)."""
    modules = module_names(root)
    edges = []
    for name, path in modules.items():
        if path.suffix != ".py":  # an extension
            continue
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, local in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # `from base import x`: the submodule base.x, else base
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is None:
                    continue
                parts = resolved.split(".")
                for k in range(1, len(parts) + 1):
                    imported = ".".join(parts[:k])
                    if imported == name or (k < len(parts) and imported in ancestors):
                        continue  # itself, or an implicit import of a package already being imported
                    edges.append((name, imported, local, node.lineno))
    return edges


def layering_violations(root: Path = ROOT) -> list[str]:
    """Rules 1 and 2: 'importer -> imported (line N)' for every forbidden import."""
    bad = {}
    for importer, imported, local, line in import_edges(root):
        for layer, forbidden in FORBIDDEN.items():
            if importer != layer and not importer.startswith(layer + "."):
                continue
            for f in forbidden:
                hit = imported == f if f == PACKAGE else (imported == f or imported.startswith(f + "."))
                if hit:
                    bad[f"{importer} -> {imported} (line {line}{', function-local' if local else ''})"] = None
    return list(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def module_level_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported, local, _ in import_edges(root):
        if not local:
            graph.setdefault(importer, set()).add(imported)
    return graph


def _reaches(graph, start, goal) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def cycle_breakers(root: Path = ROOT) -> set[tuple[str, str]]:
    """Function-local imports (importer, imported) that would close a module-level cycle."""
    graph = module_level_graph(root)
    return {(a, b) for a, b, local, _ in import_edges(root)
            if local and b not in graph.get(a, ()) and _reaches(graph, b, a)}


# ----------------------------------------------------------------------------- tests


def test_ops_and_nn_import_only_downward():
    bad = layering_violations()
    assert not bad, "upward imports (ops must not import nn/losses/train/eager/models; nn must not import " \
                    "losses/train/eager):\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    cycle = _cycle(module_level_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_function_local_cycle_breakers_are_listed():
    found = cycle_breakers()
    assert found == CYCLE_BREAKERS, (f"function-local imports that break a cycle changed: new "
                                     f"{sorted(found - CYCLE_BREAKERS)}, gone {sorted(CYCLE_BREAKERS - found)}; list "
                                     "them in CYCLE_BREAKERS and the module docstring")


def test_checker_sees_upward_and_cyclic_imports(tmp_path):
    """The checks catch what they are for: a relative function-local upward import in ops, an
    absolute one in nn, and a module-level cycle."""
    pkg = tmp_path / PACKAGE
    for sub in ("ops", "nn", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("def f():\n    from ..nn import b\n")
    (pkg / "nn" / "b.py").write_text("import wgan_kernels.train.c\n")
    (pkg / "train" / "c.py").write_text("from . import d\n")
    (pkg / "train" / "d.py").write_text("from .c import x\n")
    bad = layering_violations(pkg)
    assert any(v.startswith("wgan_kernels.ops.a -> wgan_kernels.nn") and "function-local" in v for v in bad), bad
    assert any(v.startswith("wgan_kernels.nn.b -> wgan_kernels.train") for v in bad), bad
    cycle = _cycle(module_level_graph(pkg))
    assert cycle is not None and {"wgan_kernels.train.c", "wgan_kernels.train.d"} <= set(cycle), cycle


# the package's private modules (imported as modules: they are internal to the package, not to a file)
PRIVATE_MODULES = ("_C", "_backend", "_triton", "_checks", "_env", "_chain")


def test_no_private_names_across_modules():
    """A module uses another module's public names only (``from x import _y`` would couple it to
    an implementation detail, as nn/spectral.py once did with ops/spectral_norm.py)."""
    bad = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level + bool(node.module) and node.module != "__future__":
                for alias in node.names:
                    name = alias.name
                    if name.startswith("_") and not name.startswith("__") and name not in PRIVATE_MODULES:
                        bad.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module or ''} "
                                   f"import {alias.name}")
    assert bad == [], bad
