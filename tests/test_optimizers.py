"""AdamATan2 against its formula, step by step (docs/reference.md#adamatan2), and the factories."""

import copy
import math

import pytest
import torch

from dis_core.contract.interfaces import BuildContext
from dis_plugins.optimizers import AdamATan2, AdamATan2Config, AdamWConfig, build_adam_atan2, build_adamw


def reference_steps(p0, grads, lrs, betas, wd):
    """The imoneoi rule written out element by element in float64, t counted from 1."""
    b1, b2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = p * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        p = p - (lr / (1 - b1**t)) * torch.atan2(m, torch.sqrt(v) / math.sqrt(1 - b2**t))
        out.append(p.clone())
    return out


def test_matches_formula_over_steps_with_decay_and_changing_lr():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) * s for s in (1.0, 0.01, 3.0, 0.5, 1e-4)]
    lrs = [1e-2, 5e-3, 0.0, 2e-2, 1e-3]  # includes a zero-lr step (warm-up starts near 0)
    betas, wd = (0.9, 0.95), 0.1
    expected = reference_steps(p0, grads, lrs, betas, wd)

    param = torch.nn.Parameter(p0.clone())
    opt = AdamATan2([param], lr=0.0, betas=betas, weight_decay=wd)
    for g, lr, want in zip(grads, lrs, expected):
        for group in opt.param_groups:
            group["lr"] = lr  # what the trainer's schedule does every step
        param.grad = g.clone()
        opt.step()
        torch.testing.assert_close(param.detach(), want, rtol=0, atol=1e-12)
    assert opt.state[param]["step"].item() == 5


def test_first_step_bias_corrections():
    # t = 1, no decay: m = 0.1 g, v = 0.05 g^2, so the step is lr/0.1 * atan2(0.1 g, |g|):
    # m corrected outside the atan2, v inside. Correcting m inside would give atan2(g, |g|) = ±pi/4.
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = AdamATan2([param], lr=1e-3, weight_decay=0.0)
    param.grad = g.clone()
    opt.step()
    want = -(1e-3 / 0.1) * torch.atan2(0.1 * g, g.abs())
    torch.testing.assert_close(param.detach(), want, rtol=0, atol=1e-15)
    assert not torch.allclose(param.detach(), -(1e-3 / 0.1) * torch.atan2(g, g.abs()))


def test_lr_zero_construction_and_no_grad_params():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    opt = AdamATan2([a, b])  # TRM constructs with lr = 0
    assert opt.param_groups[0]["lr"] == 0.0
    a.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.ones(3))  # lr 0: no move, no decay
    assert opt.state[a]["step"].item() == 1
    assert b not in opt.state  # a parameter without grad is skipped, as in torch's Adam
    with pytest.raises(ValueError):
        AdamATan2([a], lr=-1.0)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    nets = [torch.nn.Linear(5, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [AdamATan2(n.parameters(), lr=1e-2) for n in nets]
    for _ in range(2):
        opts[0].zero_grad()
        nets[0](x).square().mean().backward()
        opts[0].step()
    nets[1].load_state_dict(nets[0].state_dict())
    # deepcopy: as with torch's optimizers, a loaded state shares the source's tensors
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for net, opt in zip(nets, opts):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_factories_build_their_optimizer_from_the_config(tmp_path):
    """Each factory hands its config to the optimizer, over the parameters it is given. (The
    defaults are the reference's; tests/test_docs.py holds them to docs/recipes.md.)"""
    ctx = BuildContext(seed=0, n_sup=2, data_dir=tmp_path)
    net = torch.nn.Linear(3, 2)
    opt = build_adam_atan2(AdamATan2Config(lr=3e-3, betas=(0.8, 0.9), weight_decay=0.25), ctx)(net.parameters())
    assert isinstance(opt, AdamATan2)
    (group,) = opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.9), 0.25)  # lr: the schedule's base
    assert group["params"] == list(net.parameters())
    opt = build_adamw(AdamWConfig(lr=2e-3, betas=(0.7, 0.8), weight_decay=0.5, eps=1e-6), ctx)(net.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    (group,) = opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (2e-3, (0.7, 0.8), 0.5, 1e-6)
    assert group["params"] == list(net.parameters())
    with pytest.raises(ValueError):
        AdamATan2Config(betas=(0.9, 1.0))
