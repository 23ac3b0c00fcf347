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
Supervision 032f116. The official code needs `pydantic` and `einops` (both pure Python); its
other imports (wandb, hydra, the CUDA adam-atan2, ...) are not used by the code paths run here
and are stubbed.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

from official import git_head, prepare, use_repo

# The tiny shape shared by all traces: a 4x4 "ARC-like" grid (PAD 0, EOS 1, colours 2..5).
BATCH, SEQ_LEN, VOCAB, NUM_IDS = 4, 16, 6, 7
HIDDEN, HEADS, EXPANSION, PUZZLE_NDIM, PUZZLE_LEN = 16, 2, 4.0, 16, 2
LR, EMB_LR, WD, WARMUP = 1e-3, 1e-2, 0.1, 3

def make_batch(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """B examples on a 4x4 canvas: a random h x w input region, a random output region with an
    EOS border where it fits, PAD (label IGNORE) elsewhere; as the official loader hands them
    over (int32, IGNORE = -100 already applied)."""
    inputs = np.zeros((BATCH, 4, 4), dtype=np.int32)
    labels = np.full((BATCH, 4, 4), -100, dtype=np.int32)
    for b in range(BATCH):
        h, w = rng.integers(1, 4, size=2)
        inputs[b, :h, :w] = rng.integers(2, VOCAB, size=(h, w))
        oh, ow = rng.integers(1, 4, size=2)
        labels[b, :oh, :ow] = rng.integers(2, VOCAB, size=(oh, ow))
        labels[b, oh, : ow] = 1
        labels[b, : oh, ow] = 1
    return {
        "inputs": torch.from_numpy(inputs.reshape(BATCH, SEQ_LEN)),
        "labels": torch.from_numpy(labels.reshape(BATCH, SEQ_LEN)),
        "puzzle_identifiers": torch.from_numpy(rng.integers(1, NUM_IDS, size=BATCH).astype(np.int32)),
    }


def arch(**extra) -> dict:
    return dict(
        batch_size=BATCH, seq_len=SEQ_LEN, vocab_size=VOCAB, num_puzzle_identifiers=NUM_IDS,
        puzzle_emb_ndim=PUZZLE_NDIM, hidden_size=HIDDEN, num_heads=HEADS, expansion=EXPANSION,
        pos_encodings="rope", forward_dtype="float32", H_layers=0, L_layers=1, causal=False, **extra,
    )


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def trace_loop(model, train_batch, steps: int, seed: int, has_path: bool) -> dict:
    """Run the official `train_batch` for `steps` optimizer steps and record everything."""
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
    first = make_batch(rng)
    state_cls = types.SimpleNamespace
    state = state_cls(
        model=model, optimizers=[sign_sgd, adamw], optimizer_lrs=[EMB_LR, LR], carry=model.initial_carry(first),
        step=0, total_steps=10**6,
    )
    config = types.SimpleNamespace(lr_warmup_steps=WARMUP, lr_min_ratio=1.0)
    record = {"initial": clone_state(model.model), "steps": []}
    batch = first
    for t in range(1, steps + 1):
        if t > 1:
            batch = make_batch(rng)
        halted = state.carry.halted.clone()
        train_batch(config, state, batch, global_batch_size=BATCH, rank=0, world_size=1)
        carry = state.carry
        row = {
            "offered": {k: v.clone() for k, v in batch.items()},
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
    return record


def trace_dis(repo: Path, seed: int) -> dict:
    """DIS as the official compact recipe runs it: ACTV5 + ACTLossHeadV4 (reveal path, fixed
    N_sup steps, step embedding, self-fed argmax inputs), puzzle prefix + sign-SGD, AdamW."""
    use_repo(repo)
    from models.losses import ACTLossHeadV4
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV5
    from train_arc_tiny_corrupt import train_batch

    torch.manual_seed(seed)
    cfg = arch(H_cycles=1, L_cycles=2, halt_max_steps=6, N_supervision=6, halt_exploration_prob=0.1, puzzle_emb_len=PUZZLE_LEN)
    model = ACTLossHeadV4(TinyRecursiveReasoningModel_ACTV5(cfg), loss_type="stablemax_cross_entropy")
    rec = trace_loop(model, train_batch, steps=18, seed=seed, has_path=True)
    return {"kind": "dis", "config": cfg, "n_sup": 6, **rec}


def trace_trm(repo: Path, seed: int) -> dict:
    """TRM: ACTV1 + ACTLossHead (final targets, Q-head halting, the question at every step),
    T = 2 (one no-grad cycle), exploration off so that halting is deterministic."""
    use_repo(repo)
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
    from pretrain import train_batch

    torch.manual_seed(seed)
    cfg = arch(H_cycles=2, L_cycles=2, halt_max_steps=4, halt_exploration_prob=0.0, puzzle_emb_len=PUZZLE_LEN, no_ACT_continue=True)
    model = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), loss_type="stablemax_cross_entropy")
    rec = trace_loop(model, train_batch, steps=12, seed=seed, has_path=False)
    return {"kind": "trm", "config": cfg, "n_sup": 4, **rec}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trm", type=Path, required=True, help="checkout of SamsungSAILMontreal/TinyRecursiveModels")
    ap.add_argument("--dis", type=Path, required=True, help="checkout of machinestein/Deep-Improvement-Supervision")
    ap.add_argument("--out", type=Path, default=Path("tests/golden"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn, repo in (("dis_compact", trace_dis, args.dis), ("trm_act", trace_trm, args.trm), ("hrm_forward", trace_hrm, args.trm)):
        rec = fn(repo, args.seed)
        rec["source"] = f"{repo.name}@{git_head(repo)}"
        # Bit-exact replays need the same kernels: the test is strict only on a matching machine.
        rec["machine"] = f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"
        path = args.out / f"{name}.pt"
        torch.save(rec, path)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB from {rec['source']}")


if __name__ == "__main__":
    main()
