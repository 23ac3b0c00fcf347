"""Data parallelism in its closest CPU form: two processes through the DeepSpeed launcher (gloo);
ZeRO stages 1 and 2; two "nodes" on one machine (torchrun's c10d rendezvous, DeepSpeed's hostfile
without ssh); resuming under another number of processes. Runs compared across process counts
pin fp32: bf16 rounds a half batch's matmuls differently from a whole one's (~1e-4 in the loss)."""

from __future__ import annotations

import contextlib
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


FP32 = ["--set", 'train.precision="fp32"']


def test_two_processes_match_one(tmp_path):
    # `final` targets hold no randomness, so one process with the global batch and two with half
    # of it each must compute the same loss (reveal_path draws its paths per rank).
    recipe = tiny_recipe(tmp_path, targets="final", steps=6, extra="\n[halting]\nname = \"fixed\"\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    # A free port: the launcher's default 29500 may be taken by another run on the machine.
    two = _launch([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "two"), *FP32], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _launch([sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "one"), *FP32], tmp_path)
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


# ------------------------------------------------------------------ ZeRO, nodes, resuming (slow)

FIXED = "\n[halting]\nname = \"fixed\"\n"


def _ids(run: Path, step: int, rank: int) -> list[int]:
    """The example ids in rank `rank`'s slots at checkpoint step_`step`."""
    state = torch.load(run / "checkpoints" / f"step_{step}" / f"dis_rank{rank}.pt", weights_only=False)
    return state["carry"]["batch"]["example_ids"].tolist()


def _together(*commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start the commands at once (the processes of one run) and wait for all of them. Their
    output goes to files: a full pipe would stall a process that the test is not reading."""
    env = subprocess_env(PYTHONPATH=str(ROOT))
    logs = [(cwd / f"together{i}.out", cwd / f"together{i}.err") for i in range(len(commands))]
    with contextlib.ExitStack() as files:
        procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=files.enter_context(out.open("w")),
                                  stderr=files.enter_context(err.open("w"))) for c, (out, err) in zip(commands, logs)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:  # one that failed leaves the other waiting for it at the rendezvous
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    return [subprocess.CompletedProcess(c, code, out.read_text(), err.read_text()) for c, code, (out, err) in zip(commands, codes, logs)]


def _torchrun_nodes(args: list[str]) -> list[list[str]]:
    """Two one-process "nodes" on this machine, meeting through torchrun's c10d rendezvous."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
            "--rdzv_id", "dis-test"]
    return [[torchrun, *rdzv, "-m", "dis_core.cli", *args] for _ in range(2)]


def _deepspeed_nodes(args: list[str], hostfile: Path) -> list[list[str]]:
    """Two one-process "nodes" on this machine through DeepSpeed's hostfile, without ssh."""
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    deepspeed, port = str(Path(sys.executable).with_name("deepspeed")), str(_free_port())
    return [[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1",
             "--master_port", port, "--module", "dis_core.tools.cli", *args] for n in (0, 1)]


@pytest.mark.slow
def test_zero_stages_1_and_2_give_the_losses_of_stage_0(tmp_path):
    recipe = tiny_recipe(tmp_path, targets="final", steps=6, extra=FIXED)
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    losses = {}
    for stage in (0, 1, 2):
        out = tmp_path / f"zero{stage}"
        res = _launch([deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dis_core.tools.cli", "run",
                       str(recipe), "--out", str(out), "--set", f"deepspeed.zero_optimization.stage={stage}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        losses[stage] = _train_losses(out)
        partitions = sorted(p.name for p in (out / "checkpoints" / "step_6").glob("zero_pp_rank_*_optim_states.pt"))
        assert len(partitions) == (2 if stage else 0)  # the optimizer state is partitioned over the 2 processes
    assert len(losses[0]) == 6
    # Bit-identical in every run so far (fp32 master weights either way, a sum of two gradients); rounding allowed.
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    assert losses[2] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    # DeepSpeed cannot repartition ZeRO optimizer states for another process count: a clear refusal.
    res = _launch([sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--out", str(tmp_path / "zero1"), "--resume",
                   "--set", "deepspeed.zero_optimization.stage=1", "--set", "train.steps=8"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "written by 2 process(es) with ZeRO stage 1" in res.stderr and "Resume with 2 process(es)" in res.stderr


@pytest.mark.slow
def test_two_nodes_train_as_one_process_and_resume_across_process_counts(tmp_path):
    recipe = tiny_recipe(tmp_path, targets="final", steps=8, extra=FIXED)
    common = ["--data-dir", str(tmp_path / "data"), "--set", "train.checkpoint_interval=4", *FP32]
    one = [sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe)]

    def run(commands, out: Path, *extra: str) -> None:
        for res in _together(*commands(["run", str(recipe), "--out", str(out), *common, *extra]), cwd=tmp_path):
            assert res.returncode == 0, res.stderr[-3000:]

    def alone(out: Path, *extra: str) -> None:
        res = _launch([*one, "--out", str(out), *common, *extra], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]

    alone(tmp_path / "ref")  # one process, 8 steps
    reference = _train_losses(tmp_path / "ref")
    assert len(reference) == 8

    # Two nodes of one process each (torchrun), 4 steps, then one process resumes them (2 -> 1).
    run(_torchrun_nodes, tmp_path / "nodes", "--set", "train.steps=4")
    assert json.loads((tmp_path / "nodes" / "run.json").read_text())["world_size"] == 2
    # The data is sharded by the global rank (each node's local rank is 0): the two ranks' slots
    # hold the one process's examples, in its order.
    assert _ids(tmp_path / "nodes", 4, 0) + _ids(tmp_path / "nodes", 4, 1) == _ids(tmp_path / "ref", 4, 0)
    alone(tmp_path / "nodes", "--resume")
    assert _train_losses(tmp_path / "nodes") == pytest.approx(reference, rel=1e-6, abs=1e-7)

    # One process, 4 steps, then two nodes resume it (1 -> 2), through DeepSpeed's hostfile.
    alone(tmp_path / "grown", "--set", "train.steps=4")
    run(lambda args: _deepspeed_nodes(args, tmp_path / "hostfile"), tmp_path / "grown", "--resume")
    assert json.loads((tmp_path / "grown" / "run.json").read_text())["world_size"] == 2
    assert _train_losses(tmp_path / "grown") == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert _ids(tmp_path / "grown", 8, 0) + _ids(tmp_path / "grown", 8, 1) == _ids(tmp_path / "ref", 8, 0)


# ------------------------------------------------------------------ resharding, without processes


def _rank_files(ckpt: Path, world: int, *, global_batch: int = 8, taken: tuple[int, ...] | None = None) -> None:
    """Rank files as `TrainState.per_rank` writes them; slot i of the global batch holds example i."""
    ckpt.mkdir(parents=True)
    share = global_batch // world
    for r in range(world):
        ids = torch.arange(r * share, (r + 1) * share)
        carry = {"state": (ids[:, None, None].float().expand(-1, 3, 2).clone(), -ids[:, None, None].float().expand(-1, 3, 2).clone()),
                 "steps": ids % 3, "halted": ids % 2 == 0, "batch": {"example_ids": ids, "inputs": ids[:, None].expand(-1, 5).clone()},
                 "targets": ids[:, None, None].expand(-1, 2, 5).clone(), "tokens": ids[:, None].expand(-1, 5).clone()}
        generator = torch.Generator().manual_seed(100 + r).get_state()
        torch.save({"carry": carry, "stream": {"taken": (taken or (2 * share,) * world)[r], "sampler": "examples"},
                    "generator": generator, "examples": 10 + r, "components": {"curriculum": {"rank": r}}},
                   ckpt / f"dis_rank{r}.pt")


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resharding_keeps_the_slots_in_stream_order(tmp_path, old, new):
    from dis_core.loop.reshard import rank_state, saved_world

    _rank_files(tmp_path / "step_4", old)
    assert saved_world(tmp_path / "step_4") == old
    mine = [rank_state(tmp_path / "step_4", r, new, 8) for r in range(new)]
    share = 8 // new
    for r, m in enumerate(mine):
        ids = torch.arange(r * share, (r + 1) * share)
        assert torch.equal(m["carry"]["batch"]["example_ids"], ids) and torch.equal(m["carry"]["tokens"][:, 0], ids)
        assert torch.equal(m["carry"]["state"][1][:, 0, 0], -ids.float()) and torch.equal(m["carry"]["steps"], ids % 3)
        assert m["stream"] == {"taken": 2 * share, "sampler": "examples"}  # two global batches read, as before
        assert m["components"] == {"curriculum": {"rank": r % old}}
    assert [m["examples"] for m in mine] == [sum(10 + r for r in range(old))] + [0] * (new - 1)  # the total is kept
    states = [bytes(m["generator"].numpy()) for m in mine]
    assert len(set(states)) == new  # every rank draws its own numbers
    for r in range(min(old, new)):  # a rank that existed keeps its generator
        assert states[r] == bytes(torch.Generator().manual_seed(100 + r).get_state().numpy())


def test_resharding_after_unequal_reads_skips_to_the_next_unread_global_batch(tmp_path):
    from dis_core.loop.reshard import rank_state

    _rank_files(tmp_path / "step_9", 2, taken=(13, 11))  # ACT: ranks refill at their own pace, 4 slots each
    # Rank 0 has begun global batch 3 (13 = 3 * 4 + 1): every new rank starts at batch 4, nothing is read twice.
    assert rank_state(tmp_path / "step_9", 0, 1, 8)["stream"]["taken"] == 4 * 8  # one process: 4 batches of 8
    assert [rank_state(tmp_path / "step_9", r, 4, 8)["stream"]["taken"] for r in range(4)] == [4 * 2] * 4


def test_a_checkpoint_missing_a_rank_file_is_not_resharded(tmp_path):
    from dis_core.contract.errors import CheckpointError
    from dis_core.loop.reshard import check_zero, rank_state

    _rank_files(tmp_path / "step_4", 2)
    (tmp_path / "step_4" / "dis_rank1.pt").unlink()  # looks written by 1 process, holds half the slots
    with pytest.raises(ValueError, match="hold 4 slots, not the run's global batch of 8"):
        rank_state(tmp_path / "step_4", 0, 2, 8)
    check_zero(tmp_path / "step_4", 1, 1)  # the same count: nothing to repartition
    check_zero(tmp_path / "step_4", 2, 0)  # stage 0: nothing partitioned
    with pytest.raises(CheckpointError, match="written by 1 process.*ZeRO stage 2.*Resume with 1 process"):
        check_zero(tmp_path / "step_4", 2, 2)
