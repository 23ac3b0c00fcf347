"""Halting strategies: `fixed` and TRM's learned `act` (docs/reference.md#act-halting-and-the-carry),
and how the supervision step pairs them with the backbone's q-head and logs their loss terms."""

import json
import math

import pytest
import torch

from dis_core.contract.interfaces import BuildContext, HaltingStrategy, TaskSpec
from dis_core.step.supervision import StepRule, SupervisedStep
from dis_plugins.halting import ACTConfig, FixedConfig, build_act, build_fixed

N_SUP = 6


def make_act(tmp_path, **kw):
    return build_act(ACTConfig(**kw), BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path))


def q(halt, cont, n):
    return torch.tensor([[halt, cont]] * n, dtype=torch.float32)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_fixed(tmp_path):
    h = build_fixed(FixedConfig(), BuildContext(seed=0, n_sup=3, data_dir=tmp_path))
    assert isinstance(h, HaltingStrategy) and not h.uses_q_head and h.max_steps == 3
    steps = torch.tensor([1, 2, 3])
    for training in (True, False):
        assert h.halt(steps, q(9.0, 0.0, 3), training=training, generator=gen()).tolist() == [False, False, True]
    assert h.loss(q(1.0, 0.0, 3), torch.ones(3, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]


def test_act_protocol(tmp_path):
    h = make_act(tmp_path)
    assert isinstance(h, HaltingStrategy) and h.uses_q_head and h.max_steps == N_SUP
    assert not h.uses_continue_loss and make_act(tmp_path, continue_loss=True).uses_continue_loss
    with pytest.raises(ValueError):
        ACTConfig(exploration_prob=1.5)


def test_q_rules_in_training_without_exploration(tmp_path):
    qs = torch.tensor([[1.0, 2.0], [1.0, 0.5], [-1.0, -2.0], [-1.0, 3.0]])
    steps = torch.ones(4, dtype=torch.long)
    by_sign = make_act(tmp_path, exploration_prob=0.0)
    by_cont = make_act(tmp_path, exploration_prob=0.0, halt_on_q_continue=True)
    assert by_sign.halt(steps, qs, training=True, generator=gen()).tolist() == [True, True, False, False]
    assert by_cont.halt(steps, qs, training=True, generator=gen()).tolist() == [False, True, True, False]
    # Whatever q says, the last step halts.
    assert by_sign.halt(torch.full((4,), N_SUP), qs, training=True, generator=gen()).all()


def test_exploration_only_delays_and_never_passes_max(tmp_path):
    h = make_act(tmp_path, exploration_prob=1.0)  # every slot draws min_halt ~ U{2..N_SUP}
    n, g = 4000, gen(1)
    wants_halt = q(10.0, 0.0, n)
    fractions = []
    for s in range(1, N_SUP + 1):
        halted = h.halt(torch.full((n,), s), wants_halt, training=True, generator=g)
        fractions.append(halted.float().mean().item())
    assert fractions[0] == 0.0  # min_halt >= 2: never halts at step 1 while exploring
    assert fractions[-1] == 1.0  # min_halt <= max: everyone halts at the last step
    for s in range(2, N_SUP):  # P(min_halt <= s) = (s - 1) / (N_SUP - 1)
        assert abs(fractions[s - 1] - (s - 1) / (N_SUP - 1)) < 0.04
    # Exploration never forces a halt the Q-head does not want.
    never = h.halt(torch.full((n,), N_SUP - 1), q(-10.0, 0.0, n), training=True, generator=g)
    assert not never.any()


def test_exploration_rate_and_reproducibility(tmp_path):
    h = make_act(tmp_path)  # 10% of slots explore
    n = 20000
    halted = h.halt(torch.ones(n, dtype=torch.long), q(10.0, 0.0, n), training=True, generator=gen(3))
    assert abs((~halted).float().mean().item() - 0.1) < 0.01  # exploring slots cannot halt at step 1
    again = h.halt(torch.ones(n, dtype=torch.long), q(10.0, 0.0, n), training=True, generator=gen(3))
    assert torch.equal(halted, again)


def test_evaluation_runs_exactly_max_steps(tmp_path):
    def eval_steps(h):
        steps = torch.zeros(5, dtype=torch.long)
        done = torch.zeros(5, dtype=torch.bool)
        while not done.all():
            steps = torch.where(done, steps, steps + 1)
            done |= h.halt(steps, q(10.0, -10.0, 5), training=False, generator=gen())
        return steps.tolist()

    assert eval_steps(make_act(tmp_path)) == [N_SUP] * 5  # the head is ignored (TRM issue #64)
    assert eval_steps(make_act(tmp_path, honour_head_at_eval=True)) == [1] * 5


def bce(x, y):
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_halt_loss_values(tmp_path):
    h = make_act(tmp_path)
    qs = torch.tensor([[2.0, 0.0], [-1.0, 5.0], [0.0, 0.0]])
    correct = torch.tensor([True, True, False])
    loss = h.loss(qs, correct)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    want = [0.5 * bce(2.0, 1), 0.5 * bce(-1.0, 1), 0.5 * bce(0.0, 0)]
    torch.testing.assert_close(loss, torch.tensor(want))
    assert make_act(tmp_path, q_loss_weight=1.0).loss(qs, correct)[0].item() == pytest.approx(bce(2.0, 1))


def test_continue_loss_target(tmp_path):
    h = make_act(tmp_path, continue_loss=True, halt_on_q_continue=True)
    qs = torch.tensor([[0.0, 1.0], [0.0, -2.0]], requires_grad=True)
    next_q = torch.tensor([[-1.0, 3.0], [-1.0, 3.0]])
    is_last = torch.tensor([False, True])
    loss = h.continue_loss(qs, next_q, is_last)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # Not last: target sigmoid(max(q_halt', q_cont')) = sigmoid(3); last: sigmoid(q_halt') = sigmoid(-1).
    want = [0.5 * bce(1.0, sig(3.0)), 0.5 * bce(-2.0, sig(-1.0))]
    torch.testing.assert_close(loss, torch.tensor(want))
    loss.sum().backward()
    assert qs.grad[:, 0].abs().sum() == 0 and qs.grad[:, 1].abs().sum() > 0  # only q_continue is trained


# ------------------------------------------------------------------ the step pairs the strategy with the backbone's head


def tiny_trm(tmp_path):
    from dis_plugins.backbones.trm import TRMConfig, build_trm

    spec = TaskSpec(vocab_size=3, seq_len=4)
    return build_trm(TRMConfig(hidden_size=16, num_layers=1, num_heads=2, expansion=2.0),
                     BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, spec=spec))


def test_the_step_freezes_a_q_head_its_halting_does_not_use(tmp_path):
    """DeepSpeed would give an unused head zero gradients and AdamW would decay it; the reference
    leaves it untouched. The step, which owns backbone and halting, freezes it."""
    fixed = build_fixed(FixedConfig(), BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path))
    backbone = tiny_trm(tmp_path)
    unused = SupervisedStep(backbone, fixed, StepRule(n_sup=N_SUP))
    frozen = [p for p in unused.parameters() if not p.requires_grad]
    head = list(backbone.q_head.parameters())  # the `q_head` module of the HaltingHead Protocol
    assert head and len(frozen) == len(head) and all(any(p is q for q in head) for p in frozen)
    trained_head = build_fixed(FixedConfig(q_head=True), BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path))
    for halting in (make_act(tmp_path), trained_head):
        assert all(p.requires_grad for p in SupervisedStep(tiny_trm(tmp_path), halting, StepRule(n_sup=N_SUP)).parameters())


def test_each_loss_term_is_logged_as_the_total_is(tmp_path, registry):
    """`act` with HRM's Q-continue loss: train/loss_ce, train/loss_halt and train/loss_continue
    are per-slot means like train/loss, and add up to it."""
    from conftest import tiny_recipe

    from dis_core.wiring.recipe import load_recipe
    from dis_core.loop.trainer import Trainer

    path = tiny_recipe(tmp_path, steps=4, extra='[halting]\nname = "act"\nconfig = { continue_loss = true }\n')
    Trainer(load_recipe(path, registry), registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4
    for r in train:
        terms = {k: v for k, v in r.items() if k.startswith("train/loss_")}
        assert set(terms) == {"train/loss_ce", "train/loss_halt", "train/loss_continue"}
        assert all(v > 0 for v in terms.values())
        assert sum(terms.values()) == pytest.approx(r["train/loss"], rel=1e-5)
