"""The golden traces' canary: does this machine round like the one that recorded the fixtures?

fp32 results are not bit-identical across CPU kinds (an AMX Xeon and an AVX512 EPYC pick other
matmul and vector-math kernels, and torch's capability string does not say which), so the
golden test may demand a difference of 0.0 only where that is proven. The proof is this
function: the same torch ops the training loop runs (truncated-normal initialisation, linear
forward and backward, rotary tables, SDPA forward and backward, RMSNorm, SwiGLU, the float64
stablemax loss, AdamW, sign-SGD, the EMA's products) at the fixture's own shapes, on fixed
inputs, with one thread. make_golden.py stores its output in each fixture; tests/test_golden.py
recomputes it and replays bit for bit only when every tensor is equal here.

It uses torch alone (no dis, no official code): a change in dis can never make it match.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F


def canary(*, batch: int, seq_len: int, hidden: int, heads: int, expansion: float, vocab: int) -> dict[str, str]:
    """Fingerprints (dtype, shape, sha256 of the bytes) of the loop's kernels' outputs on fixed
    inputs at these shapes (seq_len counts the prefix). Bit-exactness needs no more than a hash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures are recorded and replayed with one thread
    try:
        outputs = _run(batch, seq_len, hidden, heads, expansion, vocab)
    finally:
        torch.set_num_threads(threads)
    return {k: fingerprint(v) for k, v in outputs.items()}


def fingerprint(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return f"{t.dtype} {tuple(t.shape)} {hashlib.sha256(t.numpy().tobytes()).hexdigest()[:32]}"


def _run(B: int, S: int, D: int, H: int, expansion: float, V: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20251120)
    d_h = D // H
    inter = 256 * math.ceil(round(expansion * D * 2 / 3) / 256)  # the SwiGLU width rule
    out: dict[str, torch.Tensor] = {}

    def init(*shape: int, std: float) -> torch.Tensor:
        # uniform -> erfinv -> scale -> clamp: the truncated-normal initialisation's kernels
        t = torch.empty(*shape).uniform_(-0.95, 0.95, generator=g).erfinv_().mul_(math.sqrt(2) * std)
        return t.clamp_(-2 * std, 2 * std)

    w_qkv = init(3 * D, D, std=D**-0.5).requires_grad_()
    w_o = init(D, D, std=D**-0.5).requires_grad_()
    w_gu = init(2 * inter, D, std=D**-0.5).requires_grad_()
    w_down = init(D, inter, std=inter**-0.5).requires_grad_()
    w_lm = init(V, D, std=D**-0.5).requires_grad_()
    out["init"] = w_qkv.detach().clone()
    x = torch.randn(B, S, D, generator=g).requires_grad_()

    def rms(h: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5)

    # Rotary tables: pow, outer, cos, sin in fp32; rotate-half.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_h, 2, dtype=torch.float32) / d_h))
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    out["rotary"] = torch.stack((cos, sin))

    def rope(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * cos[:, None] + torch.cat((-b, a), -1) * sin[:, None]

    q, k, v = F.linear(x, w_qkv).view(B, S, 3, H, d_h).unbind(2)  # (B, S, H, d_h) each
    q, k = rope(q), rope(k)
    att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    h = rms(x + F.linear(att.transpose(1, 2).reshape(B, S, D), w_o))
    gate, up = F.linear(h, w_gu).chunk(2, -1)
    h = rms(h + F.linear(F.silu(gate) * up, w_down))
    logits = F.linear(h, w_lm)
    out["logits"] = logits.detach().clone()

    # Stablemax cross-entropy in float64 against fixed labels, summed.
    s64 = logits.double()
    s = torch.where(s64 >= 0, s64 + 1, 1 / (1 - s64 + 1e-30))
    labels = torch.randint(0, V, (B, S), generator=g)
    loss = -(s / s.sum(-1, keepdim=True)).log().gather(-1, labels[..., None]).sum()
    loss.backward()
    out["loss"] = loss.detach()
    params = [w_qkv, w_o, w_gu, w_down, w_lm]
    for i, p in enumerate(params):
        out[f"grad{i}"] = p.grad.clone()
    out["grad_x"] = x.grad.clone()

    # AdamW (torch's, as the adamw plugin builds it), two steps.
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    opt.step()
    opt.step()
    for i, p in enumerate(params):
        out[f"adamw{i}"] = p.detach().clone()

    # Sign-SGD on the rows of a puzzle table, and the EMA's two rounded products.
    table = init(7, D, std=1.0)
    rows = torch.arange(B) % 3 * 2 + 1  # duplicates, as a batch holding one puzzle twice has
    summed = torch.zeros(7, D).index_add_(0, rows, x.grad[:, 0, :].float())
    out["sign_sgd"] = table * (1.0 - 1e-2 * 0.1) - 1e-2 * torch.sign(summed)
    out["ema"] = (1.0 - 0.99) * w_qkv.detach() + 0.99 * out["init"]
    return out


def differing(recorded: dict[str, str], here: dict[str, str]) -> list[str]:
    """The canary outputs that are not bit-identical here (empty: this machine rounds alike)."""
    return sorted(k for k in recorded.keys() | here.keys() if recorded.get(k) != here.get(k))
