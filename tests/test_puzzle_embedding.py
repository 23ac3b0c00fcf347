"""PuzzleEmbedding: leaf rows in training, sign-SGD with decoupled decay, identical tables across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dis_core.step.puzzle_embedding import PuzzleEmbedding

NUM_IDS, DIM, LR, WD = 10, 4, 0.1, 0.5
RANK_IDS = [torch.tensor([1, 3, 3, 7]), torch.tensor([3, 5, 0])]  # id 3 is on both ranks


def _init_table() -> PuzzleEmbedding:
    emb = PuzzleEmbedding(NUM_IDS, DIM)
    emb.weights.copy_(torch.arange(NUM_IDS * DIM, dtype=torch.float32).reshape(NUM_IDS, DIM) / 7 - 2)
    return emb


def _coef(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, DIM, generator=g)


def _train_step(emb: PuzzleEmbedding, ids_list: list[torch.Tensor], coefs: list[torch.Tensor]) -> None:
    emb.train()
    for ids, coef in zip(ids_list, coefs):
        (emb(ids) * coef).sum().backward()
    emb.step(LR, WD)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        emb = _init_table()
        ids = RANK_IDS[rank]
        _train_step(emb, [ids], [_coef(rank, len(ids))])
        torch.save(emb.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_forward_training_gives_leaf_rows_and_eval_plain_lookup():
    emb = _init_table()
    ids = torch.tensor([2, 2, 5])
    out = emb(ids)
    assert out.is_leaf and out.requires_grad and torch.equal(out, emb.weights[ids])
    emb.eval()
    out = emb(ids)
    assert not out.requires_grad and torch.equal(out, emb.weights[ids])
    assert list(emb.parameters()) == [] and "weights" in emb.state_dict()
    assert emb.memory_bytes() == NUM_IDS * DIM * 4 + 3 * DIM * 4 * 2  # table + one pending batch (rows and grads)


def test_step_sums_duplicates_then_sign_sgd_with_decay_only_on_batch_rows():
    emb = _init_table()
    before = emb.weights.clone()
    ids = torch.tensor([1, 3, 3])
    coef = torch.tensor([[1.0, -1, 0, 2], [1, 1, 1, 1], [-3, 1, 0, -2]])
    _train_step(emb, [ids], [coef])
    want = before.clone()
    want[1] = before[1] * (1 - LR * WD) - LR * torch.sign(coef[0])
    want[3] = before[3] * (1 - LR * WD) - LR * torch.sign(coef[1] + coef[2])  # sign of the *sum*: [-1, 1, 1, -1]
    torch.testing.assert_close(emb.weights, want)
    assert torch.equal(emb.weights[[0, 2, 4]], before[[0, 2, 4]])  # untouched rows keep their values, no decay
    # The step consumed the batch's rows: another step without a forward changes nothing.
    assert emb.pending_rows() == [] and emb.memory_bytes() == NUM_IDS * DIM * 4
    after = emb.weights.clone()
    emb.step(LR, WD)
    assert torch.equal(emb.weights, after)


def test_two_forwards_before_one_step_accumulate():
    a, b = _init_table(), _init_table()
    ids = torch.tensor([4, 6])
    c1, c2 = _coef(0, 2), _coef(1, 2)
    _train_step(a, [ids, ids], [c1, c2])
    _train_step(b, [torch.cat([ids, ids])], [torch.cat([c1, c2])])
    torch.testing.assert_close(a.weights, b.weights)


def test_two_processes_update_identically_and_match_one_process_over_the_union(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "rdv"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    t0 = torch.load(tmp_path / "rank0.pt")["weights"]
    t1 = torch.load(tmp_path / "rank1.pt")["weights"]
    assert torch.equal(t0, t1)
    single = _init_table()
    _train_step(single, [torch.cat(RANK_IDS)], [torch.cat([_coef(r, len(i)) for r, i in enumerate(RANK_IDS)])])
    torch.testing.assert_close(t0, single.weights)
    assert not torch.equal(t0, _init_table().weights)


@pytest.mark.parametrize("bad", [(0, 4), (4, 0)])
def test_rejects_empty_tables(bad):
    with pytest.raises(ValueError):
        PuzzleEmbedding(*bad)
