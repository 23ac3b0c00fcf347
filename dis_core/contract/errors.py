"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Exit statuses of `dis` (docs/recipes.md, "Exit statuses"):
  2  `UserError`: something the user or the environment must fix (a recipe, a file, a name, a
     broken plugin installation, a full disk, a locked run directory); message, no traceback.
  3  `RunDiverged`: training met a non-finite loss or gradient and stopped; the newest checkpoint
     is the last good one.
Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys
import warnings


class DisError(Exception):
    """Base class of every error dis raises on purpose."""


class UserError(DisError):
    """A mistake in user input (recipe, data file, command line). Exit status 2, no traceback."""


class RecipeError(UserError):
    """One or more problems in a recipe, each addressed by file and key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in recipe {source}" if source else "recipe problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class UnknownComponentError(UserError):
    def __init__(self, kind: str, name: str, available: list[str], broken: list[str] = ()):
        self.kind, self.name, self.available, self.broken = kind, name, sorted(available), list(broken)
        avail = ", ".join(self.available) or "(none installed)"
        # Which names a plugin that failed to load would have provided is unknowable: name them all.
        note = "".join(f"; {line}" for line in self.broken)
        super().__init__(
            f"unknown {kind} {name!r}; available {kind}s: {avail} "
            f"(run 'dis plugins' to see every component and the plugin that provides it){note}"
        )


class DuplicateComponentError(UserError):
    def __init__(self, kind: str, name: str, first: str, second: str):
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(
            f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}"
        )


class PluginError(UserError):
    """A plugin is broken (bad hook name, bad registration, a factory returning the wrong kind of
    object). The user fixes it by repairing or uninstalling the plugin, so it exits with status 2."""


class DataError(UserError):
    """Malformed task data; the message names the file and the task or example."""


class CapabilityError(UserError):
    """A recipe asks a component for something it does not offer (e.g. solver edits)."""


class RunDirError(UserError):
    """The run directory cannot be used: locked by another run, holds another run, not writable."""


class CheckpointError(UserError):
    """No checkpoint can be loaded (or one cannot be written); names the files or tensors."""


class DisContractWarning(DeprecationWarning):
    """A plugin was written against an older plugin contract: it lacks a member that a later
    contract version added (dis_core.contract.compat.ADDITIONS). It keeps working with the documented
    default; the message says what to add and from which contract version it is required."""


# A DeprecationWarning is hidden outside `__main__` by default; this one is addressed to whoever
# runs dis with an outdated plugin, so show it (once per message and place), unless the user
# chose warning filters themselves (`-W`, PYTHONWARNINGS: the pattern the warnings docs give).
# pytest's own filters apply on top of this one.
if not sys.warnoptions:
    warnings.filterwarnings("default", category=DisContractWarning)


class RunDiverged(DisError):
    """A non-finite loss or gradient norm: training stopped before the bad update (exit status 3)."""

    def __init__(self, message: str, *, step: int):
        self.step = step
        super().__init__(message)
