"""The documented public API stays importable where the docs, the tutorials and third-party
packages import it: `dis_core.__all__`, every `from dis_core... import ...` line of the docs and
the tutorial packages, the conformance checks of `dis_core.testing`, and every module under its
old flat name (`dis_core.interfaces` is `dis_core.contract.interfaces`)."""

import importlib
import re
import subprocess
import sys

import pytest

import dis_core
from conftest import ROOT

IMPORT_LINE = re.compile(r"^\s*(from dis_core[\w.]* import [\w, ]+|import dis_core[\w.]*)\s*(?:#.*)?$", re.M)


def _documented_imports() -> set[str]:
    sources = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md",
               *sorted(p for p in (ROOT / "docs" / "examples").glob("*/*.py"))]
    return {m.group(1).strip() for path in sources for m in IMPORT_LINE.finditer(path.read_text(encoding="utf-8"))}


def test_every_name_of_dis_core_all_exists():
    for name in dis_core.__all__:
        assert getattr(dis_core, name) is not None, name


def test_every_documented_import_line_runs():
    lines = _documented_imports()
    assert len(lines) > 10 and any("dis_core.interfaces" in line for line in lines)  # the scan finds them
    for line in sorted(lines):
        exec(line, {})  # noqa: S102 - the docs' own import lines


@pytest.mark.parametrize("old", sorted(dis_core.MOVED))
def test_old_module_paths_are_the_moved_modules(old):
    moved = importlib.import_module(f"dis_core.{dis_core.MOVED[old]}.{old}")
    assert importlib.import_module(f"dis_core.{old}") is moved


def test_the_documented_conformance_checks_exist():
    """README's `dis_core.testing` item names the conformance checks, one per component kind:
    each is a function `from dis_core.testing import *` gives a plugin package's tests."""
    from dis_core import testing
    from dis_core.contract.slots import SLOTS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    item = readme[readme.index("- `dis_core.testing`:"):]
    item = item[:item.index("\n- ")]
    documented = set(re.findall(r"`(check_\w+)`", item))
    assert documented == {f"check_{slot.kind}" for slot in SLOTS}  # one per kind, and no other
    star: dict = {}
    exec("from dis_core.testing import *", star)  # noqa: S102
    for name in documented:
        assert callable(star.get(name)) and star[name] is getattr(testing, name), name


def test_import_dis_core_stays_free_of_torch_and_the_cli_module_runs():
    code = "import sys, dis_core, dis_core.interfaces; print('torch' in sys.modules)"
    # the contract's Protocols name torch types, so importing them may load torch; the package itself not
    out = subprocess.run([sys.executable, "-c", "import sys, dis_core; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    help_text = subprocess.run([sys.executable, "-m", "dis_core.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "dis" in help_text and "run" in help_text
