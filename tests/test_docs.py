"""Documentation kept honest (the datasette pattern).

1. every hook has a heading in docs/hooks.md with its exact signature;
2. every hook is exercised by some test other than this file;
3. every field of the recipe classes is documented in docs/recipes.md, with its default;
4. every builtin component is documented in docs/recipes.md, with each config field and default;
5. the examples run: the tutorial's example package installs with pip and its recipe runs, and
   the code in the tutorials is quoted verbatim from the example packages, each Python block
   with the imports it uses. (The plugin modules of docs/hooks.md are run by
   tests/test_hooks.py, which may train in-process: a process group started here would leak its
   launcher variables into the later subprocess tests.)
6. the docs stand on their own: nothing cites a file outside the repository, every
   `docs/<file>.md#<section>` citation names a heading that exists, and every key a run writes
   to metrics.jsonl is documented in docs/outputs.md.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import os
import re
import runpy
import subprocess
import symtable
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from dis_core.contract import hookspecs
from dis_core.wiring.recipe import ComponentSpec, Eval, Recipe, Schedule, Supervision, Train

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


def _hookimpls(code: str) -> set[str]:
    """Names of the functions and methods decorated with `@hookimpl` in Python source, and in
    the plugin modules it holds as string literals (a test writes some to files)."""
    import textwrap

    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in node.decorator_list}
            if "hookimpl" in names:
                found.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "@hookimpl" in node.value:
            try:
                found |= _hookimpls(textwrap.dedent(node.value))
            except SyntaxError:  # prose that mentions @hookimpl, not a module
                pass
    return found


def test_every_hook_is_exercised_by_a_test():
    """Some test (other than this file) implements every hook with `@hookimpl`: a plugin of the
    test suite is called through it, not merely a line that names it."""
    implemented = set().union(*(_hookimpls(p.read_text()) for p in (ROOT / "tests").glob("test_*.py")
                                if p.name != Path(__file__).name))
    missing = set(_hooks()) - implemented
    assert not missing, f"no test in tests/ implements the hooks {sorted(missing)} with @hookimpl"


# ---------------------------------------------------------------------------- 3, 4: recipes


RECIPE_SECTIONS = {Train: "`[train]`", Supervision: "`[supervision]`", Schedule: "`[train.schedule]`", Eval: "`[eval]`"}


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
    from dis_core.wiring.plugins import load_registry

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
    cmd = [sys.executable, "-m", "dis_core.tools.cli", "run", str(pkg / "parity_quick.toml"), "--out", str(out),
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
    _check_outputs_documented(out, third_party={"parity"})


TUTORIALS = [("tutorial_target_generator.md", "dis-row-sweep"), ("tutorial_task.md", "dis-task-parity")]


def _blocks(tutorial: str, *langs: str) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall((DOCS / tutorial).read_text()) if lang in langs]


def _imports(code: str) -> set[tuple[str | None, str, str | None]]:
    """(module, name, alias) of every import in the code; `import x` gives (None, x, alias)."""
    out = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            out |= {(None, a.name, a.asname) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out |= {(node.module, a.name, a.asname) for a in node.names}
    return out


def _split_imports(code: str) -> tuple[str, str]:
    """A block's leading import statements, and the code after them."""
    end = 0
    for node in ast.parse(code).body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        end = node.end_lineno
    lines = code.splitlines()
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def _free_names(code: str) -> set[str]:
    """Global names the code reads, at module level or inside the functions and classes it
    defines, that it does not bind itself (builtins left out)."""
    top = symtable.symtable(code, "<block>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()

    def walk(table):
        used.update(s.get_name() for s in table.get_symbols() if s.is_referenced() and (table is top or s.is_global()))
        for child in table.get_children():
            walk(child)

    walk(top)
    return used - bound - set(dir(builtins))


def _defined(code: str) -> set[str]:
    """Names the code defines at module level (imports excluded)."""
    return {s.get_name() for s in symtable.symtable(code, "<block>", "exec").get_symbols() if s.is_assigned() and not s.is_imported()}


@pytest.mark.parametrize("tutorial, package", TUTORIALS)
def test_tutorial_code_is_quoted_from_the_example_package(tutorial, package):
    files = [p for p in (EXAMPLES / package).iterdir() if p.suffix in (".py", ".toml")]
    sources = "\n".join(p.read_text() for p in files)
    package_imports = set().union(*(_imports(p.read_text()) for p in files if p.suffix == ".py"))
    blocks = _blocks(tutorial, "python", "toml")
    assert blocks, f"{tutorial} quotes no code"
    for lang, code in blocks:
        head, body = _split_imports(code) if lang == "python" else ("", code)
        assert body.strip() in sources, f"{tutorial}: this {lang} block is not quoted verbatim from {package}:\n{code}"
        extra = _imports(head) - package_imports
        assert not extra, f"{tutorial}: this block imports {sorted(map(str, extra))}, which {package} does not:\n{code}"


@pytest.mark.parametrize("tutorial, package", TUTORIALS)
def test_tutorial_python_blocks_are_complete_with_their_imports(tutorial, package, tmp_path):
    """A reader pastes blocks, not the package: each Python block imports what it uses (it may
    use what earlier blocks define), and the blocks pasted in order are a module that runs and
    defines everything the package module does."""
    blocks = [code for _, code in _blocks(tutorial, "python")]
    defined: set[str] = set()
    for code in blocks:
        missing = _free_names(code) - defined
        assert not missing, f"{tutorial}: this block uses {sorted(missing)} without importing or defining them first:\n{code}"
        defined |= _defined(code)
    pasted = tmp_path / "pasted.py"
    pasted.write_text("\n\n\n".join(blocks))
    namespace = runpy.run_path(str(pasted))
    for module in (EXAMPLES / package).glob("*.py"):
        assert _defined(module.read_text()) <= set(namespace), (
            f"{tutorial} leaves out {sorted(_defined(module.read_text()) - set(namespace))} of {module.name}"
        )


def test_a_literal_choice_reports_the_choices_and_the_key():
    """What tutorial_target_generator.md promises for a `typing.Literal` config field."""
    from dis_core.wiring.config import structure

    module = runpy.run_path(str(EXAMPLES / "dis-row-sweep" / "dis_row_sweep.py"))
    _, errors = structure({"direction": "sideways"}, module["RowSweepConfig"], "$.targets.config")
    assert errors == ["invalid value (expected one of 'forward', 'backward') @ $.targets.config.direction"]
    assert errors[0] in (DOCS / "tutorial_target_generator.md").read_text()


# ---------------------------------------------------------------------------- 6: self-contained


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name and not name.startswith(".ci/")]


def test_no_tracked_file_cites_a_file_outside_the_repository():
    # Spelled in pieces so that this file does not match itself.
    outside = [b"reference_" + b"behaviour.md", b"../" + b"shared/"]
    found = [
        f"{path.relative_to(ROOT)}: {needle.decode()}"
        for path in _tracked_files() if path.is_file()
        for needle in outside if needle in path.read_bytes()
    ]
    assert not found, "these files cite documents outside the repository (cite docs/reference.md instead):\n" + "\n".join(found)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_cited_docs_section_exists():
    anchors = {p.name: {_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(p.read_text()), re.M)} for p in DOCS.glob("*.md")}
    cited = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
    linked = re.compile(r"\]\(([\w.-]+\.md)?#([\w-]+)\)")  # Markdown links inside docs/
    broken = []
    for path in _tracked_files():
        if path.suffix not in (".py", ".toml", ".md") or not path.is_file():
            continue
        text = path.read_text()
        refs = [(m.group(1), m.group(2)) for m in cited.finditer(text)]
        if path.parent == DOCS:
            refs += [(m.group(1) or path.name, m.group(2)) for m in linked.finditer(text)]
        broken += [f"{path.relative_to(ROOT)}: {doc}#{anchor}" for doc, anchor in refs if anchor not in anchors.get(doc, set())]
    assert not broken, "these citations name no heading:\n" + "\n".join(broken)


def _documented_outputs() -> set[str]:
    """The keys docs/outputs.md gives a row in its metrics.jsonl and summary.json sections:
    two-column rows name keys, three-column rows name an evaluator (blank: the one above) and
    one of its metrics."""
    sections = _sections((DOCS / "outputs.md").read_text(), 2)
    keys, evaluator = set(), ""
    for body in (sections["`metrics.jsonl`"], sections["`summary.json`"]):
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2:
                keys |= set(re.findall(r"`([^`]+)`", cells[0]))
            elif len(cells) == 3 and re.fullmatch(r"`[\w@]+`", cells[1]):
                evaluator = cells[0].strip("`") or evaluator
                keys.add(f"{evaluator}/{cells[1].strip('`')}")
    return keys


def _guided_documented(key: str, documented: set[str]) -> bool:
    """`exact/hamming@3@w=0.5`: a guidance sweep's copy of a documented key."""
    base = re.sub(r"@w=[^@/]*$", "", key)
    return "<evaluator>/<metric>@w=<w>" in documented and bool({base, re.sub(r"@\d+$", "@s", base), re.sub(r"@\d+$", "@K", base)} & documented)


def _check_outputs_documented(run_dir: Path, third_party: set[str]) -> None:
    """Every key of the run's metrics.jsonl and summary.json is documented in docs/outputs.md
    (`hamming@3` as `hamming@s`, `pass@2` as `pass@K`), except third-party evaluators' metrics."""
    documented = _documented_outputs()
    keys = set(json.loads((run_dir / "summary.json").read_text()))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    undocumented = [
        key for key in sorted(keys)
        if key.split("/")[0] not in third_party
        and not {key, re.sub(r"@\d+$", "@s", key), re.sub(r"@\d+$", "@K", key)} & documented
        and not ("@w=" in key and _guided_documented(key, documented))
    ]
    assert not undocumented, f"docs/outputs.md does not document these keys: {undocumented}"
