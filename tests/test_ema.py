"""EMA of the trainable weights: the update rule, swapping in for evaluation, checkpoints."""

import pytest
import torch
from torch import nn

from dis_core.loop.ema import EMA
from dis_core.contract.errors import UserError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("init", torch.full((4,), 7.0))

    def forward(self, x):
        return self.lin(x + self.init)


def test_update_rule_and_scope():
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"lin.weight", "lin.bias"}  # trainable parameters only
    want = model.lin.weight.detach().clone()
    for k in range(3):
        with torch.no_grad():
            model.lin.weight.add_(float(k + 1))
        ema.update()
        want = 0.9 * want + 0.1 * model.lin.weight.detach()
    torch.testing.assert_close(ema.shadow["lin.weight"], want)


def test_applied_swaps_in_and_restores():
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(5, 4)
    ema = EMA(model, decay=0.5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lin.weight.mul_(3.0)
    ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    reference = Tiny()
    reference.load_state_dict(live)
    reference.lin.weight.data.copy_(0.5 * trained["lin.weight"] + 0.5 * live["lin.weight"])
    weight_tensor = model.lin.weight
    with ema.applied():
        torch.testing.assert_close(model(x), reference(x))
        assert model.lin.weight is weight_tensor  # swapped in place: optimizer references stay valid
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=0, atol=0)
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("evaluation failed")
    torch.testing.assert_close(model.lin.weight, live["lin.weight"], rtol=0, atol=0)


def test_checkpoint_round_trip_and_mismatch():
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.lin.bias.add_(1.0)
    ema.update()
    other = EMA(Tiny(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["lin.bias"], ema.shadow["lin.bias"], rtol=0, atol=0)
    saved = ema.model_state_dict(model)
    torch.testing.assert_close(saved["lin.bias"], ema.shadow["lin.bias"])
    assert torch.equal(saved["init"], model.init)  # buffers pass through unchanged
    assert not torch.equal(saved["lin.bias"], model.lin.bias)  # the module itself is untouched
    with pytest.raises(UserError, match="missing"):
        EMA(nn.Linear(4, 3, bias=False), decay=0.9).load_state_dict(ema.state_dict())


def test_low_precision_parameters_keep_an_fp32_shadow():
    p = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    holder = nn.Module()
    holder.p = p
    ema = EMA(holder, decay=0.999)
    with torch.no_grad():
        p.fill_(2.0)
    for _ in range(10):
        ema.update()
    assert ema.shadow["p"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["p"], torch.full((8,), 2.0 - 0.999**10), rtol=0, atol=1e-6)
