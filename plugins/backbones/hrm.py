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
from torch import nn

from dis_core import hookimpl
from dis_core.contract.validators import positive
from dis_plugins.backbones.layers import (
    Block, InputEmbedding, Linear, Reasoner, Rotary, answer_logits, block_flops, call, check_shape_config,
    halting_logits, prefix_length, q_head, start_state, start_vector,
)


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


class HRM(nn.Module):
    """The HRM baseline, composed from the public blocks of `layers`: f_I (`embed`), the slow
    module H and the fast module L, f_O (`lm_head`), the halting head and the start states of y
    and z. Its state is (y, z), each (B, S, D)."""

    def __init__(self, config: HRMConfig, vocab_size: int, seq_len: int, n_sup: int):
        super().__init__()
        c, D = config, config.hidden_size
        self.config, self.T, self.n = c, c.T, c.n
        self.hidden_size, self.puzzle_emb_ndim = D, c.puzzle_emb_ndim
        self.prefix_len = prefix_length(c.puzzle_emb_ndim, c.puzzle_emb_len, D)  # P
        self.seq_len = S = self.prefix_len + seq_len  # positions, prefix included
        # Parameters draw their initial values as they are built, in this order (input to output):
        # keep it, and a seed keeps giving the same model.
        self.embed = InputEmbedding(vocab_size, D, seq_len, self.prefix_len, c.puzzle_emb_ndim, c.pos_encodings,
                                    step_rows=n_sup + 2 if c.step_embedding else 0)
        # One RoPE table for every block of H and L; it holds no parameters (nothing in the state dict).
        rotary = Rotary(D // c.num_heads, S, c.rope_theta) if c.pos_encodings == "rope" else None
        self.H = Reasoner([Block(D, c.num_heads, c.expansion, S) for _ in range(c.H_layers)], rotary)
        self.L = Reasoner([Block(D, c.num_heads, c.expansion, S) for _ in range(c.L_layers)], rotary)
        self.lm_head = Linear(D, vocab_size)  # f_O
        self.q_head = q_head(D)
        # Start states of y (reference z_H) and z (z_L): fixed random vectors, saved, never trained.
        self.register_buffer("H_init", start_vector(D))
        self.register_buffer("L_init", start_vector(D))
        # train.activation_checkpointing (the Solver sets it): the final L- and H-call keep only
        # their inputs and are recomputed in the backward.
        self.activation_checkpointing = False

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_0, z_0), each (B, S, D)."""
        return start_state(self.H_init, batch_size, self.seq_len), start_state(self.L_init, batch_size, self.seq_len)

    def forward(self, state, tokens, step, puzzle_emb=None):
        _, y, z = self._reason(state, tokens, step, puzzle_emb)
        return (y, z), self.decode(y), halting_logits(self.q_head, y)  # (B, L, V), (B, 2)

    def calls_per_step(self) -> tuple[int, int]:
        return self.T * self.n + self.T, 2

    def flops_per_call(self, seq_len: int) -> float:
        # Calls mix L (L_layers blocks) and H (H_layers blocks): FLOPs use their average, exact
        # for the whole step; the grad part (one of each) matches it when H_layers == L_layers.
        c = self.config
        blocks = (c.T * c.n * c.L_layers + c.T * c.H_layers) / (c.T * c.n + c.T)
        return blocks * block_flops(seq_len, self.hidden_size, c.expansion)

    def compile(self, *args, **kwargs) -> None:
        """`train.compile`: torch.compile H and L only, where the time goes (the embedding stays
        eager, as in `trm`)."""
        self.H.compile(*args, **kwargs)
        self.L.compile(*args, **kwargs)

    def _reason(self, state, tokens, step, puzzle_emb):
        """The T cycles -> (y before the last H-update, new y, new z)."""
        x = self.embed(tokens, step, puzzle_emb)  # (B, S, D)
        y, z = (s.to(x.dtype) for s in state)  # (B, S, D) each
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
        z = call(self.L, z, y + x, recompute=self.activation_checkpointing)
        y = call(self.H, y, z, recompute=self.activation_checkpointing)
        return y_before, y, z

    # Readouts for guidance and the Advantage Margin (see `trm`), at evaluation only.

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """f_O: answer state y (B, S, D) -> logits (B, L, V)."""
        return answer_logits(self.lm_head, y, self.prefix_len)

    def forward_readouts(self, state, tokens, step, puzzle_emb=None):
        """`forward`, plus f_O of y just before the step's last H-update."""
        y_before, y, z = self._reason(state, tokens, step, puzzle_emb)
        return (y, z), self.decode(y), halting_logits(self.q_head, y), self.decode(y_before)


def build_hrm(config: HRMConfig, ctx) -> HRM:
    """HRM-style baseline: separate H and L modules, one-step gradient, SDPA attention."""
    return HRM(config, ctx.spec.vocab_size, ctx.spec.seq_len, ctx.n_sup)


@hookimpl
def register_backbones(register):
    register("hrm", HRMConfig, build_hrm)
