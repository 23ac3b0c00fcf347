"""The building blocks of the recursive backbones, public for any backbone to compose: `trm` and
`hrm` are built from them, and a third-party backbone (a plain Transformer, say) can reuse the
TRM attention, SwiGLU, RMSNorm and RoPE as they are (docs/hooks.md, "register_backbones").

  trunc_normal_, Linear, Embedding       LeCun truncated-normal init (JAX's convention), bias-free linears
  rms_norm                               parameter-free RMSNorm, in fp32
  Rotary, apply_rotary                   1-D RoPE over the whole sequence (prefix included)
  Attention, attend                      full multi-head self-attention, fused q/k/v, SDPA
  SwiGLU, swiglu_size                    the MLP, sized to a multiple of 256
  Block                                  post-norm: h = rms(h + attn(h)); h = rms(h + SwiGLU(h))
  Reasoner                               a stack of blocks with input injection: blocks(h + inj)
  call                                   net(h, inj), recomputed in the backward when asked (activation checkpointing)
  InputEmbedding                         f_I: tokens, puzzle prefix, step embedding, positions, x sqrt(D)
  answer_logits, q_head, halting_logits  the output heads f_O and q
  start_vector, start_state              fixed random start states (TRM's H_init, L_init)
  block_flops                            forward FLOPs of one block, for `flops_per_call`

They follow the reference TRM layers number by number (docs/reference.md#trm-backbone).
Parameters draw their initial values when their module is built, so a backbone's seed gives the
same weights as long as it builds its modules in the same order.

Modules run in whatever dtype their parameters have (DeepSpeed may cast them to bf16); the
norm and the rotary maths are done in fp32 and cast back, as the reference does.
Notation: B batch, S = P + L positions, D hidden, H heads, d_h = D / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Attention", "Block", "Embedding", "InputEmbedding", "Linear", "Reasoner", "Rotary", "SwiGLU", "answer_logits",
    "apply_rotary", "attend", "block_flops", "call", "check_shape_config", "halting_logits", "prefix_length", "q_head", "rms_norm",
    "start_state", "start_vector", "swiglu_size", "trunc_normal_",
]

NORM_EPS = 1e-5


def trunc_normal_(tensor: torch.Tensor, std: float, bound: float = 2.0) -> torch.Tensor:
    """Fill `tensor` in place from N(0, s^2) cut at +-bound*s, with s chosen so that the
    *realised* std equals `std` (JAX's truncated_normal convention; torch's trunc_normal_
    cuts at absolute values and leaves the std shrunk by ~12%). std 0 gives zeros."""
    if std == 0:
        return tensor.detach().zero_()
    # Variance of a standard normal truncated to [-b, b]: 1 - 2 b phi(b) / (Phi(b) - Phi(-b)).
    pdf = math.exp(-0.5 * bound * bound) / math.sqrt(2 * math.pi)
    mass = math.erf(bound / math.sqrt(2))
    scale = std / math.sqrt(1 - 2 * bound * pdf / mass)
    with torch.no_grad():
        # Inverse-CDF sampling inside the cut: u ~ U(erf(-b/sqrt2), erf(b/sqrt2)), x = sqrt2 erfinv(u).
        tensor.uniform_(-mass, mass).erfinv_().mul_(math.sqrt(2) * scale)
        return tensor.clamp_(-bound * scale, bound * scale)


class Linear(nn.Linear):
    """nn.Linear with LeCun init: truncated normal, std 1/sqrt(fan_in); bias (if any) zero.

    With `splits` > 1 (fused q/k/v, fused gate/up) forward returns `splits` views of one
    matmul's output, laid out as the reference lays it out. One matmul, not one per block: the
    backward then sums the input gradient in the reference's order, which keeps whole training
    runs bit-identical to the official code (tests/test_golden.py). Per-block matmuls were
    measured 8% faster at D128/S64 and 10% slower at D256/S916 on a 2-core CPU, and break that.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, splits: int = 1):
        if splits > 1 and (bias or out_features % splits):
            raise ValueError("a split Linear has no bias and an output size divisible by splits")
        self.splits = splits
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, 1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor):
        out = F.linear(x, self.weight, self.bias)
        return out if self.splits == 1 else out.chunk(self.splits, dim=-1)


class Embedding(nn.Embedding):
    """nn.Embedding initialised truncated-normal with std `init_std` (1/sqrt(D) in TRM)."""

    def __init__(self, num: int, dim: int, init_std: float):
        self.init_std = init_std
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, self.init_std)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim, computed in (at least) fp32 and cast back;
    the casts are no-ops for an fp32 model."""
    return F.rms_norm(_at_least_fp32(x), (x.shape[-1],), eps=NORM_EPS).to(x.dtype)


def swiglu_size(hidden: int, expansion: float) -> int:
    """Reference inner size: 2/3 of expansion*hidden, rounded up to a multiple of 256."""
    return 256 * math.ceil(round(expansion * hidden * 2 / 3) / 256)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), D -> I -> D with I = swiglu_size(D, expansion)."""

    def __init__(self, hidden: int, expansion: float):
        super().__init__()
        self.inner = swiglu_size(hidden, expansion)
        self.gate_up = Linear(hidden, 2 * self.inner, splits=2)  # weight rows: gate, then up
        self.down = Linear(self.inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # (..., I) each
        return self.down(F.silu(gate) * up)


class Rotary(nn.Module):
    """1-D RoPE over positions 0..S-1 (prefix included), rotate-half convention.

    cos/sin are kept as plain fp32 tensors, not buffers, so that casting the module to bf16
    (DeepSpeed) does not round them; they are rebuilt once per device.
    """

    def __init__(self, head_dim: int, seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.seq_len, self.theta = head_dim, seq_len, theta
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            # 1 / theta^(2i/d_h), written as the reference writes it: theta^(-2i/d_h) rounds
            # differently and leaves the logits 1 ULP apart.
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            inv_freq = 1.0 / (self.theta**exponent)
            freqs = torch.outer(torch.arange(self.seq_len, dtype=torch.float32, device=device), inv_freq)  # (S, d_h/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (S, d_h)
            # (S, 1, d_h): broadcasts over heads in the (B, S, H, d_h) layout.
            self._cache[device] = (emb.cos()[:, None, :], emb.sin()[:, None, :])
        return self._cache[device]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., S, H, d_h) -> x cos + rot(x) sin with rot(a, b) = (-b, a), in (at least) fp32."""
    xf = _at_least_fp32(x)
    a, b = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-b, a), dim=-1) * sin).to(x.dtype)


# Below this many positions a CPU in bf16 runs attention through PyTorch's plain ("math") path
# instead of its fused flash kernel. That kernel tiles the queries by 32 below 192 positions (by
# 64 or 256 above), and in bf16 those small tiles are slow: a whole training step measured 1.5x
# faster with the math path at S 64 and 1.6x at S 128, while flash was 1.1x faster at S 256 and
# 2x at S 512 and 916 (docs/results/throughput_cpu.md). fp32 always takes the fused kernel: it
# is the reference's computation, which the golden traces pin bit for bit.
CPU_BF16_MATH_ATTENTION_BELOW = 192


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention, q/k/v (B, H, S, d_h) -> (B, H, S, d_h)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] < CPU_BF16_MATH_ATTENTION_BELOW:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, is_causal=False)


class Attention(nn.Module):
    """Full multi-head self-attention: fused q/k/v projection, no bias, no mask (PAD and
    prefix positions attend everywhere, as in the reference)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden, splits=3)  # weight rows: q, k, v blocks, each (H, d_h)
        self.out = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.num_heads, self.head_dim) for t in self.qkv(x))  # (B, S, H, d_h)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # SDPA wants (B, H, S, d_h); the transposes are views.
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Post-norm block: h = rms(h + mix(h)); h = rms(h + SwiGLU_D(h)).

    mix is attention, or with `mlp_t` (TRM-MLP) a SwiGLU over the S positions applied to the
    transposed state, whose RMSNorm then normalises over S.
    """

    def __init__(self, hidden: int, num_heads: int, expansion: float, seq_len: int, mlp_t: bool = False):
        super().__init__()
        self.mlp_t = mlp_t
        if mlp_t:
            self.token_mlp = SwiGLU(seq_len, expansion)
        else:
            self.attn = Attention(hidden, num_heads)
        self.mlp = SwiGLU(hidden, expansion)

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.mlp_t:
            t = h.transpose(1, 2)  # (B, D, S)
            h = rms_norm(t + self.token_mlp(t)).transpose(1, 2)  # back to (B, S, D)
        else:
            h = rms_norm(h + self.attn(h, rotary))
        return rms_norm(h + self.mlp(h))


class Reasoner(nn.Module):
    """A stack of blocks with input injection: net(h, inj) = blocks(h + inj)."""

    def __init__(self, blocks: list[Block], rotary: Rotary | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary

    def forward(self, h: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        rotary = self.rotary.cos_sin(h.device) if self.rotary is not None else None
        h = h + inj
        for block in self.blocks:
            h = block(h, rotary)
        return h


def call(net: nn.Module, h: torch.Tensor, inj: torch.Tensor, *, recompute: bool = False) -> torch.Tensor:
    """net(h, inj). With `recompute` (`train.activation_checkpointing`) and gradient on, the call
    keeps only its inputs for the backward and runs again there to get its activations back
    (torch.utils.checkpoint, non-reentrant: the same kernels on the same inputs under the same
    autocast, so the same gradients bit for bit). The memory of a call's inputs instead of every
    block's intermediates; one more forward of the call. Without gradient there is nothing to keep."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(net, h, inj, use_reentrant=False)
    return net(h, inj)


class InputEmbedding(nn.Module):
    """x = f_I(tokens): token embedding, puzzle prefix, [step embedding], [learned positions],
    all times sqrt(D), in that order (docs/reference.md#input-embedding).

    The puzzle-embedding table itself lives outside the backbone (the trainer owns it and its
    sign-SGD); this module only receives the looked-up rows (B, E).
    """

    def __init__(self, vocab: int, hidden: int, seq_len: int, prefix_len: int, puzzle_emb_ndim: int,
                 pos_encodings: str, step_rows: int):
        super().__init__()
        std = 1.0 / math.sqrt(hidden)
        self.hidden, self.prefix_len, self.puzzle_emb_ndim = hidden, prefix_len, puzzle_emb_ndim
        self.scale = math.sqrt(hidden)
        self.tokens = Embedding(vocab, hidden, std)
        # DIS: (n_sup + 2)-row table indexed by the 1-based step, clamped to <= n_sup.
        self.step = Embedding(step_rows, hidden, std) if step_rows else None
        self.pos = Embedding(prefix_len + seq_len, hidden, std) if pos_encodings == "learned" else None

    def forward(self, tokens: torch.Tensor, step: torch.Tensor | None, puzzle_emb: torch.Tensor | None) -> torch.Tensor:
        x = self.tokens(tokens)  # (B, L, D)
        B, _, D = x.shape
        if self.prefix_len:
            if puzzle_emb is None:
                prefix = x.new_zeros(B, self.prefix_len, D)
            else:
                if puzzle_emb.shape != (B, self.puzzle_emb_ndim):
                    raise ValueError(
                        f"puzzle_emb has shape {tuple(puzzle_emb.shape)}, expected ({B}, {self.puzzle_emb_ndim}) "
                        "(batch, backbone puzzle_emb_ndim)"
                    )
                pad = self.prefix_len * D - self.puzzle_emb_ndim
                prefix = F.pad(puzzle_emb.to(x.dtype), (0, pad)).view(B, self.prefix_len, D)
            x = torch.cat((prefix, x), dim=1)  # (B, S, D)
        if self.step is not None:
            if step is None:
                raise ValueError("this backbone has a step embedding, so forward needs `step`")
            x = x + self.step(step.clamp(0, self.step.num_embeddings - 2))[:, None, :]
        if self.pos is not None:
            x = 0.70710678 * (x + self.pos.weight)  # keeps the sum's scale at ~1 std
        return x * self.scale


def answer_logits(lm_head: nn.Module, y: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """f_O: answer state y (B, S, D) -> logits (B, L, V) over the task positions.

    Decodes every position, then drops the prefix, as the reference does: decoding only the L
    answer positions sums the lm_head weight gradient in another order (~1e-7 a step away from
    the reference), for a saving of P/S of one small matmul: 1.7% of the output layer at ARC
    shapes, an output layer that is under 0.1% of a step's FLOPs."""
    return lm_head(y)[:, prefix_len:]


def q_head(hidden: int) -> Linear:
    """D -> 2 halting head [halt, continue] with weight 0 and bias -5, so sigmoid(q_halt)
    starts at ~0.007 (the reference's init)."""
    head = Linear(hidden, 2, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-5.0)
    return head


def halting_logits(head: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> (B, 2) fp32 [halt, continue], read from the first position."""
    return head(y[:, 0]).float()


def start_vector(hidden: int) -> torch.Tensor:
    """A fixed random start state (D,) drawn truncated-normal with std 1, as the reference draws
    H_init and L_init. Register it as a buffer: saved with the model, moved with it, never trained."""
    return trunc_normal_(torch.empty(hidden), 1.0)


def start_state(vector: torch.Tensor, batch_size: int, positions: int) -> torch.Tensor:
    """A start vector (D,) at every position of every slot: (B, S, D), its own memory (the
    carry writes into it row by row)."""
    return vector.expand(batch_size, positions, vector.shape[-1]).contiguous()


def block_flops(seq_len: int, hidden: int, expansion: float, mlp_t: bool = False) -> float:
    """Forward FLOPs of one block for one example: 2 S (4 D^2 + 3 D I(D)) + 4 S^2 D.

    With mlp_t the token SwiGLU runs over D rows of length S: 2 S (3 D I(S)) replaces the
    projections' 2 S 4 D^2, and there is no S^2 attention term. (The literal reading "replace
    4 D^2 by 3 S I(S)" is only right when S = D; this form is the one that reproduces the
    reference's 2.1e18 for a whole TRM-MLP Sudoku run.)
    """
    S, D = seq_len, hidden
    mlp = 3 * D * swiglu_size(D, expansion)
    if mlp_t:
        return 2.0 * S * (3 * D * swiglu_size(S, expansion) + mlp)
    return 2.0 * S * (4 * D * D + mlp) + 4.0 * S * S * D


POS_ENCODINGS = ("rope", "learned", "none")


def check_shape_config(config) -> None:
    """Checks shared by the backbone configs; raises ValueError naming the field."""
    c = config
    if c.hidden_size <= 0 or c.num_heads <= 0:
        raise ValueError(f"hidden_size ({c.hidden_size}) and num_heads ({c.num_heads}) must be positive")
    if c.hidden_size % c.num_heads:
        raise ValueError(f"hidden_size ({c.hidden_size}) must be divisible by num_heads ({c.num_heads})")
    if c.pos_encodings not in POS_ENCODINGS:
        raise ValueError(f"pos_encodings must be one of {', '.join(POS_ENCODINGS)}, got {c.pos_encodings!r}")
    if c.pos_encodings == "rope" and (c.hidden_size // c.num_heads) % 2:
        raise ValueError(f"rope needs an even head size; hidden_size/num_heads = {c.hidden_size // c.num_heads}")
    if c.expansion <= 0:
        raise ValueError(f"expansion must be positive, got {c.expansion}")
    if c.T < 1 or c.n < 1:
        raise ValueError(f"T (cycles, got {c.T}) and n (z-updates per cycle, got {c.n}) must be >= 1")
    if c.puzzle_emb_ndim < 0 or c.puzzle_emb_len < 0:
        raise ValueError("puzzle_emb_ndim and puzzle_emb_len must be >= 0")
    if c.puzzle_emb_len and c.puzzle_emb_ndim > c.puzzle_emb_len * c.hidden_size:
        raise ValueError(
            f"puzzle_emb_ndim ({c.puzzle_emb_ndim}) does not fit in puzzle_emb_len ({c.puzzle_emb_len}) "
            f"positions of hidden_size ({c.hidden_size}); raise puzzle_emb_len or set it to 0 (automatic)"
        )


def prefix_length(puzzle_emb_ndim: int, puzzle_emb_len: int, hidden: int) -> int:
    """P: the configured length, or (when 0) as many positions as the puzzle vector needs."""
    return puzzle_emb_len if puzzle_emb_len else -(-puzzle_emb_ndim // hidden)
