"""Discovery through real entry points: a plugin package installed with pip is found and used."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, pip_install_target, subprocess_env, tiny_recipe

EXAMPLE = ROOT / "docs" / "examples" / "dis-row-sweep"


def test_installed_plugin_is_discovered_and_runs(tmp_path):
    site = tmp_path / "site"
    pip_install_target(EXAMPLE, site)
    env = subprocess_env(PYTHONPATH=str(site))
    listing = subprocess.run([sys.executable, "-m", "dis_core.tools.cli", "plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    rows = json.loads(listing.stdout)
    row = next(r for r in rows if r["name"] == "row_sweep")
    assert row["kind"] == "target_generator" and row["plugin"] == "row_sweep" and row["version"] == "0.1.0"

    recipe = tiny_recipe(tmp_path, targets="row_sweep", steps=3)
    run = subprocess.run(
        [sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "targets.config.direction=backward"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "run.json").read_text())["targets_report"]
    assert report["monotone_share"] == 1.0 and report["final_distance"] == 0.0

    # Without the package on the path, the same recipe is refused with the list of names.
    bare = subprocess.run([sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--dry-run"], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert bare.returncode == 2 and "unknown target_generator 'row_sweep'" in bare.stderr and "reveal_path" in bare.stderr


def test_builtins_are_declared_entry_points():
    """The builtins are found as any third-party plugin is: every module of plugins/ that defines
    a @hookimpl is a declared `dis` entry point (or a module of a declared package), and the
    builtin components come from exactly those entry points."""
    import tomllib

    from dis_core.wiring.plugins import load_registry

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["dis"]
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        tree = ast.parse(path.read_text())
        hooked = any(isinstance(node, ast.FunctionDef) and any(getattr(d, "id", getattr(d, "attr", "")) == "hookimpl"
                                                               for d in node.decorator_list) for node in ast.walk(tree))
        if not hooked:
            continue
        parts = ["dis_plugins", *path.relative_to(ROOT / "plugins").with_suffix("").parts]
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert any(module == m or module.startswith(m + ".") for m in declared.values()), f"{path} is no entry point"
    builtin = {e.plugin for e in load_registry().entries() if e.config_cls.__module__.startswith("dis_plugins")}
    assert builtin == set(declared)


def test_core_never_imports_builtin_plugins():
    for path in (ROOT / "dis_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("dis_plugins", "plugins") for n in names), f"{path} imports {names}"


def test_every_plugin_package_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"dis_core"} | {
        "dis_plugins" + ("." + ".".join(p.parent.relative_to(ROOT / "plugins").parts) if p.parent != ROOT / "plugins" else "")
        for p in (ROOT / "plugins").rglob("__init__.py")
    }
    assert on_disk <= listed, on_disk - listed
