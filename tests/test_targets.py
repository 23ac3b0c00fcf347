"""Target generators: reveal_path (official DIS), mask / random_replace (paper), final (TRM)."""

from __future__ import annotations

import pytest
import torch

from dis_core.contract.errors import UserError
from dis_core.contract.interfaces import IGNORE, BuildContext, TaskSpec
from dis_plugins.targets import (
    FinalConfig,
    MaskConfig,
    RandomReplaceConfig,
    RevealPathConfig,
    build_final,
    build_mask,
    build_random_replace,
    build_reveal_path,
)

V = 6
SPEC = TaskSpec(vocab_size=V, seq_len=40, pad_id=0)


def ctx(tmp_path, spec=SPEC, n_sup=6):
    return BuildContext(seed=0, n_sup=n_sup, data_dir=tmp_path, spec=spec)


def make_batch(b=8, length=40, seed=0, pad_tail=True):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, V, (b, length), generator=g)
    labels = inputs.clone()
    change = torch.rand(b, length, generator=g) < 0.4
    labels[change] = torch.randint(1, V, (int(change.sum()),), generator=g)
    if pad_tail:  # output padding: the last cells of some rows are unsupervised
        labels[::2, -7:] = IGNORE
    return {"inputs": inputs, "labels": labels}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def hamming(frames, labels):
    sup = labels != IGNORE
    return ((frames != labels[:, None, :]) & sup[:, None, :]).sum(-1)  # (B, N)


# ----------------------------------------------------------------------------- reveal_path


def test_reveal_path_frames_end_at_labels_and_count_reveals(tmp_path):
    batch, n = make_batch(), 6
    t = build_reveal_path(RevealPathConfig(), ctx(tmp_path))
    out = t(batch, n, gen(1))
    assert out.shape == (8, n, 40) and out.dtype == torch.int64 and t.monotone
    assert torch.equal(out[:, -1], batch["labels"])
    x, y = batch["inputs"], batch["labels"]
    diff = x != y
    n_diff = diff.sum(-1)
    for s in range(1, n + 1):
        shown = (out[:, s - 1] == y) & diff  # differing cells showing the label
        assert torch.equal(shown.sum(-1), (s * n_diff) // n)
        # every cell shows either its input or its label
        assert ((out[:, s - 1] == x) | (out[:, s - 1] == y)).all()


def test_reveal_path_is_nested(tmp_path):
    batch = make_batch(seed=3)
    out = build_reveal_path(RevealPathConfig(), ctx(tmp_path))(batch, 5, gen(2))
    shown = (out == batch["labels"][:, None]) & (batch["inputs"] != batch["labels"])[:, None]  # (B, N, L)
    assert (shown[:, 1:] >= shown[:, :-1]).all()  # once revealed, stays revealed
    assert (hamming(out[:, 1:], batch["labels"]) <= hamming(out[:, :-1], batch["labels"])).all()


def test_reveal_path_ignore_handling(tmp_path):
    batch = make_batch(seed=4)
    out = build_reveal_path(RevealPathConfig(), ctx(tmp_path))(batch, 4, gen(0))
    pad = batch["labels"] == IGNORE  # (B, L)
    assert pad.any()
    # a padding cell's target is its input token until revealed, then IGNORE; never anything else
    for s in range(4):
        f = out[:, s]
        assert ((f[pad] == IGNORE) | (f[pad] == batch["inputs"][pad])).all()
    assert (out[:, 0][pad] != IGNORE).any()  # early frames still supervise padding cells
    assert (out[:, -1][pad] == IGNORE).all()


def test_reveal_path_deterministic_for_a_seed(tmp_path):
    batch, t = make_batch(seed=5), build_reveal_path(RevealPathConfig(), ctx(tmp_path))
    assert torch.equal(t(batch, 6, gen(7)), t(batch, 6, gen(7)))
    assert not torch.equal(t(batch, 6, gen(7)), t(batch, 6, gen(8)))


# ----------------------------------------------------------------------------- mask / random_replace


@pytest.mark.parametrize("which", ["mask", "random_replace"])
def test_corruption_is_monotone_and_ends_at_labels(tmp_path, which):
    batch, n = make_batch(b=16, seed=6), 6
    t = build_mask(MaskConfig(), ctx(tmp_path)) if which == "mask" else build_random_replace(RandomReplaceConfig(), ctx(tmp_path))
    out = t(batch, n, gen(3))
    assert out.shape == (16, n, 40) and t.monotone
    assert torch.equal(out[:, -1], batch["labels"])
    d = hamming(out, batch["labels"])
    assert (d[:, 1:] <= d[:, :-1]).all()
    assert (d[:, 0] > 0).all()
    pad = batch["labels"] == IGNORE
    assert (out.permute(0, 2, 1)[pad] == IGNORE).all()  # unsupervised stays unsupervised
    assert torch.equal(t(batch, n, gen(3)), out)


def test_mask_rate_follows_linear_schedule(tmp_path):
    batch, n = make_batch(b=64, length=100, seed=7, pad_tail=False), 4
    out = build_mask(MaskConfig(), ctx(tmp_path))(batch, n, gen(4))
    masked = (out == 0).float().mean(dim=(0, 2))  # pad_id 0 is the default mask token
    expected = torch.tensor([1 - s / n for s in range(1, n + 1)])
    assert torch.allclose(masked, expected, atol=0.03)
    # nested: a cell unmasked at step s is unmasked at every later step
    m = out == 0
    assert (m[:, 1:] <= m[:, :-1]).all()


def test_mask_keep_clues_and_token(tmp_path):
    batch = make_batch(b=16, seed=8, pad_tail=False)
    out = build_mask(MaskConfig(keep_clues=True, mask_token=5), ctx(tmp_path))(batch, 4, gen(5))
    clue = batch["inputs"] == batch["labels"]
    assert (out.permute(0, 2, 1)[clue] == batch["labels"][clue][:, None]).all()
    assert (out[:, 0][~clue] == 5).any()
    with pytest.raises(UserError, match="outside the vocabulary"):
        build_mask(MaskConfig(mask_token=V), ctx(tmp_path))


def test_random_replace_token_range(tmp_path):
    batch = make_batch(b=32, seed=9, pad_tail=False)
    out = build_random_replace(RandomReplaceConfig(low=2, high=3), ctx(tmp_path))(batch, 5, gen(6))
    changed = out != batch["labels"][:, None]
    assert changed.any() and ((out[changed] >= 2) & (out[changed] <= 3)).all()
    # default range: every token but PAD
    out = build_random_replace(RandomReplaceConfig(), ctx(tmp_path))(batch, 5, gen(6))
    assert (out != 0).all()
    with pytest.raises(UserError):
        build_random_replace(RandomReplaceConfig(low=4, high=2), ctx(tmp_path))


def test_cosine_schedule_ends_at_labels(tmp_path):
    batch = make_batch(b=16, seed=10)
    out = build_mask(MaskConfig(schedule="cosine"), ctx(tmp_path))(batch, 3, gen(1))
    assert torch.equal(out[:, -1], batch["labels"])


# ----------------------------------------------------------------------------- final


def test_final_repeats_labels(tmp_path):
    batch = make_batch(seed=11)
    out = build_final(FinalConfig(), ctx(tmp_path))(batch, 3, gen(0))
    assert out.shape == (8, 3, 40)
    for s in range(3):
        assert torch.equal(out[:, s], batch["labels"])
