"""Exponential moving average of the trainable weights, used for evaluation and checkpoints.

After every optimizer step: shadow <- (1 - decay) * param + decay * shadow, for the parameters
with requires_grad only (TRM's `ema.py`; buffers such as the init states and the puzzle table
are not averaged). Unlike the reference, evaluation does not deep-copy the whole train state
(model, optimizers, a puzzle table of up to 2.6 GB): `applied()` copies the shadow into the
live parameters in place and restores them afterwards, which costs one extra copy of the
trainable weights and keeps any optimizer or DeepSpeed references to the tensors valid.

Build it on the unwrapped module (not a DeepSpeed engine, whose names carry a `module.`
prefix). ZeRO stage 3 partitions parameters and is not supported.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from dis_core.contract.errors import UserError


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self._params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        # The shadow is kept in fp32 even for low-precision parameters: with decay 0.999 each
        # update moves it by 0.1% of the gap, below bf16 resolution, so a bf16 shadow would freeze.
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32 if p.is_floating_point() else p.dtype, copy=True)
            for name, p in self._params
        }

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the shadow; call once after each optimizer step."""
        shadow = [self.shadow[name] for name, _ in self._params]
        params = [p.detach().to(s.dtype) for (_, p), s in zip(self._params, shadow)]
        # (1 - decay) * param + decay * shadow with both products rounded before the sum, as the
        # reference computes it: an add with alpha fuses the multiply-add and rounds once, which
        # drifts from the reference by ~1e-7 a step (tests/test_golden.py, the *_ema traces).
        scaled = torch._foreach_mul(params, 1.0 - self.decay)
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, scaled)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the module holds the EMA weights; the trained weights come back
        on exit (also on error). Not re-entrant."""
        with torch.no_grad():
            backup = [p.detach().clone() for _, p in self._params]
            for name, p in self._params:
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(self._params, backup):
                    p.copy_(saved)

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` with the EMA weights in place of the trainable parameters
        (cast to their dtype), without touching the module: what checkpoints save with EMA on."""
        state = module.state_dict()
        for name, p in self._params:
            if name in state:
                state[name] = self.shadow[name].to(device=p.device, dtype=p.dtype)
        return state

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise UserError(
                "the checkpoint's EMA weights do not match the model: "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise UserError(
                    f"the checkpoint's EMA weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(tensor)
        # The decay stays the recipe's (the saved one is informational).
