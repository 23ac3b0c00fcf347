"""Record golden traces of the official TRM, DIS and HRM code, for tests/test_golden.py.

The official code is run from checkouts whose paths are arguments; nothing of it is copied into
dis. Each trace runs the official *training loop* (its own `train_batch`: forward over the carry,
loss head, `(loss / global_batch).backward()`, learning-rate schedule, sign-SGD on the puzzle
table, AdamW) on CPU in fp32 at a tiny size, on batches drawn here, and records per step: the
batch offered, which slots were refilled, the inputs the model saw, the per-step targets (DIS),
logits, q-logits, loss and gradient norm; plus the initial weights and the weights after 12
optimizer steps and at the end. dis then replays the same data through its own Trainer and must
reproduce every number (docs/concepts.md, "Fidelity").

    python benchmarks/parity/make_golden.py \
        --trm ../TinyRecursiveModels --dis ../Deep-Improvement-Supervision --out tests/golden

Checkouts used for the committed fixtures: TinyRecursiveModels e7b6871, Deep-Improvement-
Supervision 032f116 (each fixture's `source` names the repository and a hash of its Python
files, so two checkouts of the same code in any folder, with or without git, write the same
bytes). The official code needs `pydantic` and `einops` (both pure Python); its other imports
(wandb, hydra, the CUDA adam-atan2, ...) are not used by the code paths run here and are stubbed.

Each fixture also stores a canary (tests/golden_canary.py): the loop's torch kernels on fixed
inputs at the fixture's shapes. The golden test demands bit-identical replays only on a machine
whose canary matches, and a rounding-level budget elsewhere.

The traces: `dis_compact` and `trm_act` (4x4 grids, D 16, d_h 8), `hrm_forward`, and the wider
`dis_wide_ema` and `trm_wide_ema` (batches of 8 on 7x7 grids = 49 positions plus a 2-position puzzle prefix,
D 32 with d_h 16, where the two RoPE frequency formulas part; the official EMA at rate 0.99).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

from official import prepare, use_repo

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from golden_canary import canary  # noqa: E402

# The tiny shape of most traces: a 4x4 "ARC-like" grid (PAD 0, EOS 1, colours 2..5); the wide
# traces use batches of 8 on a 7x7 grid, D 32 and a puzzle vector that spills into the second
# prefix position.
BATCH, SIDE, VOCAB, NUM_IDS = 4, 4, 6, 7
HIDDEN, HEADS, EXPANSION, PUZZLE_NDIM, PUZZLE_LEN = 16, 2, 4.0, 16, 2
# 8 x 49 answer positions: past the size where decoding only the answer positions sums the
# lm_head weight gradient in another order than decoding all and slicing (the reference).
WIDE = dict(batch=8, side=7, hidden_size=32, num_heads=2, puzzle_emb_ndim=48)
EMA_RATE = 0.99  # faster than the recipes' 0.999, so that a dozen steps move the shadow
LR, EMB_LR, WD, WARMUP = 1e-3, 1e-2, 0.1, 3
REPOS = {"trm": "SamsungSAILMontreal/TinyRecursiveModels", "dis": "machinestein/Deep-Improvement-Supervision"}


def make_batch(rng: np.random.Generator, side: int = SIDE, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """B examples on a side x side canvas: a random h x w input region, a random output region
    with an EOS border where it fits, PAD (label IGNORE) elsewhere; as the official loader hands
    them over (int32, IGNORE = -100 already applied)."""
    inputs = np.zeros((batch, side, side), dtype=np.int32)
    labels = np.full((batch, side, side), -100, dtype=np.int32)
    for b in range(batch):
        h, w = rng.integers(1, side, size=2)
        inputs[b, :h, :w] = rng.integers(2, VOCAB, size=(h, w))
        oh, ow = rng.integers(1, side, size=2)
        labels[b, :oh, :ow] = rng.integers(2, VOCAB, size=(oh, ow))
        labels[b, oh, : ow] = 1
        labels[b, : oh, ow] = 1
    return {
        "inputs": torch.from_numpy(inputs.reshape(batch, side * side)),
        "labels": torch.from_numpy(labels.reshape(batch, side * side)),
        "puzzle_identifiers": torch.from_numpy(rng.integers(1, NUM_IDS, size=batch).astype(np.int32)),
    }


def arch(batch: int = BATCH, side: int = SIDE, hidden_size: int = HIDDEN, num_heads: int = HEADS, puzzle_emb_ndim: int = PUZZLE_NDIM, **extra) -> dict:
    return dict(
        batch_size=batch, seq_len=side * side, vocab_size=VOCAB, num_puzzle_identifiers=NUM_IDS,
        puzzle_emb_ndim=puzzle_emb_ndim, hidden_size=hidden_size, num_heads=num_heads, expansion=EXPANSION,
        pos_encodings="rope", forward_dtype="float32", H_layers=0, L_layers=1, causal=False, **extra,
    )


def source_id(name: str, repo: Path) -> str:
    """The repository's name and a hash of its Python files: the same for any checkout of the
    same code, wherever it lies and whether or not it is a git clone."""
    digest = hashlib.sha256()
    for path in sorted(repo.rglob("*.py")):
        if ".git" in path.parts:
            continue
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{REPOS[name]} (python files sha256 {digest.hexdigest()[:16]})"


def canary_for(cfg: dict) -> dict[str, torch.Tensor]:
    prefix = cfg.get("puzzle_emb_len") or -(-cfg["puzzle_emb_ndim"] // cfg["hidden_size"])
    return canary(batch=cfg["batch_size"], seq_len=cfg["seq_len"] + prefix, hidden=cfg["hidden_size"],
                  heads=cfg["num_heads"], expansion=cfg["expansion"], vocab=cfg["vocab_size"])


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def trace_loop(model, train_batch, steps: int, seed: int, has_path: bool, side: int = SIDE, batch: int = BATCH, ema: bool = False) -> dict:
    """Run the official `train_batch` for `steps` optimizer steps and record everything; with
    `ema`, the official EMA helper updates after every step as the official loops do."""
    from models.ema import EMAHelper
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed

    inner = model.model.inner
    sign_sgd = CastedSparseEmbeddingSignSGD_Distributed(model.model.puzzle_emb.buffers(), lr=0, weight_decay=WD, world_size=1)
    adamw = torch.optim.AdamW(model.parameters(), lr=0, weight_decay=WD, betas=(0.9, 0.95))
    # Gradient norm over the dense parameters, read just before AdamW steps.
    grad_norms: list[float] = []
    adamw_step = adamw.step

    def step_and_record(*args, **kwargs):
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        grad_norms.append(float(torch.cat(grads).double().norm()))
        return adamw_step(*args, **kwargs)

    adamw.step = step_and_record
    captured: dict[str, torch.Tensor] = {}
    inner.lm_head.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o[:, inner.puzzle_emb_len :].detach().clone()))
    inner.q_head.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o.detach().float().clone()))
    model.register_forward_hook(lambda m, i, o: captured.__setitem__("loss", o[1].detach().clone()))

    rng = np.random.default_rng(seed)
    first = make_batch(rng, side, batch)
    ema_helper = None
    if ema:
        ema_helper = EMAHelper(mu=EMA_RATE)
        ema_helper.register(model)
    state_cls = types.SimpleNamespace
    state = state_cls(
        model=model, optimizers=[sign_sgd, adamw], optimizer_lrs=[EMB_LR, LR], carry=model.initial_carry(first),
        step=0, total_steps=10**6,
    )
    config = types.SimpleNamespace(lr_warmup_steps=WARMUP, lr_min_ratio=1.0)
    record = {"initial": clone_state(model.model), "steps": []}
    data = first
    for t in range(1, steps + 1):
        if t > 1:
            data = make_batch(rng, side, batch)
        halted = state.carry.halted.clone()
        train_batch(config, state, data, global_batch_size=batch, rank=0, world_size=1)
        if ema_helper is not None:
            ema_helper.update(model)
        carry = state.carry
        row = {
            "offered": {k: v.clone() for k, v in data.items()},
            "refilled": halted,
            "inputs_seen": carry.current_data["inputs"].clone(),
            "logits": captured["logits"],
            "q_logits": captured["q"],
            "loss_sum": captured["loss"],  # summed over the batch, before the 1/B scale
            "grad_norm": grad_norms[-1],
            "halted_after": carry.halted.clone(),
            "steps_after": carry.steps.clone(),
        }
        if has_path:
            row["path"] = carry.intermediate_labels_path.clone()  # (B, N+1, L): frame 0 = x
        record["steps"].append(row)
        if t == 12 and steps > 12:
            record["weights_12"] = clone_state(model.model)
    record["final"] = clone_state(model.model)  # == the weights after 12 steps when steps == 12
    if ema_helper is not None:
        # Keyed like `final` (the loss head's `model.` prefix dropped).
        record["ema_final"] = {k.removeprefix("model."): v.clone() for k, v in ema_helper.shadow.items()}
    return record


def trace_dis(repo: Path, seed: int, wide: bool = False) -> dict:
    """DIS as the official compact recipe runs it: ACTV5 + ACTLossHeadV4 (reveal path, fixed
    N_sup steps, step embedding, self-fed argmax inputs), puzzle prefix + sign-SGD, AdamW; the
    wide trace on 7x7 grids at d_h 16, with EMA, over four fills."""
    use_repo(repo)
    from models.losses import ACTLossHeadV4
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV5
    from train_arc_tiny_corrupt import train_batch

    torch.manual_seed(seed)
    shape = WIDE if wide else {}
    cfg = arch(**shape, H_cycles=1, L_cycles=2, halt_max_steps=6, N_supervision=6, halt_exploration_prob=0.1, puzzle_emb_len=PUZZLE_LEN)
    model = ACTLossHeadV4(TinyRecursiveReasoningModel_ACTV5(cfg), loss_type="stablemax_cross_entropy")
    rec = trace_loop(model, train_batch, steps=24 if wide else 18, seed=seed, has_path=True, side=shape.get("side", SIDE),
                     batch=shape.get("batch", BATCH), ema=wide)
    return {"kind": "dis", "config": cfg, "n_sup": 6, "ema": EMA_RATE if wide else 0.0, **rec}


def trace_trm(repo: Path, seed: int, wide: bool = False) -> dict:
    """TRM: ACTV1 + ACTLossHead (final targets, Q-head halting, the question at every step),
    T = 2 (one no-grad cycle), exploration off so that halting is deterministic; the wide trace
    on 7x7 grids at d_h 16, with EMA."""
    use_repo(repo)
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
    from pretrain import train_batch

    torch.manual_seed(seed)
    shape = WIDE if wide else {}
    cfg = arch(**shape, H_cycles=2, L_cycles=2, halt_max_steps=4, halt_exploration_prob=0.0, puzzle_emb_len=PUZZLE_LEN, no_ACT_continue=True)
    model = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), loss_type="stablemax_cross_entropy")
    rec = trace_loop(model, train_batch, steps=16 if wide else 12, seed=seed, has_path=False, side=shape.get("side", SIDE),
                     batch=shape.get("batch", BATCH), ema=wide)
    return {"kind": "trm", "config": cfg, "n_sup": 4, "ema": EMA_RATE if wide else 0.0, **rec}


def trace_hrm(repo: Path, seed: int) -> dict:
    """HRM (the TRM repository's SDPA port): one forward from the reset carry, and the
    gradients of the summed stablemax loss (the one-step gradient)."""
    use_repo(repo)
    from models.losses import stablemax_cross_entropy
    from models.recursive_reasoning.hrm import HierarchicalReasoningModel_ACTV1

    torch.manual_seed(seed)
    cfg = arch(H_cycles=2, L_cycles=2, halt_max_steps=4, halt_exploration_prob=0.0)
    cfg["H_layers"], cfg["L_layers"] = 1, 1
    model = HierarchicalReasoningModel_ACTV1(cfg)
    model.train()
    batch = make_batch(np.random.default_rng(seed))
    initial = clone_state(model)
    carry = model.initial_carry(batch)
    _, out = model(carry, batch)
    labels = batch["labels"]
    mask = labels != -100
    loss = (stablemax_cross_entropy(out["logits"], labels, valid_mask=mask) / mask.sum(-1, keepdim=True).clamp_min(1)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    emb = model.inner.puzzle_emb.local_weights.grad.detach().clone()
    return {
        "kind": "hrm", "config": cfg, "initial": initial, "batch": batch, "logits": out["logits"].detach(),
        "q_logits": torch.stack([out["q_halt_logits"], out["q_continue_logits"]], -1).detach(),
        "loss_sum": loss.detach(), "grads": grads, "puzzle_emb_grad": emb,
    }


TRACES = {
    "dis_compact": ("dis", trace_dis, {}),
    "trm_act": ("trm", trace_trm, {}),
    "hrm_forward": ("trm", trace_hrm, {}),
    "dis_wide_ema": ("dis", trace_dis, {"wide": True}),
    "trm_wide_ema": ("trm", trace_trm, {"wide": True}),
}


def record_all(trm: Path, dis: Path, out: Path, seed: int = 0) -> list[Path]:
    """Write every trace into `out`; the opt-in test of tests/test_golden.py calls this too."""
    prepare()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    repos = {"trm": trm, "dis": dis}
    written = []
    try:
        for name, (repo_key, fn, kwargs) in TRACES.items():
            rec = fn(repos[repo_key], seed, **kwargs)
            rec["source"] = source_id(repo_key, repos[repo_key])
            rec["canary"] = canary_for(rec["config"])
            path = out / f"{name}.pt"
            torch.save(rec, path)
            written.append(path)
    finally:
        torch.set_num_threads(threads)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trm", type=Path, required=True, help="checkout of SamsungSAILMontreal/TinyRecursiveModels")
    ap.add_argument("--dis", type=Path, required=True, help="checkout of machinestein/Deep-Improvement-Supervision")
    ap.add_argument("--out", type=Path, default=Path("tests/golden"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for path in record_all(args.trm, args.dis, args.out, args.seed):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
