"""Shared test fixtures: tiny recipes, a fresh registry, one thread per test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

TINY_RECIPE = """
description = "tiny test recipe"
[task]
name = "nqueens"
config = {{ board_size = 5, num_train = 40, num_test = 12 }}
[backbone]
name = "trm"
config = {{ hidden_size = 32, num_layers = 1, num_heads = 2, expansion = 2.0, step_embedding = true }}
[targets]
name = "{targets}"
[supervision]
n_sup = 3
[[evaluators]]
name = "exact"
[[evaluators]]
name = "nqueens"
[train]
seed = 0
global_batch_size = 8
steps = {steps}
log_interval = 1
threads = 1
[train.optimizer]
name = "adamw"
config = {{ lr = 1e-3 }}
"""


def tiny_recipe(tmp_path: Path, *, targets: str = "reveal_path", steps: int = 6, extra: str = "", name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY_RECIPE.format(targets=targets, steps=steps) + extra)
    return path


TINY_ARC_RECIPE = """
[task]
name = "arc"
config = {{ train_subsets = ["{tr}"], test_subset = "{te}", num_augmentations = {aug}{task_extra} }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_layers = 1, num_heads = 2, expansion = 2.0, T = 1, n = 1, puzzle_emb_ndim = 16 }}
[targets]
name = "reveal_path"
[supervision]
n_sup = 2
{evaluators}
[train]
global_batch_size = 8
steps = {steps}
threads = 1
{train_extra}"""


def tiny_arc_recipe(path: Path, train_dir: Path, test_dir: Path, *, num_augmentations: int = 2, task_extra: str = "",
                    evaluators: tuple[str, ...] = ("arc", "exact"), pass_ks: list[int] | None = None, steps: int = 3,
                    train_extra: str = "") -> Path:
    """A tiny ARC recipe (D 16, 2 supervision steps) over task folders of JSON files, written to
    `path`: what the ARC evaluation, inference and adaptation tests train in seconds."""
    tables = []
    for name in evaluators:
        config = f"\nconfig = {{ pass_ks = {pass_ks} }}" if name == "arc" and pass_ks else ""
        tables.append(f'[[evaluators]]\nname = "{name}"{config}')
    path.write_text(TINY_ARC_RECIPE.format(tr=train_dir, te=test_dir, aug=num_augmentations, task_extra=task_extra,
                                           evaluators="\n".join(tables), steps=steps, train_extra=train_extra))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child `dis` process. In-process trainers leave the launcher's
    variables (RANK, MASTER_PORT, ...) set; a child must not inherit them, or it would join
    this process's (finished) process group on the same port."""
    from dis_core.loop.engine import LAUNCHER_VARS

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def registry():
    from dis_core.wiring.plugins import load_registry

    return load_registry()


def pip_install_target(pkg: Path, target: Path) -> None:
    """Install an example plugin package into `target` (not the venv): tests put it on PYTHONPATH."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(pkg)],
        check=True, capture_output=True, timeout=300,
    )
