"""Data parallelism in its closest CPU form: two processes through the DeepSpeed launcher (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env, tiny_recipe


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONPATH=str(ROOT))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if r["split"] == "train"]


def test_two_processes_match_one(tmp_path):
    # `final` targets hold no randomness, so one process with the global batch and two with half
    # of it each must compute the same loss (reveal_path draws its paths per rank).
    recipe = tiny_recipe(tmp_path, targets="final", steps=6, extra="\n[halting]\nname = \"fixed\"\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    # A free port: the launcher's default 29500 may be taken by another run on the machine.
    two = _launch([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _launch([sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2
    l1, l2 = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)

    ckpt = tmp_path / "two" / "checkpoints" / "step_6"
    digests = [torch.load(ckpt / f"dis_rank{r}.pt", weights_only=False)["params_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["exact/count"] == s2["exact/count"] == 12  # the test split is split across ranks, not duplicated
    assert s1["exact/accuracy"] == pytest.approx(s2["exact/accuracy"], abs=1e-4)


ARC_TINY = """
[task]
name = "arc"
config = { train_subsets = ["conceptarc"], test_subset = "arc1/evaluation", num_augmentations = 2, max_train_puzzles_per_subset = 3, max_test_puzzles = 2, eval_variants = 1 }
[backbone]
name = "trm"
config = { hidden_size = 32, num_layers = 1, num_heads = 2, expansion = 2.0, step_embedding = true, puzzle_emb_ndim = 32, puzzle_emb_len = 1 }
[targets]
name = "reveal_path"
[supervision]
n_sup = 2
[[evaluators]]
name = "arc"
[train]
global_batch_size = 4
steps = 4
log_interval = 1
threads = 1
puzzle_emb_lr = 0.1
"""


def test_two_processes_keep_puzzle_tables_identical(tmp_path):
    recipe = tmp_path / "arc_tiny.toml"
    recipe.write_text("# tiny ARC run for the 2-process test\n" + ARC_TINY)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    two = _launch([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dis_core.tools.cli", "run",
                   str(recipe), "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    ckpt = tmp_path / "two" / "checkpoints" / "step_4"
    states = [torch.load(ckpt / f"dis_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0]["puzzle_emb_sha256"] == states[1]["puzzle_emb_sha256"]
    assert states[0]["params_sha256"] == states[1]["params_sha256"]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert "arc/pass@2" in summary
    assert (tmp_path / "two" / "eval" / "step_4" / "arc" / "submission.json").is_file()
