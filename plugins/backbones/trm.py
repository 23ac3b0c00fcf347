"""Backbone `trm`: the Tiny Recursive Model (arXiv 2510.04871), with DIS's step embedding as
an option (arXiv 2511.16886).

One shared network net(h, inj) = blocks(h + inj) plays both roles:
    z <- net(z, y + x)   (n times: refine the latent)
    y <- net(y, z)       (once: refine the answer)
A supervision step runs T such cycles; the first T-1 without gradient, the last with it
(backprop through the whole last cycle, not HRM's one-step gradient). See
docs/reference.md#trm-backbone, docs/reference.md#trm-training and
docs/reference.md#dis-step-embedding.
"""

from __future__ import annotations

import attrs
import torch

from dis_core import hookimpl
from dis_core.validators import positive
from dis_plugins.backbones.layers import Block, Reasoner, RecursiveBackbone, check_shape_config


@attrs.frozen(kw_only=True)
class TRMConfig:
    hidden_size: int = 512  # D
    num_layers: int = 2  # blocks in the shared network (reference L_layers)
    num_heads: int = 8
    expansion: float = attrs.field(default=4.0, validator=positive)  # SwiGLU inner size = 256*ceil(round(expansion*D*2/3)/256)
    T: int = 1  # cycles per supervision step (reference H_cycles); the first T-1 run without grad
    n: int = 2  # z-updates per cycle (reference L_cycles)
    pos_encodings: str = "rope"  # "rope" | "learned" | "none"
    rope_theta: float = attrs.field(default=10000.0, validator=positive)
    # TRM-MLP (Sudoku): a SwiGLU across positions replaces attention; needs a fixed S.
    mlp_t: bool = False
    # DIS: add a learned (n_sup + 2)-row table, indexed by the supervision step, to every position.
    step_embedding: bool = False
    # Width of the per-puzzle vector the trainer passes in (its table lives outside the backbone);
    # 0 = no puzzle embedding.
    puzzle_emb_ndim: int = 0
    # Prefix positions P; 0 = ceil(puzzle_emb_ndim / D). TRM uses 16 (only the first carries
    # the vector when ndim = D; the rest start at zero and act as scratch positions).
    puzzle_emb_len: int = 0

    def __attrs_post_init__(self):
        check_shape_config(self)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.mlp_t and self.pos_encodings == "rope":
            raise ValueError("mlp_t has no attention, so rope would do nothing: set pos_encodings to 'none' or 'learned'")


class TRM(RecursiveBackbone):
    def __init__(self, config: TRMConfig, vocab_size: int, seq_len: int, n_sup: int):
        super().__init__(config, vocab_size, seq_len, n_sup)
        c = config
        blocks = [Block(c.hidden_size, c.num_heads, c.expansion, self.seq_len, c.mlp_t) for _ in range(c.num_layers)]
        self.net = Reasoner(blocks, self.rotary)
        self._add_heads(vocab_size)
        self.blocks_per_call, self.mlp_t = c.num_layers, c.mlp_t

    def calls_per_step(self) -> tuple[int, int]:
        return self.T * (self.n + 1), self.n + 1

    def _cycle(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        yx = y + x  # the z-updates' injection does not change within a cycle
        for _ in range(self.n):
            z = self.net(z, yx)
        y = self.net(y, z)
        return y, z

    def _reason(self, y, z, x):
        with torch.no_grad():
            for _ in range(self.T - 1):
                y, z = self._cycle(y, z, x)
        y_before = y  # the last cycle's z-updates leave y alone; its y-update is the last one
        y, z = self._cycle(y, z, x)
        return y_before, y, z


def build_trm(config: TRMConfig, ctx) -> TRM:
    """Tiny Recursive Model: one shared network, T cycles of n z-updates and a y-update."""
    return TRM(config, ctx.spec.vocab_size, ctx.spec.seq_len, ctx.n_sup)


@hookimpl
def register_backbones(register):
    register("trm", TRMConfig, build_trm)
