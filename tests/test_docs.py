"""Documentation kept honest (the datasette pattern).

1. every hook has a heading in docs/hooks.md with its exact signature;
2. every hook is exercised by some test other than this file;
3. every field of the recipe classes is documented in docs/recipes.md, with its default;
4. every builtin component is documented in docs/recipes.md, with each config field and default;
5. the examples run: the tutorial's example package installs with pip and its recipe runs, and
   the code in the tutorials is quoted verbatim from the example packages. (The plugin modules
   of docs/hooks.md are run by tests/test_hooks.py, which may train in-process: a process group
   started here would leak its launcher variables into the later subprocess tests.)
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from dis_core import hookspecs
from dis_core.recipe import ComponentSpec, Recipe, Schedule, Supervision, Train

from conftest import ROOT, pip_install_target, subprocess_env

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _hooks() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def _prose(text: str) -> str:
    """The Markdown without its fenced code blocks (a `## ` inside code is no heading)."""
    return FENCE.sub("", text)


def _sections(text: str, level: int) -> dict[str, str]:
    """heading text -> body, for headings of exactly `level` #s (a body runs to the next heading
    of the same or a higher level)."""
    out, heading, body = {}, None, []
    for line in _prose(text).splitlines():
        m = re.match(r"^(#+) (.*)$", line)
        if m and len(m.group(1)) <= level:
            if heading is not None:
                out[heading] = "\n".join(body)
            heading, body = (m.group(2).strip(), []) if len(m.group(1)) == level else (None, [])
        elif heading is not None:
            body.append(line)
    if heading is not None:
        out[heading] = "\n".join(body)
    return out


def _rows(body: str) -> dict[str, list[str]]:
    """Table rows whose first cell is a `key` in backticks: key -> the other cells."""
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([\w.\[\]]+)`", cells[0]) if len(cells) >= 3 else None
        if m:
            rows[m.group(1)] = cells[1:]
    return rows


def _documented_default(cell: str):
    """A default cell: a TOML value in backticks, or `required`, `none` (None) or `-` (a table
    documented elsewhere)."""
    raw = cell.strip().strip("`")
    if raw in ("required", "none", "-"):
        return raw
    return tomllib.loads(f"v = {raw}")["v"]


def _check_default(where: str, field: attrs.Attribute, cell: str) -> None:
    documented = _documented_default(cell)
    default = field.default
    if default is attrs.NOTHING:
        assert documented == "required", f"{where}: {field.name} has no default, docs say {cell}"
    elif isinstance(default, attrs.Factory):  # a table: documented in its own section ("-") or by value
        assert documented == "-" or documented == default.factory(), f"{where}: {field.name} defaults to {default.factory()!r}, docs say {cell}"
    elif default is None:
        assert documented == "none", f"{where}: {field.name} defaults to None, docs say {cell}"
    else:
        expected = list(default) if isinstance(default, tuple) else default
        assert documented == expected and type(documented) is type(expected), (
            f"{where}: {field.name} defaults to {default!r}, docs say {cell}"
        )


# ---------------------------------------------------------------------------- 1, 2: hooks


def test_every_hook_has_a_heading_with_its_exact_signature():
    headings = set(_sections((DOCS / "hooks.md").read_text(), 2))
    for name, fn in _hooks().items():
        expected = f"{name}{inspect.signature(fn)}"
        assert expected in headings, f"docs/hooks.md needs the heading '## {expected}'"
    stale = {h for h in headings if h.startswith("register_") and h.split("(")[0] not in _hooks()}
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"


def test_every_hook_is_exercised_by_a_test():
    tests = {p: p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name}
    for name in _hooks():
        assert any(name in text for text in tests.values()), f"no test in tests/ mentions the hook {name}"


# ---------------------------------------------------------------------------- 3, 4: recipes


RECIPE_SECTIONS = {Train: "`[train]`", Supervision: "`[supervision]`", Schedule: "`[train.schedule]`"}


def test_every_recipe_key_is_documented_with_its_default():
    text = (DOCS / "recipes.md").read_text()
    sections = _sections(text, 2)
    for cls, heading in RECIPE_SECTIONS.items():
        assert heading in sections, f"docs/recipes.md needs the section '## {heading}'"
        rows = _rows(sections[heading])
        for field in attrs.fields(cls):
            assert field.name in rows, f"docs/recipes.md {heading}: no row for `{field.name}`"
            _check_default(f"{heading}", field, rows[field.name][1])
    # top-level keys: each has a section whose heading names it
    for field in attrs.fields(Recipe):
        assert any(re.search(rf"\b{field.name}\b", h) for h in sections), f"docs/recipes.md: no section for `{field.name}`"
    component_rows = _rows(sections["Component sections"])
    for field in attrs.fields(ComponentSpec):
        assert field.name in component_rows, f"docs/recipes.md 'Component sections': no row for `{field.name}`"
        _check_default("Component sections", field, component_rows[field.name][1])
    assert any("extends" in h for h in sections)


def _builtin_entries():
    from dis_core.plugins import load_registry

    return [e for e in load_registry().entries() if e.config_cls.__module__.startswith("dis_plugins")]


def test_every_builtin_component_is_documented_with_its_config():
    sections = _sections((DOCS / "recipes.md").read_text(), 3)
    entries = _builtin_entries()
    assert entries
    for e in entries:
        heading = f"{e.kind} `{e.name}`"
        assert heading in sections, f"docs/recipes.md needs the section '### {heading}'"
        rows = _rows(sections[heading])
        for field in attrs.fields(e.config_cls):
            assert field.name in rows, f"docs/recipes.md {heading}: no row for `{field.name}`"
            _check_default(heading, field, rows[field.name][1])
        assert set(rows) <= {f.name for f in attrs.fields(e.config_cls)}, f"{heading}: documents keys the config lacks"


# ---------------------------------------------------------------------------- 5: examples run


def test_task_tutorial_package_installs_and_its_recipe_runs(tmp_path):
    pkg = EXAMPLES / "dis-task-parity"
    site = tmp_path / "site"
    pip_install_target(pkg, site)
    env = subprocess_env(PYTHONPATH=str(site))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dis_core.cli", "run", str(pkg / "parity_quick.toml"), "--out", str(out),
           "--set", "train.steps=3", "--set", "train.eval_limit=64", "--set", "train.threads=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["parity/count"] == 64
    assert 0.0 <= summary["parity/parity_accuracy"] <= 1.0 and "exact/accuracy" in summary
    info = json.loads((out / "run.json").read_text())
    provided = {(p["kind"], p["name"]): (p["plugin"], p["version"]) for p in info["plugins"]}
    assert provided[("task", "parity")] == provided[("evaluator", "parity")] == ("parity", "0.1.0")
    assert info["targets_report"]["monotone_share"] == 1.0 and info["targets_report"]["final_distance"] == 0.0


@pytest.mark.parametrize(
    "tutorial, package",
    [("tutorial_target_generator.md", "dis-row-sweep"), ("tutorial_task.md", "dis-task-parity")],
)
def test_tutorial_code_is_quoted_from_the_example_package(tutorial, package):
    sources = "\n".join(p.read_text() for p in (EXAMPLES / package).iterdir() if p.suffix in (".py", ".toml"))
    blocks = [(lang, code) for lang, code in FENCE.findall((DOCS / tutorial).read_text()) if lang in ("python", "toml")]
    assert blocks, f"{tutorial} quotes no code"
    for lang, code in blocks:
        assert code.strip() in sources, f"{tutorial}: this {lang} block is not quoted verbatim from {package}:\n{code}"
