"""A low-rank adapter (LoRA) for the `nn.Linear` layers of any backbone: W x + (alpha / r) B A x.

Used by `dis adapt --train adapter` to fine-tune a trained model on a few new tasks without
touching its weights: only A (r x in) and B (out x r) train, B starts at zero so the adapted
model starts exactly as the trained one. It is generic (any `nn.Linear` whose qualified name
starts with one of the given prefixes, e.g. `net.` for trm's reasoning blocks, `H.` / `L.` for
hrm's), so it lives in the step layer rather than in one backbone plugin.

The adapter's parameters live in a submodule `lowrank_adapter` of the backbone, so the DeepSpeed
engine, the optimizer, EMA and checkpoints see them like any parameter (keys
`backbone.lowrank_adapter.*`); the layers themselves are untouched and a forward hook adds the
low-rank term. A layer whose forward returns several chunks (a fused q/k/v projection whose
`splits` > 1) gets the term chunked the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ATTR = "lowrank_adapter"


class LowRankAdapter(nn.Module):
    """A and B of every adapted layer, keyed by the layer's name (dots as '__')."""

    def __init__(self, layers: dict[str, nn.Linear], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the adapter rank must be >= 1, got {rank}")
        self.rank, self.scale = rank, alpha / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._hooks = []
        for name, layer in layers.items():
            key = name.replace(".", "__")
            a = torch.empty(rank, layer.in_features, device=layer.weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear draws its weight
            self.A[key] = nn.Parameter(a)
            self.B[key] = nn.Parameter(torch.zeros(layer.out_features, rank, device=layer.weight.device))
            self._hooks.append(layer.register_forward_hook(self._hook(key, getattr(layer, "splits", 1))))

    def _hook(self, key: str, splits: int):
        def add(_module, inputs, output):
            x = inputs[0]
            delta = nn.functional.linear(nn.functional.linear(x, self.A[key].to(x.dtype)), self.B[key].to(x.dtype)) * self.scale
            if splits == 1:
                return output + delta.to(output.dtype)
            return tuple(o + d.to(o.dtype) for o, d in zip(output, delta.chunk(splits, dim=-1)))
        return add

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def add_low_rank(backbone: nn.Module, *, rank: int = 4, alpha: float | None = None,
                 prefixes: tuple[str, ...] = ("net.",)) -> LowRankAdapter:
    """Attach an adapter to the `nn.Linear` layers of `backbone` under `prefixes`; returns it
    (also `backbone.lowrank_adapter`). Raises ValueError when no layer matches."""
    if hasattr(backbone, ATTR):
        raise ValueError("the backbone has an adapter already")
    layers = {name: m for name, m in backbone.named_modules()
              if isinstance(m, nn.Linear) and any(name.startswith(p) or (name + ".").startswith(p) for p in prefixes)}
    if not layers:
        linear = [name for name, m in backbone.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no nn.Linear layer of {type(backbone).__name__} is under {', '.join(prefixes)}; its layers: "
                         f"{', '.join(linear[:8]) or 'none'}")
    adapter = LowRankAdapter(layers, rank, float(alpha if alpha is not None else rank))
    backbone.add_module(ATTR, adapter)
    return adapter


def adapter_of(backbone: nn.Module) -> LowRankAdapter | None:
    return getattr(backbone, ATTR, None)
