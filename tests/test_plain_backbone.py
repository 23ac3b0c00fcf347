"""A plain third-party Transformer backbone, written as a plugin author would write it: the TRM
attention, SwiGLU, RMSNorm and RoPE reused from `dis_plugins.backbones.layers`, one pass per
supervision step, no q-head and no state carried between steps (none invented either). It trains
with fixed halting and DIS targets, evaluates and passes `dis check`; the carry carries whatever a
backbone returns (None, a tensor, a tuple)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import attrs
import pytest
import torch
from torch import nn

from dis_core import hookimpl
from dis_core.contract.errors import CapabilityError, PluginError
from dis_core.tools.kit import check_recipe, format_rows
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_core.step.supervision import Carry, StepIn, StepOut, StepRule, SupervisedStep, TrainStats, rollout
from dis_core.loop.trainer import Trainer
from dis_plugins.backbones.layers import Block, InputEmbedding, Linear, Rotary, block_flops
from dis_plugins.halting import FixedHalting

# ------------------------------------------------------------------ the plugin


@attrs.frozen(kw_only=True)
class PlainConfig:
    hidden_size: int = 32  # D
    num_heads: int = 2
    num_layers: int = 2


class PlainTransformer(nn.Module):
    """Post-norm Transformer blocks over the step's tokens (the question, then the previous answer
    under DIS's step input): nothing is carried from one supervision step to the next."""

    prefix_len = puzzle_emb_ndim = 0  # no puzzle embedding: S = L

    def __init__(self, config: PlainConfig, vocab_size: int, seq_len: int):
        super().__init__()
        D = self.hidden_size = config.hidden_size
        self.embed = InputEmbedding(vocab_size, D, seq_len, prefix_len=0, puzzle_emb_ndim=0, pos_encodings="none", step_rows=0)
        self.rotary = Rotary(D // config.num_heads, seq_len)
        self.blocks = nn.ModuleList(Block(D, config.num_heads, 2.0, seq_len) for _ in range(config.num_layers))
        self.lm_head = Linear(D, vocab_size)
        self.states_seen = []  # for the test: what the core handed forward

    def initial_state(self, batch_size):
        return None  # nothing to carry

    def forward(self, state, tokens, step, puzzle_emb=None):
        self.states_seen.append(state)
        h = self.embed(tokens, step, puzzle_emb)  # (B, L, D)
        rotary = self.rotary.cos_sin(h.device)
        for block in self.blocks:
            h = block(h, rotary)
        return None, self.lm_head(h), None  # no state, logits (B, L, V), no q-logits

    def calls_per_step(self):
        return 1, 1

    def flops_per_call(self, seq_len):
        return len(self.blocks) * block_flops(seq_len, self.hidden_size, 2.0)


class PlainPlugin:
    __name__ = "plain_transformer"  # the plugin's label in messages

    def __init__(self):
        self.built: list[PlainTransformer] = []

    def build(self, config: PlainConfig, ctx) -> PlainTransformer:
        """A plain post-norm Transformer, one pass per supervision step."""
        self.built.append(PlainTransformer(config, ctx.spec.vocab_size, ctx.spec.seq_len))
        return self.built[-1]

    @hookimpl
    def register_backbones(self, register):
        register("plain", PlainConfig, self.build)


# ------------------------------------------------------------------ a tiny N-Queens recipe

RECIPE = """
[task]
name = "nqueens"
config = { board_size = 5, num_train = 40, num_test = 12 }
[backbone]
name = "plain"
[targets]
name = "reveal_path"
[halting]
name = "fixed"
[supervision]
n_sup = 3
[[evaluators]]
name = "nqueens"
[train]
seed = 0
global_batch_size = 8
steps = 6
log_interval = 1
threads = 1
[train.optimizer]
name = "adamw"
config = { lr = 1e-3 }
"""


@pytest.fixture
def plain(tmp_path):
    plugin = PlainPlugin()
    registry = load_registry(extra_plugins=(plugin,))
    path = tmp_path / "plain.toml"
    path.write_text(RECIPE)
    return plugin, registry, path


def test_it_trains_and_evaluates_with_fixed_halting_and_dis_targets(plain, tmp_path):
    plugin, registry, path = plain
    trainer = Trainer(load_recipe(path, registry), registry, tmp_path / "run", data_dir=tmp_path / "data")
    (net,) = plugin.built
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary = trainer.fit(registry)
    # trained: every parameter moved; forward only ever received None, no state the core made up
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(net.states_seen) >= 6 and all(s is None for s in net.states_seen)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:  # the token loss is the only term: no halting head, no extra loss
        assert {k for k in r if k.startswith("train/loss")} == {"train/loss", "train/loss_ce"}
        assert r["train/loss_ce"] == pytest.approx(r["train/loss"], rel=1e-6) and r["train/loss"] > 0
    # evaluated: every test board ran the 3 steps of fixed halting and was scored
    assert summary["diagnostics/mean_steps"] == 3 and summary["nqueens/count"] == 12
    assert 0.0 <= summary["nqueens/valid_solution_rate"] <= 1.0


def test_dis_check_passes_it(plain, tmp_path):
    plugin, registry, path = plain
    rows = check_recipe(load_recipe(path, registry), registry, data_dir=tmp_path / "data")
    assert all(r.ok for r in rows), format_rows(rows)
    assert ("backbone", "plain", "plain_transformer") in [(r.kind, r.name, r.plugin) for r in rows]


def test_a_halting_strategy_that_reads_a_q_head_is_refused_before_training(plain, tmp_path):
    plugin, registry, path = plain
    resolved = load_recipe(path, registry, ["halting.name=act"])
    with pytest.raises(CapabilityError, match=r"halting strategy ACTHalting uses a q-head .* backbone PlainTransformer has none"):
        Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    assert all(len(net.states_seen) == 0 for net in plugin.built)


# ------------------------------------------------------------------ the carry holds any state


class Starts:
    """A backbone's `initial_state` only, for the carry."""

    def __init__(self, kind: str):
        self.kind = kind

    def initial_state(self, batch_size):
        y = torch.full((batch_size, 5, 4), 0.5)
        return {"none": None, "tensor": y, "pair": (y, torch.full((batch_size, 5, 2), -0.5))}[self.kind]


@pytest.mark.parametrize("kind", ["none", "tensor", "pair"])
def test_the_carry_carries_what_the_backbone_returns(kind):
    B, L, N = 4, 3, 2
    backbone, rule = Starts(kind), StepRule(n_sup=N)
    carry = Carry.empty(backbone, B, L, N, torch.device("cpu"))
    batch = {"inputs": torch.ones(B, L, dtype=torch.long), "labels": torch.zeros(B, L, dtype=torch.long)}
    carry.refill(torch.arange(B), batch, torch.zeros(B, N, L, dtype=torch.long), backbone.initial_state(B))
    halves = [carry.step_in(rule, None, slice(0, 2)), carry.step_in(rule, None, slice(2, 4))]
    tensors = lambda s: () if s is None else (s,) if torch.is_tensor(s) else s  # noqa: E731
    assert [tuple(t.shape) for t in tensors(halves[0].state)] == [(2, *t.shape[1:]) for t in tensors(carry.state)]
    # a step's micro-batches as one output, whose new state the carry keeps, detached
    new = lambda s: None if s is None else (s + 1).requires_grad_() if torch.is_tensor(s) else tuple((t + 1).requires_grad_() for t in s)  # noqa: E731
    outs = [StepOut(state=new(h.state), logits=torch.zeros(2, L, 3), q=None, loss=torch.tensor(0.0), ce=torch.zeros(2),
                    losses={"ce": torch.zeros(2)}) for h in halves]
    carry.advance(StepOut.cat(outs), rule, FixedHalting(N), generator=None)
    assert carry.steps.tolist() == [1] * B and not carry.halted.any()
    kept = tensors(carry.state)
    assert len(kept) == {"none": 0, "tensor": 1, "pair": 2}[kind]
    assert all(t.shape[0] == B and not t.requires_grad for t in kept)
    assert all(torch.equal(t, s + 1) for t, s in zip(kept, tensors(backbone.initial_state(B))))
    # refilling two slots resets only their rows
    carry.refill(torch.tensor([1, 3]), {k: v[:2] for k, v in batch.items()}, torch.zeros(2, N, L, dtype=torch.long), backbone.initial_state(2))
    start = tensors(backbone.initial_state(B))
    for t, s in zip(tensors(carry.state), start):
        assert torch.equal(t[[1, 3]], s[[1, 3]]) and torch.equal(t[[0, 2]], s[[0, 2]] + 1)
    # through a checkpoint and back
    again = Carry.from_state_dict(carry.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(tensors(again.state), tensors(carry.state)))


def test_a_checkpoint_written_with_y_and_z_loads():
    """Checkpoints written before the state was generic hold the carry's `y` and `z`."""
    B, L, N = 2, 3, 2
    y, z = torch.randn(B, 5, 4), torch.randn(B, 5, 4)
    old = {"y": y, "z": z, "steps": torch.ones(B, dtype=torch.long), "halted": torch.zeros(B, dtype=torch.bool),
           "batch": {}, "targets": torch.zeros(B, N, L, dtype=torch.long), "tokens": torch.zeros(B, L, dtype=torch.long)}
    carry = Carry.from_state_dict(old)
    assert isinstance(carry.state, tuple) and carry.state[0] is y and carry.state[1] is z
    assert "y" not in carry.state_dict() and carry.state_dict()["state"] == (y, z)


# ------------------------------------------------------------------ a backbone's own loss terms


class WithExtra(nn.Module):
    """One linear layer and an extra per-slot loss of the backbone's own, named `name`."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.lm_head = name, nn.Linear(1, 3)

    def forward(self, state, tokens, step, puzzle_emb=None):
        logits = self.lm_head(tokens[..., None].float())  # (B, L, 3)
        return None, logits, None, {self.name: logits.square().mean((1, 2))}


def test_a_backbone_extra_loss_is_a_term_of_its_own():
    B, L = 4, 5
    x = StepIn(state=None, tokens=torch.randint(0, 3, (B, L)), step=torch.ones(B, dtype=torch.long),
               targets=torch.randint(0, 3, (B, L)), labels=torch.randint(0, 3, (B, L)))
    step = SupervisedStep(WithExtra("logit_norm"), FixedHalting(2), StepRule(n_sup=2))
    out = step(x)
    assert set(out.losses) == {"ce", "logit_norm"}
    torch.testing.assert_close(out.loss, (out.losses["ce"] + out.losses["logit_norm"]).mean())
    out.loss.backward()  # the extra term trains the backbone like the token loss
    stats = TrainStats()
    carry = SimpleNamespace(halted=torch.ones(B, dtype=torch.bool), steps=torch.ones(B), batch={"labels": x.labels})
    stats.add(out, carry)
    stats.add(out, carry)
    row = stats.reduce(lambda t: 2 * t)  # two ranks that saw the same
    assert row["train/loss_logit_norm"] == pytest.approx(out.losses["logit_norm"].mean().item(), rel=1e-6)
    assert row["train/loss_ce"] + row["train/loss_logit_norm"] == pytest.approx(row["train/loss"], rel=1e-6)
    with pytest.raises(PluginError, match=r"extra losses named \['halt'\]"):
        SupervisedStep(WithExtra("halt"), FixedHalting(2), StepRule(n_sup=2))(x)


class Counter(nn.Module):
    """A state of one tensor, (B, 1): the steps run so far; the answer is that count in every cell."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, 1)

    def forward(self, state, tokens, step, puzzle_emb=None):
        count = state + 1  # (B, 1)
        logits = -(torch.arange(5.0) - count[:, None, :]).abs() * self.scale  # (B, 1, 5): peaks at the count
        return count, logits.expand(-1, tokens.shape[1], -1), None


def test_a_rollout_carries_a_single_tensor_state_from_step_to_step():
    batch = {"inputs": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)}
    out = rollout(Counter(), batch, StepRule(n_sup=4), FixedHalting(4), puzzle_emb=None)
    assert out.preds[:, :, 0].tolist() == [[1, 2, 3, 4]] * 2 and out.steps.tolist() == [4, 4]
    assert out.q_halt.tolist() == [0.0, 0.0]  # no q-head: nothing to report
