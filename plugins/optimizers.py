"""Optimizers. A factory returns `make(params) -> torch.optim.Optimizer`; the trainer owns the
learning-rate schedule and writes each param group's `lr` every step.

`adamw` is torch's AdamW (the official DIS ARC scripts). `adam_atan2` is TRM's and HRM's
optimizer, the `imoneoi/adam-atan2` rule, written here in plain PyTorch so that it runs on any
device (the original is a CUDA-only extension for sm_80-90 that often fails to build).

Not to be confused with the PyPI package `adam-atan2-pytorch` (lucidrains), which is *not* the
same rule: it scales the step by a = 1.27, takes atan2 of the bias-corrected m (the rule below
corrects m outside the atan2), decays weights by `1 - (lr / initial_lr) * wd` (so built with
the base lr it removes 10% of every weight per step at wd 0.1 and zeroes them at wd 1.0), and
refuses lr = 0 at construction, which is how TRM builds it. So it is deliberately not offered.
"""

from __future__ import annotations

import attrs
import torch

from dis_core import hookimpl
from dis_core.contract.validators import in_range, non_negative, positive

# torch checks these only when the trainer builds the optimizer (and lets lr = inf through): the
# config classes check them when the recipe is loaded, NaN and infinities included.
_betas = in_range(0.0, 1.0, high_open=True)


@attrs.frozen(kw_only=True)
class AdamWConfig:
    lr: float = attrs.field(default=1e-4, validator=non_negative)  # base lr; the trainer's schedule scales it
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)  # the reference's betas (not torch's 0.999)
    weight_decay: float = attrs.field(default=0.1, validator=non_negative)  # decoupled, applied to every parameter as the reference does
    eps: float = attrs.field(default=1e-8, validator=positive)  # 0 would divide 0 by 0 where a gradient's history is 0


def build_adamw(config: AdamWConfig, ctx):
    """torch AdamW (the optimizer of the official DIS ARC scripts)."""

    def make(params):
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)

    return make


@attrs.frozen(kw_only=True)
class AdamATan2Config:
    lr: float = attrs.field(default=1e-4, validator=non_negative)  # base lr; the trainer's schedule scales it
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)  # TRM's (not 0.999)
    weight_decay: float = attrs.field(default=0.1, validator=non_negative)  # decoupled; TRM Sudoku/Maze use 1.0


class AdamATan2(torch.optim.Optimizer):
    """Adam with the division m / (sqrt(v) + eps) replaced by atan2(m, sqrt(v)): bounded in
    (-pi/2, pi/2), scale-invariant, and needing no eps. Per parameter, t counted from 1:

        p <- p * (1 - lr * wd)
        m <- m + (1 - b1) * (g - m)
        v <- v + (1 - b2) * (g^2 - v)
        p <- p - lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t))

    m's bias correction sits outside the atan2 and v's inside it, as in the CUDA kernel.
    lr = 0 is accepted at construction: TRM builds it so and lets the schedule set the lr.
    """

    def __init__(self, params, lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must each lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamATan2 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # A CPU step counter (as torch's Adam keeps it) so the bias corrections are
                    # host floats: no device sync per parameter.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(int(state["step"].item()))
            if params:
                self._update(params, grads, ms, vs, steps, group)
        return loss

    @staticmethod
    def _update(params, grads, ms, vs, steps, group):
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if lr * wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)
        torch._foreach_lerp_(vs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        # Steps are per parameter (a parameter that had no grad on some step lags behind).
        neg_step_size = [-lr / (1.0 - beta1**t) for t in steps]
        bc2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in steps]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        for m, d in zip(ms, denom):
            torch.atan2(m, d, out=d)  # there is no _foreach_atan2; d becomes the update direction
        torch._foreach_mul_(denom, neg_step_size)
        torch._foreach_add_(params, denom)


def build_adam_atan2(config: AdamATan2Config, ctx):
    """AdamATan2, the exact `imoneoi` rule in plain PyTorch (TRM's and HRM's optimizer)."""

    def make(params):
        # The trainer reads each group's lr once as the base of its schedule and overwrites it
        # before every step.
        return AdamATan2(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    return make


@hookimpl
def register_optimizers(register):
    register("adamw", AdamWConfig, build_adamw)
    register("adam_atan2", AdamATan2Config, build_adam_atan2)
