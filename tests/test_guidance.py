"""The paper's analysis tools in the shared rollout: guidance scale w (Eq. 5), the Advantage
Margin (Prop. 4.1), and `fixed`'s adaptive stopping at evaluation (the paper's future work)."""

import pytest
import torch

from dis_core.contract.interfaces import IGNORE, BuildContext
from dis_core.step.guidance import Answer, advantage_margin
from dis_core.step.supervision import StepRule, rollout
from dis_plugins.backbones.hrm import HRM, HRMConfig
from dis_plugins.backbones.trm import TRM, TRMConfig
from dis_plugins.halting import ACTConfig, FixedConfig, build_act, build_fixed

V, L, N = 4, 9, 4


def trm(T=1, seed=0):
    torch.manual_seed(seed)
    cfg = TRMConfig(hidden_size=16, num_layers=1, num_heads=2, expansion=2.0, T=T, n=2, step_embedding=True)
    return TRM(cfg, vocab_size=V, seq_len=L, n_sup=N).eval()


def hrm(seed=0):
    torch.manual_seed(seed)
    cfg = HRMConfig(hidden_size=16, num_heads=2, expansion=2.0, H_layers=1, L_layers=1, T=2, n=2, step_embedding=True)
    return HRM(cfg, vocab_size=V, seq_len=L, n_sup=N).eval()


def batch(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = IGNORE
    return {"inputs": torch.randint(0, V, (B, L), generator=g), "labels": labels}


def fixed(tmp_path, **kw):
    return build_fixed(FixedConfig(**kw), BuildContext(seed=0, n_sup=N, data_dir=tmp_path))


def test_readouts_do_not_change_the_forward():
    for model in (trm(T=2), hrm()):
        x = batch()
        state = model.initial_state(6)
        step = torch.full((6,), 2)
        (y, z), logits, q = model(state, x["inputs"], step)
        (y2, z2), logits2, q2, before = model.forward_readouts(state, x["inputs"], step)
        assert torch.equal(logits, logits2) and torch.equal(y, y2) and torch.equal(z, z2) and torch.equal(q, q2)
        assert before.shape == logits.shape and not torch.equal(before, logits)
        assert torch.equal(model.decode(y), logits)


@pytest.mark.parametrize("readout", ["step", "cycle"])
@pytest.mark.parametrize("step_input", ["prediction", "question"])
def test_w1_is_the_plain_rollout_exactly(tmp_path, readout, step_input):
    model, x, rule = trm(T=2), batch(), StepRule(n_sup=N, step_input=step_input)
    plain = rollout(model, x, rule, fixed(tmp_path), puzzle_emb=None)
    guided = rollout(model, x, rule, fixed(tmp_path), puzzle_emb=None, guidance=1.0, readout=readout, margin=True)
    assert torch.equal(plain.preds, guided.preds) and torch.equal(plain.steps, guided.steps)
    assert torch.equal(plain.q_halt, guided.q_halt)
    assert plain.margin is None and guided.margin.shape == (6, N) and guided.cells.tolist()[:2] == [L - 3, L]


def _by_hand(model, x, rule, w, readout):
    """The guided rollout written out: answer = argmax((1-w) l_u + w l_c)."""
    y, z = model.initial_state(x["inputs"].shape[0])
    tokens, preds, l_prev = x["inputs"], [], model.decode(y)
    for s in range(1, N + 1):
        step = torch.full((len(tokens),), s)
        (y, z), l_c, _, before = model.forward_readouts((y, z), tokens, step)
        l_u = l_prev if readout == "step" else before
        l_prev = l_c
        pred = ((1 - w) * l_u + w * l_c).argmax(-1)
        preds.append(pred)
        tokens = rule.next_tokens(pred, x["inputs"])
    return torch.stack(preds, 1)


@pytest.mark.parametrize("readout", ["step", "cycle"])
def test_guided_answers_feed_the_next_step(tmp_path, readout):
    model, x, rule = trm(T=2), batch(), StepRule(n_sup=N)
    with torch.no_grad():
        for w in (0.0, 0.5, 1.5):
            out = rollout(model, x, rule, fixed(tmp_path), puzzle_emb=None, guidance=w, readout=readout)
            assert torch.equal(out.preds, _by_hand(model, x, rule, w, readout)), (w, readout)


def test_step_and_cycle_readouts_agree_at_T1_and_differ_at_T2(tmp_path):
    x, rule = batch(), StepRule(n_sup=N)
    for T, same in ((1, True), (2, False)):
        model = trm(T=T)
        a, b = (rollout(model, x, rule, fixed(tmp_path), puzzle_emb=None, readout=r, margin=True) for r in ("step", "cycle"))
        assert torch.equal(a.margin, b.margin) == same


def test_advantage_margin_is_minus_the_derivative_of_the_loss():
    """Prop. 4.1: dL/dw = E_{pi_w} delta - delta[y*] = -margin, with L(w) = -log softmax(l_w)[y*]."""
    g = torch.Generator().manual_seed(0)
    l_u, l_c = torch.randn(3, 5, V, generator=g), torch.randn(3, 5, V, generator=g)
    labels = torch.randint(0, V, (3, 5), generator=g)
    for w in (0.0, 0.7, 1.0, 2.0):
        wt = torch.tensor(w, requires_grad=True)
        l_w = l_u + wt * (l_c - l_u)
        loss = -torch.log_softmax(l_w, -1).gather(-1, labels[..., None]).sum()
        (grad,) = torch.autograd.grad(loss, wt)
        m = advantage_margin(l_u, l_c, l_w.detach(), labels)
        assert m.dtype == torch.float64 and torch.allclose(-m.sum().float(), grad, atol=1e-5)


def test_margin_counts_only_supervised_cells_of_steps_run(tmp_path):
    model, x = trm(), batch()
    out = rollout(model, x, StepRule(n_sup=N), fixed(tmp_path, eval_halt="stable", patience=1), puzzle_emb=None, margin=True)
    ran = torch.arange(N)[None, :] < out.steps[:, None]
    assert (out.margin_positive[~ran] == 0).all() and (out.margin[~ran] == 0).all() and (out.margin_negative[~ran] == 0).all()
    assert (out.margin_positive + out.margin_negative <= out.cells[:, None]).all()


# ------------------------------------------------------------------ adaptive stopping


def answer(unchanged, confidence):
    n = len(unchanged)
    return Answer(logits=torch.zeros(n, 1, V), confidence=torch.tensor(confidence), unchanged=torch.tensor(unchanged))


def test_fixed_rules_decide_only_at_evaluation(tmp_path):
    steps = torch.tensor([1, 2, 3, 4])
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    a = answer([0, 1, 2, 0], [0.5, 0.95, 0.8, 0.99])
    cases = {
        "none": dict(),
        "stable": dict(eval_halt="stable", patience=2),
        "confident": dict(eval_halt="confident", threshold=0.9),
        "q_head": dict(eval_halt="q_head", q_head=True),
    }
    expect = {"none": [0, 0, 0, 1], "stable": [0, 0, 1, 1], "confident": [0, 1, 0, 1], "q_head": [1, 0, 1, 1]}
    for name, kw in cases.items():
        h = fixed(tmp_path, **kw)
        assert h.halt(steps, q, training=True, generator=None, answer=a).tolist() == [False, False, False, True]
        assert h.halt(steps, q, training=False, generator=None, answer=a).int().tolist() == expect[name], name
    held = fixed(tmp_path, eval_halt="confident", threshold=0.9, min_steps=3)
    assert held.halt(steps, q, training=False, generator=None, answer=a).int().tolist() == [0, 0, 0, 1]


def test_fixed_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="q_head"):
        FixedConfig(eval_halt="q_head")
    with pytest.raises(ValueError, match="patience"):
        FixedConfig(patience=0)
    assert not fixed(tmp_path).uses_q_head and fixed(tmp_path, q_head=True).uses_q_head
    assert fixed(tmp_path, eval_halt="stable").uses_answer and not fixed(tmp_path, eval_halt="q_head", q_head=True).uses_answer
    h = fixed(tmp_path, q_head=True, q_loss_weight=1.0)
    loss = h.loss(torch.tensor([[0.0, 0.0]]), torch.tensor([True]))
    assert torch.allclose(loss, torch.tensor([0.6931472]))


def test_rollout_stops_examples_by_the_rule(tmp_path):
    model, x, rule = trm(), batch(), StepRule(n_sup=N)
    full = rollout(model, x, rule, fixed(tmp_path), puzzle_emb=None)
    assert full.steps.tolist() == [N] * 6
    conf = rollout(model, x, rule, fixed(tmp_path, eval_halt="confident", threshold=0.0), puzzle_emb=None)
    assert conf.steps.tolist() == [1] * 6  # any answer is confident enough
    held = rollout(model, x, rule, fixed(tmp_path, eval_halt="confident", threshold=0.0, min_steps=3), puzzle_emb=None)
    assert held.steps.tolist() == [3] * 6
    stable = rollout(model, x, rule, fixed(tmp_path, eval_halt="stable", patience=1), puzzle_emb=None)
    # an example stops at the first step whose answer equals the previous one, and keeps it
    for b in range(6):
        s = int(stable.steps[b])
        changed = [not torch.equal(full.preds[b, i], full.preds[b, i - 1]) for i in range(1, N)]
        first_same = next((i + 2 for i, c in enumerate(changed) if not c), N)  # changed[i]: step i+2 vs i+1
        assert s == first_same
        assert torch.equal(stable.preds[b, s - 1:], full.preds[b, s - 1].expand(N - s + 1, -1))


def test_act_is_untouched_by_the_answer(tmp_path):
    act = build_act(ACTConfig(), BuildContext(seed=0, n_sup=N, data_dir=tmp_path))
    assert not getattr(act, "uses_answer", False)
    out = rollout(trm(), batch(), StepRule(n_sup=N), act, puzzle_emb=None)
    assert out.steps.tolist() == [N] * 6


# ------------------------------------------------------------------ in an evaluation


def _trainer(tmp_path, registry, overrides=()):
    from conftest import tiny_recipe

    from dis_core.wiring.recipe import load_recipe
    from dis_core.loop.trainer import Trainer

    resolved = load_recipe(tiny_recipe(tmp_path, steps=3), registry, list(overrides))
    trainer = Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    for _ in range(3):
        trainer.train_step()
    return trainer


def test_a_guidance_sweep_scores_every_w_in_one_pass(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, ["eval.guidance=[0, 0.5, 1, 1.5]"])
    swept = trainer.evaluate()
    plain = {k: v for k, v in swept.items() if "@w=" not in k}
    for w in ("0", "0.5", "1", "1.5"):
        assert {k.removesuffix(f"@w={w}") for k in swept if k.endswith(f"@w={w}")} == set(plain), w
    assert {k: swept[f"{k}@w=1"] for k in plain} == plain
    # the plain set is what an evaluation without a sweep gives
    alone = attrs_evolve_eval(trainer, guidance=())
    assert alone == plain
    # w changes the answers (w = 0 reads the readout before every step)
    assert any(swept[f"exact/hamming@{s}@w=0"] != plain[f"exact/hamming@{s}"] for s in (1, 2, 3))


def attrs_evolve_eval(trainer, **changes):
    import attrs

    trainer.recipe = attrs.evolve(trainer.recipe, eval=attrs.evolve(trainer.recipe.eval, **changes))
    return trainer.evaluate()


def test_every_evaluation_reports_steps_calls_and_the_margin_per_step(tmp_path, registry):
    trainer = _trainer(tmp_path, registry)
    m = trainer.evaluate()
    assert m["diagnostics/mean_steps"] == 3 and m["diagnostics/calls_per_example"] == 3 * 3  # n_sup 3 x (n + 1)
    for s in (1, 2, 3):
        assert 0.0 <= m[f"diagnostics/margin_positive@{s}"] + m[f"diagnostics/margin_negative@{s}"] <= 1.0
        assert f"diagnostics/advantage_margin@{s}" in m
    off = attrs_evolve_eval(trainer, margin=False)
    assert not any("margin" in k for k in off)
    assert {k: v for k, v in m.items() if "margin" not in k} == off


def test_an_adaptive_rule_reports_fewer_calls(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, ["halting.name=fixed", "halting.config.eval_halt=confident", "halting.config.threshold=0.0"])
    m = trainer.evaluate()
    assert m["diagnostics/mean_steps"] == 1 and m["diagnostics/calls_per_example"] == 3


def test_a_dis_run_can_train_the_q_head(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, ["halting.name=fixed", "halting.config.q_head=true", "halting.config.eval_halt=q_head"])
    head = trainer.solver.backbone.q_head
    assert all(p.requires_grad for p in head.parameters())
    before = [p.detach().clone() for p in head.parameters()]
    out = trainer.train_step()
    assert set(out.losses) == {"ce", "halt"}
    assert all(not torch.equal(b, p) for b, p in zip(before, head.parameters()))  # the halting loss moved the head
    assert trainer.state.carry.steps.max() <= 3  # training still runs n_sup steps per slot
    m = trainer.evaluate()
    assert 1 <= m["diagnostics/mean_steps"] <= 3


def test_the_console_shows_each_w_by_its_headline_only(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, ["eval.guidance=[0, 1]"])
    swept = trainer.evaluate()
    from dis_core.contract.metrics import is_per_step, on_console

    shown = {k for k in swept if on_console(k, trainer.solver.evaluators)}
    heads = {f"{name}/{ev.headline}" for name, ev in trainer.solver.evaluators.items()}
    assert {k for k in shown if "@w=" in k} == {f"{h}@w={w}" for h in heads for w in ("0", "1")}
    assert {k for k in shown if "@w=" not in k} == {k for k in swept if "@w=" not in k and not is_per_step(k)}
    # evaluators that write no files leave no empty folders under eval/
    assert not (tmp_path / "run" / "eval").exists() or not any(p.is_dir() for p in (tmp_path / "run" / "eval").rglob("*"))
