"""Backbone `hrm`: an HRM-style baseline (arXiv 2506.21734) with SDPA attention.

Two separate modules, L (fast, updates z) and H (slow, updates y), 4 blocks each by default:
    z <- L(z, y + x)   (n times per cycle)
    y <- H(y, z)       (once per cycle)
over T cycles. HRM's one-step gradient: everything but the very last L- and H-update runs
without gradient, so backprop sees exactly one L call and one H call
(docs/reference.md#hrm-backbone).
"""

from __future__ import annotations

import attrs
import torch

from dis_core import hookimpl
from dis_core.validators import positive
from dis_plugins.backbones.layers import Block, Reasoner, RecursiveBackbone, check_shape_config


@attrs.frozen(kw_only=True)
class HRMConfig:
    hidden_size: int = 512  # D
    num_heads: int = 8
    expansion: float = attrs.field(default=4.0, validator=positive)  # SwiGLU inner size = 256*ceil(round(expansion*D*2/3)/256)
    H_layers: int = 4  # blocks of the slow module (updates y, reference z_H)
    L_layers: int = 4  # blocks of the fast module (updates z, reference z_L)
    T: int = 2  # cycles per supervision step (reference H_cycles)
    n: int = 2  # L-updates per cycle (reference L_cycles)
    pos_encodings: str = "rope"  # "rope" | "learned" | "none"
    rope_theta: float = attrs.field(default=10000.0, validator=positive)
    # DIS: add a learned (n_sup + 2)-row table, indexed by the supervision step, to every position.
    step_embedding: bool = False
    # Width of the per-puzzle vector the trainer passes in; 0 = no puzzle embedding.
    puzzle_emb_ndim: int = 0
    # Prefix positions P; 0 = ceil(puzzle_emb_ndim / D) (HRM itself always uses that: P = 1).
    puzzle_emb_len: int = 0

    def __attrs_post_init__(self):
        check_shape_config(self)
        if self.H_layers < 1 or self.L_layers < 1:
            raise ValueError(f"H_layers ({self.H_layers}) and L_layers ({self.L_layers}) must be >= 1")


class HRM(RecursiveBackbone):
    def __init__(self, config: HRMConfig, vocab_size: int, seq_len: int, n_sup: int):
        super().__init__(config, vocab_size, seq_len, n_sup)
        c, D = config, config.hidden_size
        self.H = Reasoner([Block(D, c.num_heads, c.expansion, self.seq_len) for _ in range(c.H_layers)], self.rotary)
        self.L = Reasoner([Block(D, c.num_heads, c.expansion, self.seq_len) for _ in range(c.L_layers)], self.rotary)
        self._add_heads(vocab_size)
        # Calls mix L (L_layers blocks) and H (H_layers blocks): FLOPs use their average, exact
        # for the whole step; the grad part (one of each) matches it when H_layers == L_layers.
        calls = c.T * c.n + c.T
        self.blocks_per_call = (c.T * c.n * c.L_layers + c.T * c.H_layers) / calls

    def calls_per_step(self) -> tuple[int, int]:
        return self.T * self.n + self.T, 2

    def _reason(self, y, z, x):
        with torch.no_grad():
            for cycle in range(self.T):
                last_cycle = cycle == self.T - 1
                yx = y + x
                for i in range(self.n):
                    if not (last_cycle and i == self.n - 1):
                        z = self.L(z, yx)
                if not last_cycle:
                    y = self.H(y, z)
        # One-step gradient: the final L- and H-update.
        y_before = y
        z = self.L(z, y + x)
        y = self.H(y, z)
        return y_before, y, z


def build_hrm(config: HRMConfig, ctx) -> HRM:
    """HRM-style baseline: separate H and L modules, one-step gradient, SDPA attention."""
    return HRM(config, ctx.spec.vocab_size, ctx.spec.seq_len, ctx.n_sup)


@hookimpl
def register_backbones(register):
    register("hrm", HRMConfig, build_hrm)
