"""Compute accounting: network calls and FLOPs, per example and cumulative per run.

A *network call* is one application of the shared network (L_layers blocks). A supervision step
costs `calls` forward calls, of which `grad_calls` are back-propagated (backward ≈ 2x forward).
Embeddings and heads are ignored, as in docs/reference.md#compute-accounting.
"""

from __future__ import annotations

import attrs

from dis_core.contract.compat import uses_continue_loss


@attrs.frozen
class StepCost:
    calls: int  # network calls per supervision step
    grad_calls: int  # of which with gradient
    flops_per_call: float  # forward FLOPs of one call, one example
    q_forward: bool = False  # HRM's Q-continue target costs one more forward step in training

    @classmethod
    def of(cls, backbone, seq_len: int, halting=None) -> "StepCost":
        calls, grad_calls = backbone.calls_per_step()
        q_forward = halting is not None and uses_continue_loss(halting)
        return cls(calls, grad_calls, float(backbone.flops_per_call(seq_len + backbone.prefix_len)), q_forward)

    @property
    def train_calls(self) -> int:
        return self.calls * (2 if self.q_forward else 1)

    @property
    def train_flops(self) -> float:
        """FLOPs of one training supervision step for one example (forward + backward)."""
        return (self.train_calls + 2 * self.grad_calls) * self.flops_per_call

    @property
    def eval_flops(self) -> float:
        return self.calls * self.flops_per_call


def per_example(cost: StepCost, train_steps: int, eval_steps: int) -> dict[str, float]:
    """The static figures `--dry-run` reports (train_steps is the maximum for halting schemes)."""
    return {
        "network_calls_per_step": cost.calls,
        "network_calls_per_example_train": cost.train_calls * train_steps,
        "network_calls_per_example_eval": cost.calls * eval_steps,
        "flops_per_example_train": cost.train_flops * train_steps,
        "flops_per_example_eval": cost.eval_flops * eval_steps,
    }


@attrs.define
class Ledger:
    """Cumulative cost of a run, saved in checkpoints and written with every metrics row."""

    network_calls: float = 0.0
    flops: float = 0.0
    examples: int = 0  # fresh examples this rank loaded into slots (not "epochs x dataset size")
    optimizer_steps: int = 0
    wall_time_s: float = 0.0

    def add_step(self, cost: StepCost, slots: int, fresh: int) -> None:
        self.network_calls += cost.train_calls * slots
        self.flops += cost.train_flops * slots
        self.examples += fresh
        self.optimizer_steps += 1

    def as_metrics(self) -> dict[str, float]:
        return {f"cost/{k}": v for k, v in attrs.asdict(self).items()}
