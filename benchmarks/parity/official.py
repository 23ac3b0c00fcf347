"""Running the official TRM / DIS code from a checkout, on CPU, beside dis (parity traces and
benchmarks). Nothing of that code is copied here: the checkout's path is an argument.

The official modules share names across the repositories (`models`, `pretrain`, ...), so
`use_repo` purges them before importing from another checkout. Their imports that the code paths
run here never use (wandb, hydra, the CUDA adam-atan2 extension, ...) are answered by stubs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
import types
from pathlib import Path

import torch

REPO_MODULES = ("models", "utils", "dataset", "puzzle_dataset", "pretrain", "train_arc_tiny_corrupt", "evaluators")
STUBBED = ("wandb", "coolname", "yaml", "hydra", "omegaconf", "adam_atan2", "argdantic")
_added: list[str] = []


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of STUBBED packages with empty modules whose attributes are no-ops."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _stub_attr  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module):
        pass


def _stub_attr(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _noop


def _noop(*args, **kwargs):
    # Used as a decorator factory (hydra.main(...)), a decorator, a class or a function.
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return _noop


def prepare(cpu: bool = True) -> None:
    """Install the stubs, and on CPU make `Tensor.cuda` the identity: the official loop moves
    each batch with `.cuda()`; everything else it does is device-agnostic once the carry exists."""
    if not any(isinstance(f, _Stubs) for f in sys.meta_path):
        sys.meta_path.insert(0, _Stubs())
    if cpu:
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


def use_repo(path: Path) -> None:
    """Import the official modules from this checkout from now on."""
    for name in list(sys.modules):
        if name.split(".")[0] in REPO_MODULES:
            del sys.modules[name]
    for old in _added:
        if old in sys.path:
            sys.path.remove(old)
    _added[:] = [str(path)]
    sys.path.insert(0, str(path))


def git_head(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
