"""Halting strategies: `fixed` (DIS: exactly n_sup steps, no halting head) and `act` (TRM/HRM:
a learned Q-head decides when a slot is done, with exploration during training).

`fixed` also offers adaptive stopping at evaluation only (`eval_halt`): when the answer stops
changing, when it is confident, or by a Q-head trained alongside the DIS targets. A strategy
that sets `uses_answer = True` is called at evaluation as `halt(..., answer=Answer)`
(dis_core.step.guidance.Answer: the step's logits, confidence, steps unchanged).

A strategy with `uses_q_head = False` may run with a backbone that has no q-head: its `halt` then
gets `q_logits = None`, and `loss` is never called (dis_core.step.supervision.SupervisedStep)."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from dis_core import hookimpl
from dis_core.contract.validators import non_negative, one_of, positive, probability


@attrs.frozen(kw_only=True)
class FixedConfig:
    """Training runs every slot exactly `supervision.n_sup` steps, whatever the options. They
    let evaluation (and prediction) stop an example sooner: the paper's future work, adaptive
    computation for DIS. `eval_halt` picks the rule; `min_steps` holds every rule back."""

    # "none": n_sup steps (DIS). "stable": stop once the answer (argmax) has not changed for
    # `patience` steps in a row. "confident": stop once the mean over positions of the top
    # class's probability reaches `threshold`. "q_head": stop once q_halt > 0 (needs q_head).
    eval_halt: Literal["none", "stable", "confident", "q_head"] = attrs.field(
        default="none", validator=one_of("none", "stable", "confident", "q_head"))
    patience: int = attrs.field(default=1, validator=positive)
    threshold: float = attrs.field(default=0.9, validator=probability)
    min_steps: int = attrs.field(default=1, validator=positive)
    # Train the Q-head alongside the DIS targets: BCE of q_halt towards "the answer is already
    # right" (TRM's halting loss), added to every step's loss; halting in training stays fixed.
    q_head: bool = False
    q_loss_weight: float = attrs.field(default=0.5, validator=non_negative)

    def __attrs_post_init__(self):
        if self.eval_halt == "q_head" and not self.q_head:
            raise ValueError("eval_halt = 'q_head' needs a trained head: set q_head = true (and train with it)")


class FixedHalting:
    """Every slot halts after n_sup steps in training. Slots filled together halt together, so
    one batch runs all its n_sup steps and is then replaced whole: no loaded data is thrown
    away (the reference carry discards 5 of every 6 loaded batches). At evaluation the
    `eval_halt` rule may stop an example sooner."""

    uses_continue_loss = False

    def __init__(self, n_sup: int, config: FixedConfig | None = None):
        self.config = config or FixedConfig()
        self.max_steps = n_sup
        self.uses_q_head = self.config.q_head
        # the "stable" and "confident" rules read the answer (dis_core.step.guidance.Answer)
        self.uses_answer = self.config.eval_halt in ("stable", "confident")

    def halt(self, steps, q_logits, *, training, generator, answer=None):
        """steps (B,) int64 >= 1; q_logits (B, 2), or None from a backbone without a q-head (then
        `q_head` is off, and so is the rule that reads it) -> (B,) bool halted."""
        done = steps >= self.max_steps
        rule = self.config.eval_halt
        if training or rule == "none":
            return done
        if rule == "q_head":
            early = q_logits[:, 0] > 0
        elif answer is None:
            raise ValueError(f"halting rule {rule!r} needs the step's answer (halt(..., answer=...))")
        elif rule == "stable":
            early = answer.unchanged >= self.config.patience
        else:
            early = answer.confidence >= self.config.threshold
        return done | (early & (steps >= self.config.min_steps))

    def loss(self, q_logits, seq_correct):
        """Per slot (B,) fp32: zeros, or with `q_head` weight * BCE(q_halt, seq_correct)."""
        if not self.uses_q_head:
            return torch.zeros(q_logits.shape[0], dtype=torch.float32, device=q_logits.device)
        q_halt = q_logits[:, 0].float()
        target = seq_correct.to(q_halt.dtype)
        return self.config.q_loss_weight * F.binary_cross_entropy_with_logits(q_halt, target, reduction="none")

    def continue_loss(self, q_logits, next_q_logits, is_last):
        return self.loss(q_logits, is_last)  # never called: uses_continue_loss is False


def build_fixed(config: FixedConfig, ctx) -> FixedHalting:
    """Exactly n_sup supervision steps per example in training; no halting head (DIS) unless
    `q_head`; optionally an adaptive stop at evaluation (`eval_halt`)."""
    return FixedHalting(ctx.n_sup, config)


@attrs.frozen(kw_only=True)
class ACTConfig:
    """TRM's adaptive computation time. Defaults reproduce TRM's code (`no_ACT_continue=True`)."""

    # Per slot and step, the chance of drawing a minimum step count U{2..n_sup} the slot must
    # reach before it may halt. It only delays halting.
    exploration_prob: float = attrs.field(default=0.1, validator=probability)
    # Halt when q_halt > q_continue (TRM with no_ACT_continue=False, HRM) instead of q_halt > 0.
    halt_on_q_continue: bool = False
    # Train q_continue towards the bootstrapped target of HRM (needs an extra no-grad forward).
    continue_loss: bool = False
    # Let the Q-head stop evaluation early. Off by default: the reference evaluates with
    # exactly n_sup steps whatever q says (TRM issue #64).
    honour_head_at_eval: bool = False
    q_loss_weight: float = attrs.field(default=0.5, validator=non_negative)  # on (q_halt + q_continue) BCE


class ACTHalting:
    """Learned halting. q_logits (B, 2) are [q_halt, q_continue], read by the backbone's Q-head.

    The trainer calls `halt` after every supervision step with the slots' step counts (already
    incremented), replaces the halted slots, and adds `loss` (and `continue_loss` when
    `uses_continue_loss`) to the token loss of every slot, halted or not.
    """

    uses_q_head = True

    def __init__(self, config: ACTConfig, n_sup: int):
        self.config = config
        self.max_steps = n_sup
        self.uses_continue_loss = config.continue_loss

    def _q_rule(self, q_logits: torch.Tensor) -> torch.Tensor:
        q_halt, q_cont = q_logits[:, 0], q_logits[:, 1]
        return q_halt > q_cont if self.config.halt_on_q_continue else q_halt > 0

    @torch.no_grad()
    def halt(self, steps, q_logits, *, training, generator):
        """steps (B,) int64 >= 1, q_logits (B, 2) -> (B,) bool halted."""
        halted = steps >= self.max_steps
        if not training:
            return halted | self._q_rule(q_logits) if self.config.honour_head_at_eval else halted
        if self.max_steps <= 1:  # as the reference: nothing to decide with a single step
            return halted
        halted = halted | self._q_rule(q_logits)
        # Exploration. Draws happen for every slot, every step, on the generator's device, so
        # the stream consumed does not depend on the decisions (reproducible, resumable).
        n = steps.shape[0]
        device = generator.device if generator is not None else steps.device
        explore = torch.rand(n, generator=generator, device=device) < self.config.exploration_prob
        min_halt = torch.randint(2, self.max_steps + 1, (n,), generator=generator, device=device)
        min_halt = torch.where(explore, min_halt, torch.zeros_like(min_halt)).to(steps.device)
        # min_halt <= max_steps, so a slot at max_steps still halts: exploration never runs past it.
        return halted & (steps >= min_halt)

    def loss(self, q_logits, seq_correct):
        """Per slot (B,) fp32: weight * BCE(q_halt, seq_correct). The trainer sums over slots
        and divides by the global batch, as it does with the token loss."""
        q_halt = q_logits[:, 0].float()
        target = seq_correct.to(q_halt.dtype)
        return self.config.q_loss_weight * F.binary_cross_entropy_with_logits(q_halt, target, reduction="none")

    def continue_loss(self, q_logits, next_q_logits, is_last):
        """Per slot (B,) fp32: weight * BCE(q_continue, sigmoid(is_last ? q_halt' : max(q_halt', q_continue'))).

        HRM's Q-learning target without target network or replay buffer: `next_q_logits` (B, 2)
        come from one more backbone forward, under no_grad, from this step's new (detached)
        state on the same example, i.e. what the next supervision step would output; `is_last`
        (B,) bool is `steps >= max_steps` for the step just done. Only used when
        `uses_continue_loss`; the target carries no gradient."""
        next_q = next_q_logits.detach().float()
        boot = torch.where(is_last, next_q[:, 0], torch.maximum(next_q[:, 0], next_q[:, 1]))
        target = torch.sigmoid(boot)
        q_cont = q_logits[:, 1].float()
        return self.config.q_loss_weight * F.binary_cross_entropy_with_logits(q_cont, target, reduction="none")


def build_act(config: ACTConfig, ctx) -> ACTHalting:
    """Learned halting with a Q-head and exploration, up to n_sup steps (TRM, HRM)."""
    return ACTHalting(config, ctx.n_sup)


@hookimpl
def register_halting_strategies(register):
    register("fixed", FixedConfig, build_fixed)
    register("act", ACTConfig, build_act)
