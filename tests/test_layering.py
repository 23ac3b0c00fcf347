"""The import layering, read from the source with `ast` (nothing is imported):

- `dis_core` never imports the builtin plugins (`dis_plugins`, the `plugins/` directory);
- a plugin module imports `dis_core` and its own plugin only: a module of a plugin package
  (`plugins/tasks/arc/`) the rest of that package, a task module a helper module of its own
  task (`tasks/sudoku.py` -> `tasks/sudoku_*.py`), and a backbone or a task the helper its
  family shares (`SHARED`); never another plugin. Anything else several plugins need belongs in
  `dis_core`, where third-party plugins can use it too;
- no import circles among the `dis_core` modules, nor among the plugin modules.

Only imports that run when a module is loaded count (module level, class bodies, top-level
`if`/`try`; not `if TYPE_CHECKING:`). An import inside a function runs when the function is
called, after every module has finished loading, so it cannot take part in an import-time
circle, and a few are deliberate: the CLI imports heavy modules only for the command that needs
them. Such an import can still reach into another plugin, which this test does not see.
"""

from __future__ import annotations

import ast

import pytest
import sys
import tomllib
from pathlib import Path

from conftest import ROOT

SOURCES = {"dis_core": ROOT / "dis_core", "dis_plugins": ROOT / "plugins"}  # import name -> directory
# Helpers a family of builtin plugins shares: package -> modules every module directly in it may use.
SHARED = {
    "dis_plugins.backbones": ("dis_plugins.backbones.layers",),  # the blocks of trm and hrm
    "dis_plugins.tasks": ("dis_plugins.tasks.bank_cache", "dis_plugins.tasks.puzzle_csv"),  # the generated tasks' cache and CSV layout
}


def _modules() -> dict[str, Path]:
    out = {}
    for name, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = [name, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _load_time_nodes(tree: ast.AST):
    """The nodes that run when the module is imported: skip function bodies and TYPE_CHECKING."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imports(module: str, *, load_time: bool = True) -> set[str]:
    """The project modules `module` imports (a package counts as its __init__)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _load_time_nodes(tree) if load_time else ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target == "plugins" or target.startswith("plugins."):  # the directory's name for dis_plugins
                target = "dis_" + target
            if target in MODULES and target != module:
                found.add(target)
    return found


def _plugin_packages() -> list[str]:
    """Entry points that name a package (`dis_plugins.tasks.arc`): one plugin, many modules."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["dis"].values()
    return [m for m in declared if MODULES.get(m, Path()).name == "__init__.py"]


def _may_import(module: str, target: str, packages: list[str]) -> bool:
    if target.startswith("dis_core"):
        return True
    for package in packages:
        if module == package or module.startswith(package + "."):
            return target == package or target.startswith(package + ".")
    parent = module.rpartition(".")[0]
    if target in SHARED.get(parent, ()):
        return True
    return parent == "dis_plugins.tasks" and target.startswith(module + "_")  # a helper of this task


def _cycles(nodes: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over load-time imports."""
    graph = {m: sorted(t for t in imports(m) if t in nodes) for m in nodes}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_the_module_list_is_complete():
    """The scan names modules as Python does: every module of the two packages that importing the
    CLI and the builtin plugins loads is in it under its own name and file (the old flat names
    of moved modules being the same module objects), and the plugin packages are the entry
    points whose module is a package."""
    import importlib

    import dis_core.tools.cli  # noqa: F401 - the commands, and through them the core
    from dis_core.wiring.plugins import load_registry

    load_registry()  # every builtin plugin
    loaded = {m.__name__: Path(m.__file__) for name, m in list(sys.modules.items())
              if name.split(".")[0] in SOURCES and getattr(m, "__file__", None)}
    assert len(loaded) > 40 and {name.split(".")[0] for name in loaded} == set(SOURCES)
    assert {name: MODULES.get(name) for name in loaded} == loaded
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["dis"].values()
    packages = {m for m in declared if hasattr(importlib.import_module(m), "__path__")}
    assert packages and set(_plugin_packages()) == packages


def test_core_never_imports_the_builtin_plugins():
    # Function-level imports included: the core must run without `dis_plugins` installed.
    for module in MODULES:
        if module.startswith("dis_core"):
            reached = {t for t in imports(module, load_time=False) if t.startswith("dis_plugins")}
            assert not reached, f"{MODULES[module]} imports {sorted(reached)}"


def test_plugins_import_only_the_core_and_their_own_plugin():
    packages = _plugin_packages()
    breaches = [
        f"{MODULES[m].relative_to(ROOT)} imports {t}"
        for m in MODULES if m.startswith("dis_plugins")
        for t in sorted(imports(m)) if not _may_import(m, t, packages)
    ]
    assert not breaches, "plugins must import dis_core and their own plugin only:\n" + "\n".join(breaches)


def test_no_import_circles():
    for layer in ("dis_core", "dis_plugins"):
        cycles = _cycles([m for m in MODULES if m.split(".")[0] == layer])
        assert not cycles, f"import circles among {layer} modules: {cycles}"


def test_no_import_circles_even_through_function_level_imports(monkeypatch):
    # Deferred imports cannot break loading, but a circle through them is still a tangle of
    # responsibilities. The package module itself is left out: `dis_core.load` is a lazy
    # re-export of dis_core.tools.inference, which imports from the package.
    full = imports
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda m, load_time=True: full(m, load_time=False))
    for layer in ("dis_core.", "dis_plugins."):
        cycles = _cycles([m for m in MODULES if m.startswith(layer)])
        assert not cycles, f"import circles among {layer}* modules: {cycles}"


# dis_core's layers, in order (docs/architecture.md): each subpackage imports only itself and the
# ones before it, function-level imports included. The contract, what a plugin is written
# against, so stands without the wiring (registry, plugin loading, recipes, building) written
# against it.
LAYERS = ("contract", "wiring", "step", "outputs", "loop", "tools")
CONTRACT = {m for m in MODULES if m == "dis_core.contract" or m.startswith("dis_core.contract.")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if parts[0] == "dis_core" and len(parts) > 1 and parts[1] in LAYERS else None


def reached(module: str) -> set[str]:
    """Every dis_core module `module` imports, directly or not, function-level imports included
    (the package module `dis_core` itself left out: its names are re-exports)."""
    seen, todo = set(), [module]
    while todo:
        for target in imports(todo.pop(), load_time=False):
            if target.startswith("dis_core.") and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_layer_has_modules_and_every_core_module_a_layer():
    assert {layer(m) for m in MODULES if layer(m) is not None} == set(range(len(LAYERS)))
    # Only the package, the plugin author's checks and the `python -m dis_core.cli` entry stand
    # outside, as docs/architecture.md says ("Outside the layers stand ...").
    assert {m for m in MODULES if m.startswith("dis_core") and layer(m) is None} == {"dis_core", "dis_core.testing", "dis_core.cli"}


def test_each_layer_imports_only_the_layers_before_it():
    breaches = [
        f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
        for m in MODULES if layer(m) is not None
        for t in sorted(imports(m, load_time=False)) if layer(t) is not None and layer(t) > layer(m)
    ]
    assert not breaches, "a layer imports a later one:\n" + "\n".join(breaches)


def test_the_contract_imports_no_wiring():
    for module in sorted(CONTRACT):
        outside = reached(module) - CONTRACT
        assert not outside, f"{MODULES[module].relative_to(ROOT)} reaches {sorted(outside)}, outside the contract layer"


def test_the_checks_see_a_breach_and_a_circle(tmp_path, monkeypatch):
    # The rules above pass on this tree; make sure they would not pass vacuously.
    for name, text in {"a": "from dis_core import b\n", "b": "import dis_core.a\n",
                       "c": "def f():\n    from dis_plugins import targets\n"}.items():
        (tmp_path / f"{name}.py").write_text(text)
    fake = {**MODULES, **{f"dis_core.{n}": tmp_path / f"{n}.py" for n in "abc"}}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert _cycles(["dis_core.a", "dis_core.b"]) == [["dis_core.a", "dis_core.b"]]
    assert imports("dis_core.c", load_time=False) == {"dis_plugins", "dis_plugins.targets"} and not imports("dis_core.c")
    assert not _may_import("dis_plugins.tasks.sudoku", "dis_plugins.solver_edits", [])
    assert _may_import("dis_plugins.tasks.sudoku", "dis_plugins.tasks.sudoku_puzzles", [])
    assert _may_import("dis_plugins.tasks.arc.task", "dis_plugins.tasks.arc.encoding", ["dis_plugins.tasks.arc"])
    assert not _may_import("dis_plugins.tasks.arc.task", "dis_plugins.tasks.nqueens", ["dis_plugins.tasks.arc"])
    # the contract check sees a deferred import of the wiring (what BuildContext.build once had)
    (tmp_path / "d.py").write_text("def build():\n    from dis_core.wiring.plugins import load_registry\n")
    monkeypatch.setitem(fake, "dis_core.d", tmp_path / "d.py")
    assert {"dis_core.wiring.plugins", "dis_core.wiring.registry"} <= reached("dis_core.d")
    # the layer check sees a step module importing the loop, even in a function
    (tmp_path / "e.py").write_text("def f():\n    from dis_core.loop import trainer\n")
    monkeypatch.setitem(fake, "dis_core.step.e", tmp_path / "e.py")
    with pytest.raises(AssertionError, match=r"\(step\) imports dis_core.loop.trainer \(loop\)"):
        test_each_layer_imports_only_the_layers_before_it()
