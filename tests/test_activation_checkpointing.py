"""`train.activation_checkpointing`: the calls with gradient of a supervision step keep only their
inputs and run again in the backward. Same kernels on the same inputs under the same autocast, so
the training is the same to the last bit (losses, weights), in fp32 and in bf16, for trm and hrm;
what the forward keeps for the backward shrinks; a backbone that cannot do it is refused when the
model is built, and only then."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dis_core import hookimpl
from dis_core.contract.errors import CapabilityError
from dis_core.step.solver import Solver
from dis_core.tools.cli import main
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_plugins.backbones import layers

from conftest import tiny_recipe

# T = 2 cycles (one without gradient), n = 2: the recomputed calls sit behind no-grad ones.
TRM = ["backbone.config.T=2", "backbone.config.n=2"]
HRM = ["backbone.name=\"hrm\"",
       "backbone.config={hidden_size=32, num_heads=2, expansion=2.0, H_layers=1, L_layers=1, T=2, n=2, step_embedding=true}"]


def _train(tmp_path: Path, name: str, sets: list[str]) -> tuple[list[float], str]:
    """(train/loss per step, digest of the final weights) of a 4-step run."""
    out = tmp_path / name
    args = ["run", str(tiny_recipe(tmp_path, steps=4)), "--out", str(out), "--data-dir", str(tmp_path / "data")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if r["split"] == "train"]
    digest = torch.load(out / "checkpoints" / "step_4" / "dis_rank0.pt", weights_only=False)["params_sha256"]
    return losses, digest


@pytest.mark.parametrize("backbone, precision", [(TRM, "fp32"), (TRM, "bf16"), (HRM, "fp32")],
                         ids=["trm-fp32", "trm-bf16", "hrm-fp32"])
def test_recomputing_gives_the_same_training_to_the_last_bit(tmp_path, monkeypatch, backbone, precision):
    # No preflight: its probe steps would also run the recomputed calls that this test counts.
    sets = [*backbone, f"train.precision=\"{precision}\"", "train.preflight=false"]
    kept = _train(tmp_path, "kept", sets)
    recomputed_calls = []

    def counted(fn, *args, **kwargs):
        recomputed_calls.append(kwargs["use_reentrant"])
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counted)
    recomputed = _train(tmp_path, "recomputed", [*sets, "train.activation_checkpointing=true"])
    # 4 steps x the calls with gradient (trm: n + 1 = 3; hrm: 2), training only: evaluation has no gradient
    assert recomputed_calls == [False] * (4 * (3 if backbone is TRM else 2))
    assert len(kept[0]) == 4
    assert recomputed == kept  # every loss equal as a float, and the weights' SHA-256


def _saved_bytes(solver: Solver) -> int:
    """Bytes the forward of one supervision step keeps for its backward, outside recomputed calls."""
    model = solver.step_module()
    B, L = 4, solver.spec.seq_len
    state = solver.backbone.initial_state(B)
    tokens = torch.zeros(B, L, dtype=torch.long)
    step = torch.ones(B, dtype=torch.long)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, logits, _ = solver.backbone(state, tokens, step, None)
    logits.float().sum().backward()
    return total


def test_the_forward_keeps_less_for_the_backward(tmp_path, registry):
    kept = Solver.build(load_recipe(tiny_recipe(tmp_path), registry, [*TRM, "train.precision=\"fp32\""]), registry,
                        tmp_path / "data")
    recomputed = Solver.build(load_recipe(tiny_recipe(tmp_path), registry,
                                          [*TRM, "train.precision=\"fp32\"", "train.activation_checkpointing=true"]),
                              registry, tmp_path / "data")
    assert recomputed.backbone.activation_checkpointing and not kept.backbone.activation_checkpointing
    full, light = _saved_bytes(kept), _saved_bytes(recomputed)
    # Each of the 3 calls with gradient keeps its two (B, S, D) inputs instead of its blocks' activations.
    assert light < full / 3, (light, full)


# ------------------------------------------------------------------ a backbone without it


@attrs.frozen(kw_only=True)
class FlatConfig:
    hidden_size: int = 16


class Flat(nn.Module):
    """One linear map of the token embedding: no recursion, nothing to recompute."""

    prefix_len = puzzle_emb_ndim = 0

    def __init__(self, config: FlatConfig, vocab: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.embed, self.head = nn.Embedding(vocab, config.hidden_size), nn.Linear(config.hidden_size, vocab)

    def initial_state(self, batch_size):
        return None

    def forward(self, state, tokens, step, puzzle_emb=None):
        return None, self.head(self.embed(tokens)), None

    def calls_per_step(self):
        return 1, 1

    def flops_per_call(self, seq_len):
        return 0.0


class FlatPlugin:
    __name__ = "flat_backbone"

    @hookimpl
    def register_backbones(self, register):
        register("flat", FlatConfig, lambda config, ctx: Flat(config, ctx.spec.vocab_size))


def test_a_backbone_without_it_is_refused_only_when_asked(tmp_path):
    registry = load_registry(extra_plugins=(FlatPlugin(),))
    sets = ["backbone={name=\"flat\"}", "halting={name=\"fixed\"}"]
    assert Solver.build(load_recipe(tiny_recipe(tmp_path), registry, sets), registry, tmp_path / "data")  # not asked: fine
    asked = load_recipe(tiny_recipe(tmp_path), registry, [*sets, "train.activation_checkpointing=true"])
    with pytest.raises(CapabilityError, match=r"backbone Flat does not support it.*activation_checkpointing"):
        Solver.build(asked, registry, tmp_path / "data")
