"""Backbones `trm` and `hrm`: parameter counts against the reference formulas, parity with an
independent plain-torch formulation, gradient scope, embeddings and the Backbone protocol."""

from __future__ import annotations

import math

import pytest
import torch

from dis_core.contract.interfaces import Backbone, BuildContext, TaskSpec
from dis_plugins.backbones import hrm as hrm_mod
from dis_plugins.backbones import trm as trm_mod
from dis_plugins.backbones.hrm import HRMConfig, build_hrm
from dis_plugins.backbones.layers import swiglu_size, trunc_normal_
from dis_plugins.backbones.trm import TRMConfig, build_trm


def ctx_for(tmp_path, vocab, seq_len, n_sup=6):
    spec = TaskSpec(vocab_size=vocab, seq_len=seq_len)
    return BuildContext(seed=0, n_sup=n_sup, data_dir=tmp_path, spec=spec)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- parameter counts (docs/reference.md#parameter-count), built on the meta device: no memory, no init


MEDIUM = dict(hidden_size=512, num_layers=2, num_heads=8)  # TRM's D 512, 2 layers
ARC = dict(MEDIUM, puzzle_emb_ndim=512, puzzle_emb_len=16)
COMPACT = dict(hidden_size=256, num_layers=1, num_heads=8, puzzle_emb_ndim=256, puzzle_emb_len=16)


@pytest.mark.parametrize(
    "config, vocab, seq_len, n_sup, expected",
    [
        (TRMConfig(**ARC), 12, 900, 16, 6_829_058),  # TRM-Att ARC (= TRM-medium)
        (TRMConfig(**COMPACT), 12, 900, 16, 858_626),  # TRM-compact
        (TRMConfig(**COMPACT, step_embedding=True), 12, 900, 6, 860_674),  # DIS-compact
        (TRMConfig(**ARC, step_embedding=True), 12, 900, 6, 6_833_154),  # DIS-medium
        (TRMConfig(**MEDIUM, step_embedding=True), 3, 64, 8, 6_824_962),  # N-Queens DIS
        (TRMConfig(**MEDIUM), 3, 64, 16, 6_819_842),  # N-Queens TRM
        # TRM-MLP Sudoku: S = 81 + 16 = 97, I(97) = 512
        (TRMConfig(**ARC, mlp_t=True, pos_encodings="none"), 11, 81, 16, 5_028_866),
        # HRM Sudoku: 4 + 4 blocks, P = 1
        (HRMConfig(hidden_size=512, num_heads=8, H_layers=4, L_layers=4, puzzle_emb_ndim=512), 11, 81, 16, 27_275_266),
    ],
)
def test_parameter_counts_match_reference(tmp_path, config, vocab, seq_len, n_sup, expected):
    build = build_hrm if isinstance(config, HRMConfig) else build_trm
    with torch.device("meta"):
        model = build(config, ctx_for(tmp_path, vocab, seq_len, n_sup))
    assert n_params(model) == expected
    # The init vectors are buffers: saved, never trained, not counted (docs/reference.md#states-and-heads).
    assert {"H_init", "L_init"} <= set(model.state_dict())
    assert "H_init" not in dict(model.named_parameters())


def test_learned_positions_add_s_times_d(tmp_path):
    with torch.device("meta"):
        base, learned = (
            build_trm(TRMConfig(hidden_size=64, num_heads=2, pos_encodings=pos, puzzle_emb_ndim=64, puzzle_emb_len=3),
                      ctx_for(tmp_path, 5, 10))
            for pos in ("none", "learned")
        )
    assert n_params(learned) - n_params(base) == 13 * 64


def test_swiglu_sizes():
    assert [swiglu_size(h, 4) for h in (512, 256, 97, 916, 901, 128)] == [1536, 768, 512, 2560, 2560, 512]


def test_trunc_normal_has_target_std_and_cut():
    torch.manual_seed(0)
    w = trunc_normal_(torch.empty(200_000), 0.5)
    assert abs(w.std().item() - 0.5) < 0.005
    assert w.abs().max().item() <= 2 * 0.5 / 0.8796 + 1e-6  # cut at 2 std of the underlying normal
    assert torch.count_nonzero(trunc_normal_(torch.empty(10), 0.0)) == 0


# --- an independent plain-torch formulation of TRM (manual rope, softmax attention, rmsnorm)


def _rms(x, dim=-1):
    return x / torch.sqrt((x * x).mean(dim, keepdim=True) + 1e-5)


def _swiglu(x, w_gate_up, w_down):
    inner = w_gate_up.shape[0] // 2
    gate, up = x @ w_gate_up[:inner].T, x @ w_gate_up[inner:].T
    return (gate / (1 + torch.exp(-gate)) * up) @ w_down.T


def _rope(x, theta):
    # x (B, S, H, d): pairs (i, i + d/2) rotated by angle pos * theta^(-2i/d).
    B, S, H, d = x.shape
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        freq = theta ** (-2.0 * i / d)
        ang = torch.arange(S, dtype=torch.float64) * freq
        c, s = torch.cos(ang).float()[None, :, None], torch.sin(ang).float()[None, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def _attention(x, w_qkv, w_out, heads, rope_theta):
    B, S, D = x.shape
    d = D // heads
    q, k, v = (x @ w_qkv[j * D : (j + 1) * D].T for j in range(3))
    q, k, v = (t.reshape(B, S, heads, d) for t in (q, k, v))
    if rope_theta is not None:
        q, k = _rope(q, rope_theta), _rope(k, rope_theta)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, S, D) @ w_out.T


def reference_trm(w, c: TRMConfig, P, n_sup, state, tokens, step, puzzle):
    D = c.hidden_size
    x = w["embed.tokens.weight"][tokens]
    if P:
        vec = torch.zeros(tokens.shape[0], P * D)
        vec[:, : puzzle.shape[1]] = puzzle
        x = torch.cat([vec.reshape(-1, P, D), x], dim=1)
    if c.step_embedding:
        x = x + w["embed.step.weight"][torch.minimum(step, torch.tensor(n_sup))][:, None]
    if c.pos_encodings == "learned":
        x = (x + w["embed.pos.weight"]) / math.sqrt(2)
    x = x * math.sqrt(D)

    def net(h, inj):
        h = h + inj
        for i in range(c.num_layers):
            b = f"net.blocks.{i}."
            if c.mlp_t:
                t = h.transpose(1, 2)
                h = _rms(t + _swiglu(t, w[b + "token_mlp.gate_up.weight"], w[b + "token_mlp.down.weight"])).transpose(1, 2)
            else:
                theta = c.rope_theta if c.pos_encodings == "rope" else None
                h = _rms(h + _attention(h, w[b + "attn.qkv.weight"], w[b + "attn.out.weight"], c.num_heads, theta))
            h = _rms(h + _swiglu(h, w[b + "mlp.gate_up.weight"], w[b + "mlp.down.weight"]))
        return h

    y, z = state
    for _ in range(c.T):
        for _ in range(c.n):
            z = net(z, y + x)
        y = net(y, z)
    logits = y[:, P:] @ w["lm_head.weight"].T
    q = y[:, 0] @ w["q_head.weight"].T + w["q_head.bias"]
    return y, z, logits, q


TINY = dict(hidden_size=32, num_heads=2, num_layers=2, T=2, n=2, rope_theta=100.0)


@pytest.mark.parametrize(
    "extra",
    [
        dict(pos_encodings="rope", step_embedding=True, puzzle_emb_ndim=40, puzzle_emb_len=4),
        dict(pos_encodings="learned", puzzle_emb_ndim=32),
        dict(pos_encodings="none", mlp_t=True, step_embedding=True, puzzle_emb_ndim=32, puzzle_emb_len=2),
    ],
    ids=["rope-step-prefix4", "learned-prefix1", "mlp_t"],
)
def test_trm_matches_plain_torch_formulation(tmp_path, extra):
    torch.manual_seed(0)
    c = TRMConfig(**TINY, **extra)
    model = build_trm(c, ctx_for(tmp_path, vocab=5, seq_len=16, n_sup=4))
    with torch.no_grad():  # give the q head weights so its parity means something
        model.q_head.weight.normal_()
    B, P = 3, model.prefix_len
    tokens = torch.randint(0, 5, (B, 16))
    step = torch.tensor([1, 3, 7])  # 7 > n_sup: clamped to n_sup
    puzzle = torch.randn(B, c.puzzle_emb_ndim)
    y0, z0 = model.initial_state(B)
    y0 = y0 + 0.1 * torch.randn_like(y0)  # a carried state, not only the init vectors
    (y, z), logits, q = model((y0, z0), tokens, step, puzzle)
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ry, rz, rlogits, rq = reference_trm(w, c, P, 4, (y0, z0), tokens, step, puzzle)
    assert y.shape == z.shape == (B, 16 + P, 32)
    torch.testing.assert_close(z, rz, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, rlogits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, rq, atol=1e-5, rtol=1e-5)


# --- gradient scope


def _tiny_trm(tmp_path, **kw):
    torch.manual_seed(0)
    return build_trm(TRMConfig(**{**TINY, **kw}), ctx_for(tmp_path, vocab=5, seq_len=12))


def _grads(model):
    return {k: (p.grad.clone() if p.grad is not None else None) for k, p in model.named_parameters()}


def _without_gradient(model, grads) -> set[str]:
    """Names of the parameters `grads` gives no gradient, or an all-zero one."""
    return {k for k, g in grads.items() if g is None or not g.abs().sum() > 0}


def _q_head_names(model) -> set[str]:
    return {k for k, p in model.named_parameters() if any(p is q for q in model.q_head.parameters())}


def test_trm_gradient_reaches_only_the_last_cycle(tmp_path):
    model = _tiny_trm(tmp_path, T=3)
    tokens, step = torch.randint(0, 5, (2, 12)), torch.ones(2, dtype=torch.long)
    y0, z0 = model.initial_state(2)
    y0.requires_grad_(True)
    z0.requires_grad_(True)
    (y, z), logits, _ = model((y0, z0), tokens, step)
    (logits.square().sum() + y.sum() + z.sum()).backward()
    # The carried state enters only through the no-grad cycles.
    assert y0.grad is None and z0.grad is None
    full = _grads(model)

    # The same weights run the first two cycles by hand, then one cycle with grad.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        x = model.embed(tokens, step, None)
        y1, z1 = model._cycle(*model._cycle(y0, z0, x), x)
    model.T = 1
    (y, z), logits, _ = model((y1, z1), tokens, step)
    (logits.square().sum() + y.sum() + z.sum()).backward()
    last = _grads(model)
    for k in full:
        torch.testing.assert_close(full[k], last[k], msg=k)
    # Every weight the last cycle and the heads use learns; the q-head alone gets nothing (q was
    # not in the loss).
    assert _without_gradient(model, full) == _q_head_names(model)
    assert all(full[k] is None for k in _q_head_names(model))


def test_hrm_one_step_gradient(tmp_path):
    torch.manual_seed(0)
    cfg = HRMConfig(hidden_size=32, num_heads=2, H_layers=1, L_layers=2, T=2, n=3)
    model = build_hrm(cfg, ctx_for(tmp_path, vocab=5, seq_len=12))
    assert model.calls_per_step() == (2 * 3 + 2, 2)
    tokens, step = torch.randint(0, 5, (2, 12)), torch.ones(2, dtype=torch.long)
    y0, z0 = model.initial_state(2)
    (y, z), logits, q = model((y0, z0), tokens, step)
    assert logits.shape == (2, 12, 5) and q.dtype == torch.float32
    logits.square().sum().backward()
    full = _grads(model)

    # By hand: 5 no-grad L-updates and 1 H-update, then one L and one H with grad.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        x = model.embed(tokens, step, None)
        yy, zz = y0, z0
        for _ in range(3):
            zz = model.L(zz, yy + x)
        yy = model.H(yy, zz)
        for _ in range(2):
            zz = model.L(zz, yy + x)
    x = model.embed(tokens, step, None)
    zz = model.L(zz, yy + x)
    yy = model.H(yy, zz)
    torch.testing.assert_close(yy, y)
    torch.testing.assert_close(zz, z)
    model.lm_head(yy).square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(full[k], g, msg=k)
    assert _without_gradient(model, full) == _q_head_names(model)  # both modules learn, the q-head not


# --- embeddings, protocol, config checks


def test_protocol_shapes_and_heads(tmp_path):
    model = _tiny_trm(tmp_path, puzzle_emb_ndim=32, puzzle_emb_len=3, step_embedding=True)
    assert isinstance(model, Backbone)
    assert (model.hidden_size, model.prefix_len, model.puzzle_emb_ndim) == (32, 3, 32)
    y0, z0 = model.initial_state(4)
    assert y0.shape == z0.shape == (4, 15, 32)
    assert torch.equal(y0[2, 7], model.H_init) and torch.equal(z0[1, 0], model.L_init)
    (y, z), logits, q = model((y0, z0), torch.randint(0, 5, (4, 12)), torch.ones(4, dtype=torch.long), torch.randn(4, 32))
    assert logits.shape == (4, 12, 5) and q.shape == (4, 2)
    # q head: weight 0 and bias -5, so the first halting probabilities are sigmoid(-5), as in the
    # reference (docs/reference.md#states-and-heads)
    assert q.dtype == torch.float32 and torch.all(q == -5.0)
    assert y.requires_grad and z.requires_grad  # not detached: the trainer does that
    assert model.calls_per_step() == (2 * 3, 3)


def test_flops_per_call(tmp_path):
    model = _tiny_trm(tmp_path)
    S, D, I = 12, 32, swiglu_size(32, 4)
    assert model.flops_per_call(S) == 2 * (2 * S * (4 * D * D + 3 * D * I) + 4 * S * S * D)
    mlp = _tiny_trm(tmp_path, mlp_t=True, pos_encodings="none")
    assert mlp.flops_per_call(S) == 2 * (2 * S * (3 * D * swiglu_size(S, 4) + 3 * D * I))
    torch.manual_seed(0)
    h = build_hrm(HRMConfig(hidden_size=32, num_heads=2, H_layers=2, L_layers=2), ctx_for(tmp_path, 5, 12))
    assert h.flops_per_call(S) == model.flops_per_call(S)


def test_step_embedding_is_used_and_clamped(tmp_path):
    model = _tiny_trm(tmp_path, step_embedding=True, T=1)
    tokens = torch.randint(0, 5, (1, 12)).expand(3, 12)
    state = model.initial_state(3)
    with torch.no_grad():
        _, logits, _ = model(state, tokens, torch.tensor([1, 6, 9]))  # n_sup = 6: 9 -> 6
    assert not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(logits[1], logits[2])
    # N_sup + 2 rows, as in the reference (docs/reference.md#dis-step-embedding)
    assert model.embed.step.num_embeddings == 6 + 2
    plain = _tiny_trm(tmp_path, T=1)
    with torch.no_grad():
        _, logits, _ = plain(plain.initial_state(3), tokens, torch.tensor([1, 6, 9]))
    torch.testing.assert_close(logits[0], logits[1])


def test_puzzle_prefix(tmp_path):
    model = _tiny_trm(tmp_path, puzzle_emb_ndim=40, T=1)  # len 0 -> ceil(40/32) = 2
    assert model.prefix_len == 2
    tokens, step = torch.randint(0, 5, (2, 12)), torch.ones(2, dtype=torch.long)
    x = model.embed(tokens, step, torch.ones(2, 40))
    assert x.shape == (2, 14, 32)
    scale = math.sqrt(32)
    torch.testing.assert_close(x[:, 0], torch.full((2, 32), scale))  # whole first position
    torch.testing.assert_close(x[:, 1, :8], torch.full((2, 8), scale))  # 8 spill into the second
    assert torch.all(x[:, 1, 8:] == 0)  # zero padding
    torch.testing.assert_close(x[:, 2:], model.embed.tokens(tokens) * scale)
    # A missing vector is a zero vector; a different vector changes the answer.
    torch.testing.assert_close(model.embed(tokens, step, None), model.embed(tokens, step, torch.zeros(2, 40)))
    state = model.initial_state(2)
    with torch.no_grad():
        a = model(state, tokens, step, torch.zeros(2, 40))[1]
        b = model(state, tokens, step, torch.randn(2, 40))[1]
    assert not torch.allclose(a, b)
    # The trainer's sparse table learns from the gradient on the looked-up rows.
    vec = torch.randn(2, 40, requires_grad=True)
    model(state, tokens, step, vec)[1].square().sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="puzzle_emb has shape"):
        model(state, tokens, step, torch.zeros(2, 32))


def test_determinism(tmp_path):
    a, b = _tiny_trm(tmp_path), _tiny_trm(tmp_path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    tokens, step = torch.randint(0, 5, (2, 12)), torch.ones(2, dtype=torch.long)
    out1 = a(a.initial_state(2), tokens, step)[1]
    out2 = a(a.initial_state(2), tokens, step)[1]
    assert torch.equal(out1, out2)


def test_runs_in_parameter_dtype(tmp_path):
    model = _tiny_trm(tmp_path, T=1).to(torch.bfloat16)
    y0, z0 = model.initial_state(2)
    assert y0.dtype == torch.bfloat16
    (y, _), logits, q = model((y0, z0), torch.randint(0, 5, (2, 12)), torch.ones(2, dtype=torch.long))
    assert y.dtype == logits.dtype == torch.bfloat16 and q.dtype == torch.float32
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(pos_encodings="alibi"), "pos_encodings must be one of"),
        (dict(mlp_t=True), "mlp_t has no attention"),
        (dict(puzzle_emb_ndim=1000, puzzle_emb_len=1), "does not fit"),
        (dict(T=0), "must be >= 1"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        TRMConfig(**kw)


def test_hrm_config_errors():
    with pytest.raises(ValueError, match="H_layers"):
        HRMConfig(H_layers=0)


def test_registration():
    seen = {}
    for mod in (trm_mod, hrm_mod):
        mod.register_backbones(register=lambda name, cls, factory: seen.setdefault(name, (cls, factory)))
    assert seen == {"trm": (TRMConfig, build_trm), "hrm": (HRMConfig, build_hrm)}


def test_bf16_attention_on_cpu_takes_the_math_path_and_agrees_with_the_fused_kernel():
    """bf16 on a CPU runs attention through the math path (faster at short sequences); it must
    compute the same attention as the fused kernel up to bf16 rounding, and fp32 must keep the
    fused kernel (the golden traces pin it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dis_plugins.backbones.layers import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=g) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attend(q, k, v), exact)  # fp32: the fused kernel, bit for bit
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(got, torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()))
    assert (got.float() - exact).abs().max() < 0.05  # bf16 inputs: ~3 significant digits
