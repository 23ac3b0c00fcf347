"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Every class derives from `UserError` when the cause is something the user can fix (a recipe,
a file, a name); those exit with status 2 and no traceback.
"""

from __future__ import annotations


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
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        avail = ", ".join(self.available) or "(none installed)"
        super().__init__(
            f"unknown {kind} {name!r}; available {kind}s: {avail} "
            f"(run 'dis plugins' to see every component and the plugin that provides it)"
        )


class DuplicateComponentError(DisError):
    def __init__(self, kind: str, name: str, first: str, second: str):
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(
            f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}"
        )


class PluginError(DisError):
    """A plugin is broken (bad hook name, bad registration). Raised at start-up."""


class DataError(UserError):
    """Malformed task data; the message names the file and the task or example."""


class CapabilityError(UserError):
    """A recipe asks a component for something it does not offer (e.g. solver edits)."""
