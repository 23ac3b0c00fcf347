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
from torch import nn

from dis_core import hookimpl
from dis_core.contract.validators import positive
from dis_plugins.backbones.layers import (
    Block, InputEmbedding, Linear, Reasoner, Rotary, answer_logits, block_flops, call, check_shape_config,
    halting_logits, prefix_length, q_head, start_state, start_vector,
)


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


class TRM(nn.Module):
    """The Tiny Recursive Model, composed from the public blocks of `layers`: f_I (`embed`), the
    shared network `net`, f_O (`lm_head`), the halting head and the start states of y and z. Its
    state is (y, z), each (B, S, D)."""

    def __init__(self, config: TRMConfig, vocab_size: int, seq_len: int, n_sup: int):
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
        # One RoPE table for every block; it holds no parameters (nothing in the state dict).
        rotary = Rotary(D // c.num_heads, S, c.rope_theta) if c.pos_encodings == "rope" else None
        self.net = Reasoner([Block(D, c.num_heads, c.expansion, S, c.mlp_t) for _ in range(c.num_layers)], rotary)
        self.lm_head = Linear(D, vocab_size)  # f_O
        self.q_head = q_head(D)
        # Start states of y (reference z_H) and z (z_L): fixed random vectors, saved, never trained.
        self.register_buffer("H_init", start_vector(D))
        self.register_buffer("L_init", start_vector(D))
        # train.activation_checkpointing (the Solver sets it): the last cycle's n + 1 calls keep
        # only their inputs and are recomputed in the backward.
        self.activation_checkpointing = False

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_0, z_0), each (B, S, D)."""
        return start_state(self.H_init, batch_size, self.seq_len), start_state(self.L_init, batch_size, self.seq_len)

    def forward(self, state, tokens, step, puzzle_emb=None):
        _, y, z = self._reason(state, tokens, step, puzzle_emb)
        return (y, z), self.decode(y), halting_logits(self.q_head, y)  # (B, L, V), (B, 2)

    def calls_per_step(self) -> tuple[int, int]:
        return self.T * (self.n + 1), self.n + 1

    def flops_per_call(self, seq_len: int) -> float:
        return self.config.num_layers * block_flops(seq_len, self.hidden_size, self.config.expansion, self.config.mlp_t)

    def compile(self, *args, **kwargs) -> None:
        """`train.compile`: torch.compile the shared network only, where the time goes. The
        embedding stays eager: with the whole backbone compiled under bf16 autocast (torch
        2.13, CPU) the token- and step-embedding gradients came out non-finite."""
        self.net.compile(*args, **kwargs)

    def _cycle(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        yx = y + x  # the z-updates' injection does not change within a cycle
        recompute = self.activation_checkpointing
        for _ in range(self.n):
            z = call(self.net, z, yx, recompute=recompute)
        y = call(self.net, y, z, recompute=recompute)
        return y, z

    def _reason(self, state, tokens, step, puzzle_emb):
        """The T cycles -> (y before the last y-update, new y, new z)."""
        x = self.embed(tokens, step, puzzle_emb)  # (B, S, D)
        y, z = (s.to(x.dtype) for s in state)  # (B, S, D) each
        with torch.no_grad():
            for _ in range(self.T - 1):
                y, z = self._cycle(y, z, x)
        y_before = y  # the last cycle's z-updates leave y alone; its y-update is the last one
        y, z = self._cycle(y, z, x)
        return y_before, y, z

    # Readouts for the paper's guidance (Eq. 5) and Advantage Margin (Prop. 4.1): optional
    # capabilities of a backbone, used by `dis_core.step.guidance` at evaluation, never by training.

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """f_O: answer state y (B, S, D) -> logits (B, L, V)."""
        return answer_logits(self.lm_head, y, self.prefix_len)

    def forward_readouts(self, state, tokens, step, puzzle_emb=None):
        """`forward`, plus f_O of y just before the step's last y-update (the paper's z_H^n of
        Eq. 4, around the last cycle): (state, logits, q_logits, logits_before_last_update)."""
        y_before, y, z = self._reason(state, tokens, step, puzzle_emb)
        return (y, z), self.decode(y), halting_logits(self.q_head, y), self.decode(y_before)


def build_trm(config: TRMConfig, ctx) -> TRM:
    """Tiny Recursive Model: one shared network, T cycles of n z-updates and a y-update."""
    return TRM(config, ctx.spec.vocab_size, ctx.spec.seq_len, ctx.n_sup)


@hookimpl
def register_backbones(register):
    register("trm", TRMConfig, build_trm)
