"""What one supervision step means, in one place: its target, its token input, its forward (with
or without a loss), and how the carry of slots advances. Training, evaluation and prediction all
go through this module; the trainer only decides *when* things happen. What evaluation measures
besides the answers (guidance, the Advantage Margin, the answer signals of adaptive halting)
lives in `dis_core.step.guidance`.

A step of a slot that has run s-1 steps (s is 1-based):
  target    frame s of the slot's target path (`StepRule.target`)
  input     the question at s = 1; afterwards the previous argmax (`step_input = "prediction"`,
            the official DIS code) or the question again (`"question"`, TRM/HRM)  (`next_tokens`)
  forward   backbone(state, tokens, s, puzzle row) -> new state, logits, q[, per-slot losses]
  loss      per slot: w_s * CE(logits, target) ("ce") + the backbone's extra losses + the
            halting head's losses ("halt", "continue"); the step's loss is the mean over the
            rank's slots (DeepSpeed then averages over ranks: the reference's SUM(loss / global_batch))
  advance   carry the new state (detached), count the step, feed the next input, ask the
            halting strategy which slots are done (`Carry.advance`)

The state is whatever the backbone carries from one step to the next, and the core never looks
inside it: `(y, z)` for trm and hrm, one tensor, or None for a backbone that carries nothing.
Every tensor of it has the slots as its first dimension, so slots can be refilled row by row.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch
from torch import nn

from dis_core.contract.compat import uses_continue_loss
from dis_core.contract.errors import CapabilityError, PluginError
# Answer, probabilities, advantage_margin, READOUTS, MARGIN_TOL and has_readouts lived here
# before dis_core.step.guidance: re-exported for the code and plugins that import them from here.
from dis_core.step.guidance import MARGIN_TOL, READOUTS, Answer, Guide, advantage_margin, has_readouts, probabilities
from dis_core.contract.interfaces import IGNORE, AnswerAwareHalting, Batch, HaltingHead
from dis_core.step.losses import per_sequence_ce

State = torch.Tensor | tuple[torch.Tensor, ...] | None
# Loss terms the core adds; a backbone's extra losses take other names.
CORE_TERMS = ("ce", "halt", "continue")


def state_tensors(state: State) -> tuple[torch.Tensor, ...]:
    """The tensors of a state: () for None, (t,) for one tensor, the tuple's items otherwise."""
    if state is None:
        return ()
    return (state,) if torch.is_tensor(state) else tuple(state)


def map_state(fn: Callable[..., torch.Tensor], *states: State) -> State:
    """`fn` applied tensor by tensor to states of one structure (several: zipped), keeping it."""
    if states[0] is None:
        return None
    if torch.is_tensor(states[0]):
        return fn(*states)
    return tuple(fn(*parts) for parts in zip(*states, strict=True))


def answer_state(state: State) -> torch.Tensor | None:
    """The state a `decode` reads: y of (y, z) (the first tensor), or the state if it is one."""
    return state if state is None or torch.is_tensor(state) else state[0]


def has_q_head(backbone) -> bool:
    """Whether the backbone has a halting head (`HaltingHead`)."""
    return isinstance(backbone, HaltingHead) and isinstance(backbone.q_head, nn.Module)


def check_q_head(backbone, halting) -> None:
    """A halting strategy that reads q-logits needs a backbone with a q-head."""
    if halting.uses_q_head and not has_q_head(backbone):
        raise CapabilityError(
            f"the halting strategy {type(halting).__name__} uses a q-head (uses_q_head is true), but the backbone "
            f"{type(backbone).__name__} has none: give the backbone a `q_head` module and return its (B, 2) q-logits "
            f"from forward, or choose a halting strategy without one (`fixed`)")


@attrs.frozen(kw_only=True)
class StepRule:
    """The recipe's `[supervision]` table, as behaviour."""

    n_sup: int
    step_weights: str = "uniform"  # "uniform" | "linear"
    step_input: str = "prediction"  # "prediction" | "question"
    loss: str = "stablemax"  # "stablemax" | "softmax"

    @classmethod
    def of(cls, supervision) -> "StepRule":
        s = supervision
        if s.step_input is None:  # filled in by recipe resolution from the targets
            raise ValueError("supervision.step_input is unset: build the rule from a resolved recipe")
        return cls(n_sup=s.n_sup, step_weights=s.step_weights, step_input=s.step_input, loss=s.loss)

    def target(self, frames: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """frames (B, N, L), step (B,) 1-based -> (B, L): the frame of each slot's step."""
        idx = (step.clamp(1, self.n_sup) - 1).view(-1, 1, 1).expand(-1, 1, frames.shape[-1])
        return frames.gather(1, idx).squeeze(1)

    def next_tokens(self, preds: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The token input of the next step: the argmax just made, or the question again."""
        return preds if self.step_input == "prediction" else inputs

    def weight(self, step: torch.Tensor) -> torch.Tensor:
        """(B,) loss weight of each slot's step. uniform: 1 (the official code: every step its
        own optimizer step at the same scale). linear: w_s = 2s/(N+1), mean 1 (the paper)."""
        if self.step_weights == "uniform":
            return torch.ones_like(step, dtype=torch.float32)
        return 2.0 * step.to(torch.float32) / (self.n_sup + 1)


def method(targets: str, step_input: str) -> dict:
    """Which official method a recipe's targets and step input reproduce: TRM/HRM (the final
    answer as every step's target, the question at every step) or DIS (per-step targets, the
    previous argmax fed back); anything else is neither, and `note` says why (`--dry-run`,
    run.json, the run's log)."""
    final = targets == "final"
    if final and step_input == "question":
        return {"method": "TRM", "note": None}
    if not final and step_input == "prediction":
        return {"method": "DIS", "note": None}
    if final:
        note = ("final targets with step_input = 'prediction' match neither official method: official TRM "
                "and HRM feed the question at every step; leave supervision.step_input unset (or set it to "
                "'question') for a TRM baseline")
    else:
        note = (f"per-step targets ({targets!r}) with step_input = 'question' match neither official method: "
                "official DIS feeds the previous prediction; leave supervision.step_input unset (or set it "
                "to 'prediction') for DIS")
    return {"method": "neither", "note": note}


def sequence_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every supervised cell's argmax equals the label."""
    valid = labels != IGNORE
    return ((logits.argmax(-1) == labels) | ~valid).all(-1)


@attrs.define
class StepIn:
    """One step's inputs for B slots. `targets` is None when no loss is wanted (evaluation)."""

    state: State  # what the backbone carries, each tensor (B, ...); (y, z) each (B, S, D) for trm/hrm
    tokens: torch.Tensor  # (B, L) int64
    step: torch.Tensor  # (B,) int64, 1-based
    puzzle_emb: torch.Tensor | None = None  # (B, E) rows of the puzzle table
    targets: torch.Tensor | None = None  # (B, L) this step's target frame
    labels: torch.Tensor | None = None  # (B, L) y*, for the halting head's "is it right" target
    inputs: torch.Tensor | None = None  # (B, L) the question, for HRM's Q-continue forward


@attrs.define
class StepOut:
    state: State  # the new state, not detached
    logits: torch.Tensor  # (B, L, V)
    q: torch.Tensor | None  # (B, 2) fp32 [halt, continue]; None from a backbone without a q-head
    loss: torch.Tensor | None = None  # scalar: mean over slots of the sum of `losses`
    ce: torch.Tensor | None = None  # (B,) token loss against the target, unweighted, detached
    # (B,) each, detached: every per-slot term of the loss ("ce" (weighted), "halt", "continue",
    # the backbone's extra losses), which TrainStats logs as train/loss_<name>
    losses: dict[str, torch.Tensor] = attrs.field(factory=dict)

    @classmethod
    def cat(cls, outs: list["StepOut"]) -> "StepOut":
        """Micro-batches of one step (equal sizes) as one output over all the slots; the
        loss is their mean, as it would be for one forward over every slot."""
        if len(outs) == 1:
            return outs[0]
        return cls(
            state=map_state(lambda *parts: torch.cat(parts), *(o.state for o in outs)),
            logits=torch.cat([o.logits for o in outs]), q=None if outs[0].q is None else torch.cat([o.q for o in outs]),
            loss=torch.stack([o.loss.detach() for o in outs]).mean(),
            ce=torch.cat([o.ce for o in outs]), losses={k: torch.cat([o.losses[k] for o in outs]) for k in outs[0].losses},
        )


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast around a backbone call (train.precision = "bf16"): matmuls in bf16 over
    fp32 weights; the norms and rotary maths stay fp32 inside the layers and the loss is
    computed outside, in float64."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def split_backbone_output(out) -> tuple[State, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A backbone returns (state, logits, q) or (state, logits, q, extra_losses): q is None
    without a q-head, and extra_losses maps a name to a (B,) per-slot loss added to the step's
    loss (a loss on z, say: a backbone change, not a core change)."""
    if len(out) == 4:
        return out[0], out[1], out[2], dict(out[3])
    state, logits, q = out
    return state, logits, q, {}


class SupervisedStep(nn.Module):
    """backbone + loss: the module DeepSpeed wraps. forward(StepIn) -> StepOut.

    It owns the pairing of backbone and halting strategy: a strategy that reads q-logits needs a
    backbone with a q-head (CapabilityError otherwise), and a q-head the strategy does not use is
    frozen here. No gradient ever reaches an unused q-head, but DeepSpeed fills missing gradients
    with zeros, so AdamW would decay it towards 0; the reference leaves it untouched. Build the
    optimizer from the parameters that still require a gradient after this constructor."""

    def __init__(self, backbone: nn.Module, halting, rule: StepRule, *, bf16: bool = False):
        super().__init__()
        check_q_head(backbone, halting)
        if has_q_head(backbone) and not halting.uses_q_head:
            backbone.q_head.requires_grad_(False)
        self.backbone = backbone
        self.halting = halting  # plain object, not a submodule
        self.rule = rule
        self.bf16 = bf16

    def forward(self, x: StepIn) -> StepOut:
        emb = x.puzzle_emb
        if emb is not None:
            emb = emb.to(next(self.backbone.parameters()).dtype)
        with autocast(x.tokens.device, self.bf16):
            state, logits, q, extra = split_backbone_output(self.backbone(x.state, x.tokens, x.step, emb))
        if x.targets is None:
            return StepOut(state, logits, q)
        taken = sorted(set(extra) & set(CORE_TERMS))
        if taken:
            raise PluginError(f"the backbone {type(self.backbone).__name__} returned extra losses named {taken}, names of "
                              f"the core's own loss terms ({', '.join(CORE_TERMS)}): name them otherwise")
        ce = per_sequence_ce(logits, x.targets, self.rule.loss)  # (B,)
        terms = {"ce": self.rule.weight(x.step) * ce, **extra}
        if self.halting.uses_q_head:
            q = self._q(q)
            with torch.no_grad():
                correct = sequence_correct(logits, x.labels).to(torch.float32)
            terms["halt"] = self.halting.loss(q, correct)
            if uses_continue_loss(self.halting):
                terms["continue"] = self._continue_loss(x, state, logits, q, emb)
        per_slot = sum(terms.values())
        return StepOut(state, logits, q, loss=per_slot.mean(), ce=ce.detach(), losses={k: v.detach() for k, v in terms.items()})

    def _q(self, q: torch.Tensor | None) -> torch.Tensor:
        if q is None:
            raise PluginError(f"the backbone {type(self.backbone).__name__} has a q_head but returned no q-logits, and the "
                              f"halting strategy {type(self.halting).__name__} reads them")
        return q

    def _continue_loss(self, x: StepIn, state: State, logits, q, emb) -> torch.Tensor:
        """HRM's Q-continue target: one more no-grad forward from the new state, on the input
        the next step would get (the reference's extra inner forward)."""
        with torch.no_grad():
            nxt = self.rule.next_tokens(logits.argmax(-1), x.inputs)
            with autocast(x.tokens.device, self.bf16):
                _, _, next_q, _ = split_backbone_output(self.backbone(map_state(torch.Tensor.detach, state), nxt, x.step + 1, emb))
        return self.halting.continue_loss(q, self._q(next_q).float(), x.step >= self.halting.max_steps)


@attrs.define
class Carry:
    """The slots' persistent state between optimizer steps, owned by the trainer."""

    state: State  # what the backbone carries ((y, z) each (B, S, D) for trm/hrm), detached
    steps: torch.Tensor  # (B,) int64 supervision steps run
    halted: torch.Tensor  # (B,) bool; True at start, so the first step fills every slot
    batch: Batch  # the slots' examples
    targets: torch.Tensor  # (B, N, L) int64 per-step targets
    tokens: torch.Tensor  # (B, L) int64 token input of the next step

    @classmethod
    def empty(cls, backbone, batch_size: int, seq_len: int, n_sup: int, device) -> "Carry":
        long = dict(dtype=torch.int64, device=device)
        return cls(
            state=map_state(lambda t: t.to(device), backbone.initial_state(batch_size)),
            steps=torch.zeros(batch_size, **long),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            batch={},
            targets=torch.full((batch_size, n_sup, seq_len), IGNORE, **long),
            tokens=torch.zeros(batch_size, seq_len, **long),
        )

    def refill(self, rows: torch.Tensor, new: Batch, targets: torch.Tensor, init: State) -> None:
        """Put fresh examples into the slots `rows` (1-D int64) and reset their state to `init`
        (the backbone's `initial_state(len(rows))`)."""
        if not self.batch:  # first fill: adopt the keys and shapes of the task's batches
            self.batch = {k: torch.zeros((len(self.steps), *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in new.items()}
        for k, v in new.items():
            self.batch[k][rows] = v
        self.targets[rows] = targets
        self.tokens[rows] = new["inputs"]
        for slot, fresh in zip(state_tensors(self.state), state_tensors(init), strict=True):
            slot[rows] = fresh[: len(rows)].to(slot.dtype)
        self.steps[rows] = 0
        self.halted[rows] = False

    def step_in(self, rule: StepRule, puzzle_emb: torch.Tensor | None, rows: slice = slice(None)) -> StepIn:
        """The inputs of the next step of the slots `rows` (all by default; a micro-batch)."""
        step = self.steps[rows] + 1
        return StepIn(
            state=map_state(lambda t: t[rows], self.state), tokens=self.tokens[rows], step=step, puzzle_emb=puzzle_emb,
            targets=rule.target(self.targets[rows], step), labels=self.batch["labels"][rows], inputs=self.batch["inputs"][rows],
        )

    @torch.no_grad()
    def advance(self, out: StepOut, rule: StepRule, halting, generator: torch.Generator) -> None:
        """After a training step: keep the new state, count the step, feed the next input,
        and mark the slots the halting strategy ends."""
        self.state = map_state(torch.Tensor.detach, out.state)
        self.steps = self.steps + 1
        self.tokens = rule.next_tokens(out.logits.argmax(-1), self.batch["inputs"])
        q = None if out.q is None else out.q.detach().float()
        self.halted = halting.halt(self.steps, q, training=True, generator=generator)

    def state_dict(self) -> dict:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Carry":
        """A carry as `state_dict` gave it; the state follows `steps` to its device. Checkpoints
        written before the state was generic hold `y` and `z` instead of `state`."""
        state = dict(state)
        if "y" in state:
            state["state"] = (state.pop("y"), state.pop("z"))
        device = state["steps"].device
        state["state"] = map_state(lambda t: t.to(device), state["state"])
        return cls(**state)


@attrs.frozen
class Rollout:
    """What evaluation and prediction see for B examples."""

    preds: torch.Tensor  # (B, N, L) argmax after each step; a halted slot repeats its answer
    q_halt: torch.Tensor  # (B,) fp32 halting logit after the slot's last step; 0 without a q-head
    steps: torch.Tensor  # (B,) int64 steps actually run
    # With `margin=True` (the batch has labels): the Advantage Margin (paper Prop. 4.1) summed over
    # each example's supervised cells at each step, and how many of those cells had one above
    # MARGIN_TOL / below -MARGIN_TOL; 0 after the example halted. `cells` (B,): its supervised cells.
    margin: torch.Tensor | None = None  # (B, N) fp64
    margin_positive: torch.Tensor | None = None  # (B, N) int64
    margin_negative: torch.Tensor | None = None  # (B, N) int64
    cells: torch.Tensor | None = None  # (B,) int64


@torch.no_grad()
def rollout(backbone: nn.Module, batch: Batch, rule: StepRule, halting, *, puzzle_emb: torch.Tensor | None,
            generator: torch.Generator | None = None, max_steps: int | None = None, bf16: bool = False,
            guidance: float = 1.0, readout: str = "step", margin: bool = False) -> Rollout:
    """Run B examples from a fresh state for up to `max_steps` (default: the halting strategy's)
    supervision steps, without loss. Evaluation, `dis eval` and prediction all use this.

    Each step's answer is the argmax of its logits, or with guidance w != 1 (paper Eq. 5) of
    l_w = (1 - w) l_u + w l_c, l_u read as `readout` says (`dis_core.step.guidance`). That answer is
    what the step records, feeds to the next step (`step_input = "prediction"`) and shows the
    halting strategy. w = 1 is the plain rollout, computed exactly as without guidance.
    `margin=True` also sums the Advantage Margin of every step (needs `batch["labels"]`)."""
    n_max = max_steps or halting.max_steps
    inputs = batch["inputs"]
    B, device = inputs.shape[0], inputs.device
    guide = None
    if float(guidance) != 1.0 or margin:
        guide = Guide(backbone, guidance=guidance, readout=readout, labels=batch["labels"] if margin else None)
    uses_answer = isinstance(halting, AnswerAwareHalting) and halting.uses_answer
    dtype = next(backbone.parameters()).dtype
    state = map_state(lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype), backbone.initial_state(B))
    emb = puzzle_emb.to(dtype) if puzzle_emb is not None else None
    tokens, steps = inputs, torch.zeros(B, dtype=torch.long, device=device)
    halted = torch.zeros(B, dtype=torch.bool, device=device)
    preds_all, q_last = [], torch.zeros(B, device=device)
    unchanged = torch.zeros(B, dtype=torch.long, device=device)
    if guide is not None:
        with autocast(device, bf16):
            guide.start(answer_state(state))
    for s in range(1, n_max + 1):
        step = torch.full((B,), s, dtype=torch.long, device=device)
        l_u = None
        with autocast(device, bf16):
            if guide is not None and guide.readout == "cycle":
                state, logits, q, l_u = backbone.forward_readouts(state, tokens, step, emb)
            else:
                state, logits, q, _ = split_backbone_output(backbone(state, tokens, step, emb))
        l_w = guide.weigh(logits, l_u) if guide is not None else logits
        live = ~halted
        pred = l_w.argmax(-1)
        if preds_all:
            unchanged = torch.where((pred == preds_all[-1]).all(-1), unchanged + 1, torch.zeros_like(unchanged))
            pred = torch.where(live[:, None], pred, preds_all[-1])  # a halted slot keeps its answer
        preds_all.append(pred)
        if guide is not None:
            guide.measure(logits, l_w, live)
        if q is not None:
            q = q.float()
            q_last = torch.where(live, q[:, 0], q_last)
        steps = steps + live.long()
        tokens = rule.next_tokens(pred, inputs)
        if uses_answer:
            done = halting.halt(steps, q, training=False, generator=generator, answer=Answer.of(l_w, rule.loss, unchanged))
        else:
            done = halting.halt(steps, q, training=False, generator=generator)
        halted = halted | done
        if bool(halted.all()):
            break
    preds = torch.stack(preds_all, 1)  # (B, steps run, L)
    if preds.shape[1] < n_max:  # pad with the final answer so every record has N frames
        preds = torch.cat([preds, preds[:, -1:].expand(-1, n_max - preds.shape[1], -1)], 1)
    out = Rollout(preds=preds, q_halt=q_last, steps=steps)
    return attrs.evolve(out, **guide.margins(n_max)) if guide is not None else out


@attrs.define
class TrainStats:
    """Training statistics summed over a rank's slots since the last log row (kept as tensors:
    no device sync per step); `reduce` sums them over ranks into the `train/*` metrics."""

    loss_sum: torch.Tensor | float = 0.0  # step loss x slots (the loss is a per-slot mean)
    slots: torch.Tensor | float = 0.0
    accuracy_sum: torch.Tensor | float = 0.0  # over slots that finished their example this step
    exact_sum: torch.Tensor | float = 0.0
    steps_sum: torch.Tensor | float = 0.0
    finished: torch.Tensor | float = 0.0
    # Each loss term (`StepOut.losses`) summed over slots. Every rank has the same terms: the
    # backbone and the halting strategy decide them, and ranks skip non-finite steps together.
    terms: dict[str, torch.Tensor] = attrs.field(factory=dict)

    @torch.no_grad()
    def add(self, out: StepOut, carry: Carry) -> None:
        done = carry.halted.float()
        labels = carry.batch["labels"]
        valid = labels != IGNORE
        acc = ((out.logits.argmax(-1) == labels) & valid).sum(-1).float() / valid.sum(-1).clamp_min(1)
        exact = sequence_correct(out.logits, labels).float()
        self.loss_sum = self.loss_sum + out.loss.detach().float() * len(done)
        self.slots = self.slots + len(done)
        self.accuracy_sum = self.accuracy_sum + (acc * done).sum()
        self.exact_sum = self.exact_sum + (exact * done).sum()
        self.steps_sum = self.steps_sum + (carry.steps.float() * done).sum()
        self.finished = self.finished + done.sum()
        for name, per_slot in out.losses.items():
            self.terms[name] = self.terms.get(name, 0.0) + per_slot.double().sum()

    def reduce(self, all_reduce_sum) -> dict[str, float]:
        """A collective: every rank calls it at the same step."""
        names = [f.name for f in attrs.fields(TrainStats) if f.name != "terms"]
        terms = sorted(self.terms)
        values = [torch.as_tensor(getattr(self, k), dtype=torch.float64).cpu() for k in names]
        values += [torch.as_tensor(self.terms[k], dtype=torch.float64).cpu() for k in terms]
        summed = all_reduce_sum(torch.stack(values)).tolist()
        t = dict(zip(names, summed))
        # NaN when every step of the interval was skipped as non-finite (`train.on_nonfinite`).
        out = {"train/loss": t["loss_sum"] / t["slots"] if t["slots"] else float("nan")}
        # Each term reduced as the total is: summed over slots and ranks, per slot.
        out |= {f"train/loss_{k}": v / t["slots"] for k, v in zip(terms, summed[len(names):])}
        if t["finished"]:
            out |= {"train/accuracy": t["accuracy_sum"] / t["finished"], "train/exact_accuracy": t["exact_sum"] / t["finished"],
                    "train/steps": t["steps_sum"] / t["finished"]}
        return out
