"""What one supervision step means, in one place: its target, its token input, its forward (with
or without a loss), and how the carry of slots advances. Training, evaluation and prediction all
go through this module; the trainer only decides *when* things happen.

A step of a slot that has run s-1 steps (s is 1-based):
  target    frame s of the slot's target path (`StepRule.target`)
  input     the question at s = 1; afterwards the previous argmax (`step_input = "prediction"`,
            the official DIS code) or the question again (`"question"`, TRM/HRM)  (`next_tokens`)
  forward   backbone(state, tokens, s, puzzle row) -> new state, logits, q[, per-slot losses]
  loss      per slot: w_s * CE(logits, target) + the backbone's extra losses + the halting
            head's losses; the step's loss is the mean over the rank's slots (DeepSpeed then
            averages over ranks: the reference's SUM(loss / global_batch))
  advance   carry the new state (detached), count the step, feed the next input, ask the
            halting strategy which slots are done (`Carry.advance`)
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from dis_core.interfaces import IGNORE, AnswerAwareHalting, Batch, CycleReadout, StepReadout
from dis_core.losses import per_sequence_ce

State = tuple[torch.Tensor, torch.Tensor]


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

    state: State  # (y, z), each (B, S, D)
    tokens: torch.Tensor  # (B, L) int64
    step: torch.Tensor  # (B,) int64, 1-based
    puzzle_emb: torch.Tensor | None = None  # (B, E) rows of the puzzle table
    targets: torch.Tensor | None = None  # (B, L) this step's target frame
    labels: torch.Tensor | None = None  # (B, L) y*, for the halting head's "is it right" target
    inputs: torch.Tensor | None = None  # (B, L) the question, for HRM's Q-continue forward


@attrs.define
class StepOut:
    state: State  # new (y, z), not detached
    logits: torch.Tensor  # (B, L, V)
    q: torch.Tensor  # (B, 2) fp32 [halt, continue]
    loss: torch.Tensor | None = None  # scalar: mean over slots of `per_slot`
    ce: torch.Tensor | None = None  # (B,) token loss against the target, detached
    losses: dict[str, torch.Tensor] = attrs.field(factory=dict)  # (B,) each: every per-slot term, detached

    @classmethod
    def cat(cls, outs: list["StepOut"]) -> "StepOut":
        """Micro-batches of one step (equal sizes) as one output over all the slots; the
        loss is their mean, as it would be for one forward over every slot."""
        if len(outs) == 1:
            return outs[0]
        return cls(
            state=(torch.cat([o.state[0] for o in outs]), torch.cat([o.state[1] for o in outs])),
            logits=torch.cat([o.logits for o in outs]), q=torch.cat([o.q for o in outs]),
            loss=torch.stack([o.loss.detach() for o in outs]).mean(),
            ce=torch.cat([o.ce for o in outs]), losses={k: torch.cat([o.losses[k] for o in outs]) for k in outs[0].losses},
        )


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast around a backbone call (train.precision = "bf16"): matmuls in bf16 over
    fp32 weights; the norms and rotary maths stay fp32 inside the layers and the loss is
    computed outside, in float64."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def split_backbone_output(out) -> tuple[State, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A backbone returns (state, logits, q) or (state, logits, q, extra_losses) where
    extra_losses maps a name to a (B,) per-slot loss added to the step's loss (a loss on z, say:
    a backbone change, not a core change)."""
    if len(out) == 4:
        return out[0], out[1], out[2], dict(out[3])
    state, logits, q = out
    return state, logits, q, {}


class SupervisedStep(nn.Module):
    """backbone + loss: the module DeepSpeed wraps. forward(StepIn) -> StepOut."""

    def __init__(self, backbone: nn.Module, halting, rule: StepRule, *, bf16: bool = False):
        super().__init__()
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
        ce = per_sequence_ce(logits, x.targets, self.rule.loss)  # (B,)
        terms = {"token": self.rule.weight(x.step) * ce, **extra}
        if self.halting.uses_q_head:
            with torch.no_grad():
                correct = sequence_correct(logits, x.labels).to(torch.float32)
            terms["q_halt"] = self.halting.loss(q, correct)
            if self.halting.uses_continue_loss:
                terms["q_continue"] = self._continue_loss(x, state, logits, q, emb)
        per_slot = sum(terms.values())
        return StepOut(state, logits, q, loss=per_slot.mean(), ce=ce.detach(), losses={k: v.detach() for k, v in terms.items()})

    def _continue_loss(self, x: StepIn, state: State, logits, q, emb) -> torch.Tensor:
        """HRM's Q-continue target: one more no-grad forward from the new state, on the input
        the next step would get (the reference's extra inner forward)."""
        with torch.no_grad():
            nxt = self.rule.next_tokens(logits.argmax(-1), x.inputs)
            detached = (state[0].detach(), state[1].detach())
            with autocast(x.tokens.device, self.bf16):
                _, _, next_q, _ = split_backbone_output(self.backbone(detached, nxt, x.step + 1, emb))
        return self.halting.continue_loss(q, next_q.float(), x.step >= self.halting.max_steps)


@attrs.define
class Carry:
    """The slots' persistent state between optimizer steps, owned by the trainer."""

    y: torch.Tensor  # (B, S, D) answer state
    z: torch.Tensor  # (B, S, D) latent state
    steps: torch.Tensor  # (B,) int64 supervision steps run
    halted: torch.Tensor  # (B,) bool; True at start, so the first step fills every slot
    batch: Batch  # the slots' examples
    targets: torch.Tensor  # (B, N, L) int64 per-step targets
    tokens: torch.Tensor  # (B, L) int64 token input of the next step

    @classmethod
    def empty(cls, backbone, batch_size: int, seq_len: int, n_sup: int, device) -> "Carry":
        y, z = backbone.initial_state(batch_size)
        long = dict(dtype=torch.int64, device=device)
        return cls(
            y=y.to(device),
            z=z.to(device),
            steps=torch.zeros(batch_size, **long),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            batch={},
            targets=torch.full((batch_size, n_sup, seq_len), IGNORE, **long),
            tokens=torch.zeros(batch_size, seq_len, **long),
        )

    def refill(self, rows: torch.Tensor, new: Batch, targets: torch.Tensor, init: State) -> None:
        """Put fresh examples into the slots `rows` (1-D int64) and reset their state."""
        if not self.batch:  # first fill: adopt the keys and shapes of the task's batches
            self.batch = {k: torch.zeros((len(self.steps), *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in new.items()}
        for k, v in new.items():
            self.batch[k][rows] = v
        self.targets[rows] = targets
        self.tokens[rows] = new["inputs"]
        self.y[rows] = init[0][: len(rows)].to(self.y.dtype)
        self.z[rows] = init[1][: len(rows)].to(self.z.dtype)
        self.steps[rows] = 0
        self.halted[rows] = False

    def step_in(self, rule: StepRule, puzzle_emb: torch.Tensor | None, rows: slice = slice(None)) -> StepIn:
        """The inputs of the next step of the slots `rows` (all by default; a micro-batch)."""
        step = self.steps[rows] + 1
        return StepIn(
            state=(self.y[rows], self.z[rows]), tokens=self.tokens[rows], step=step, puzzle_emb=puzzle_emb,
            targets=rule.target(self.targets[rows], step), labels=self.batch["labels"][rows], inputs=self.batch["inputs"][rows],
        )

    @torch.no_grad()
    def advance(self, out: StepOut, rule: StepRule, halting, generator: torch.Generator) -> None:
        """After a training step: keep the new state, count the step, feed the next input,
        and mark the slots the halting strategy ends."""
        self.y, self.z = out.state[0].detach(), out.state[1].detach()
        self.steps = self.steps + 1
        self.tokens = rule.next_tokens(out.logits.argmax(-1), self.batch["inputs"])
        self.halted = halting.halt(self.steps, out.q.detach().float(), training=True, generator=generator)

    def state_dict(self) -> dict:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Carry":
        return cls(**state)


@attrs.frozen
class Rollout:
    """What evaluation and prediction see for B examples."""

    preds: torch.Tensor  # (B, N, L) argmax after each step; a halted slot repeats its answer
    q_halt: torch.Tensor  # (B,) fp32 halting logit after the slot's last step
    steps: torch.Tensor  # (B,) int64 steps actually run
    # With `margin=True` (the batch has labels): the Advantage Margin (paper Prop. 4.1) summed over
    # each example's supervised cells at each step, and how many of those cells had one above
    # MARGIN_TOL / below -MARGIN_TOL; 0 after the example halted. `cells` (B,): its supervised cells.
    margin: torch.Tensor | None = None  # (B, N) fp64
    margin_positive: torch.Tensor | None = None  # (B, N) int64
    margin_negative: torch.Tensor | None = None  # (B, N) int64
    cells: torch.Tensor | None = None  # (B,) int64


READOUTS = ("step", "cycle")
# A cell's margin counts as positive (negative) above MARGIN_TOL (below -MARGIN_TOL). Cells the
# model is already sure of have a margin of 0 up to rounding (1 - pi_w(y*) underflows), whose
# sign would be noise; the margin is computed in float64, so 1e-6 is far above that noise.
MARGIN_TOL = 1e-6


@attrs.frozen
class Answer:
    """What a halting strategy with `uses_answer = True` sees at evaluation, after each step
    (`halt(..., answer=Answer)`): the step's (guided) logits and two signals computed from them."""

    logits: torch.Tensor  # (B, L, V) the logits the step's answer is the argmax of (l_w)
    confidence: torch.Tensor  # (B,) fp32 mean over the L positions of the top class's probability
    unchanged: torch.Tensor  # (B,) int64 steps in a row the argmax has not changed (0 at step 1)


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The distribution the model was trained to put on its logits: stablemax or softmax (fp32)."""
    if kind == "stablemax":
        x = logits.to(torch.float64)
        s = torch.where(x >= 0, x + 1, 1.0 / (1.0 - x + 1e-30))
        return (s / s.sum(-1, keepdim=True)).to(torch.float32)
    return torch.softmax(logits.float(), -1)


def advantage_margin(l_u: torch.Tensor, l_c: torch.Tensor, l_w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper Prop. 4.1 per cell: with delta = l_c - l_u and pi_w = softmax(l_w),
    delta[y*] - E_{a ~ pi_w} delta[a]. (B, L, V) logits, labels (B, L) -> (B, L) fp32; the value
    at an unsupervised cell (label IGNORE) is meaningless: mask it. Computed in float64 (whatever
    the logits' dtype) and returned as such."""
    delta = l_c.double() - l_u.double()
    pi = torch.softmax(l_w.double(), -1)
    safe = labels.clamp(0, delta.shape[-1] - 1)
    return delta.gather(-1, safe[..., None]).squeeze(-1) - (pi * delta).sum(-1)


def _check_readouts(backbone: nn.Module, readout: str) -> None:
    need = {"step": ("decode", StepReadout), "cycle": ("forward_readouts", CycleReadout)}.get(readout)
    if need is None:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    need, capability = need
    if not isinstance(backbone, capability):
        raise ValueError(f"readout {readout!r} needs the backbone's `{need}` (guidance and the Advantage Margin); "
                         f"{type(backbone).__name__} has none")


def has_readouts(backbone: nn.Module, readout: str) -> bool:
    """Whether the backbone offers what `readout` needs (trm and hrm offer both)."""
    try:
        _check_readouts(backbone, readout)
    except ValueError:
        return False
    return True


@torch.no_grad()
def rollout(backbone: nn.Module, batch: Batch, rule: StepRule, halting, *, puzzle_emb: torch.Tensor | None,
            generator: torch.Generator | None = None, max_steps: int | None = None, bf16: bool = False,
            guidance: float = 1.0, readout: str = "step", margin: bool = False) -> Rollout:
    """Run B examples from a fresh state for up to `max_steps` (default: the halting strategy's)
    supervision steps, without loss. Evaluation, `dis eval` and prediction all use this.

    Guidance (paper Eq. 5): each step's answer is the argmax of l_w = (1 - w) l_u + w l_c, with
    l_c = f_O(y after the step) (the plain logits) and l_u = f_O(y before): `readout = "step"`
    takes y as the step received it (so l_u of step s is l_c of step s-1; no extra network call),
    `"cycle"` takes y just before the step's last y-update (needs `backbone.forward_readouts`;
    the same as "step" when T = 1). That answer is what the step records, feeds to the next step
    (`step_input = "prediction"`) and shows the halting strategy. w = 1 is the plain rollout,
    computed exactly as without guidance. `margin=True` also sums the Advantage Margin of every
    step (needs `batch["labels"]`)."""
    n_max = max_steps or halting.max_steps
    inputs = batch["inputs"]
    B, device = inputs.shape[0], inputs.device
    guided = float(guidance) != 1.0
    readouts = guided or margin
    if readouts:
        _check_readouts(backbone, readout)
    uses_answer = isinstance(halting, AnswerAwareHalting) and halting.uses_answer
    dtype = next(backbone.parameters()).dtype
    y, z = (t.to(device=device, dtype=dtype) for t in backbone.initial_state(B))
    emb = puzzle_emb.to(dtype) if puzzle_emb is not None else None
    tokens, steps = inputs, torch.zeros(B, dtype=torch.long, device=device)
    halted = torch.zeros(B, dtype=torch.bool, device=device)
    preds_all, q_last = [], torch.zeros(B, device=device)
    unchanged = torch.zeros(B, dtype=torch.long, device=device)
    l_prev = None
    if readouts and readout == "step":
        with autocast(device, bf16):
            l_prev = backbone.decode(y)  # f_O(y_0): the first step's l_u
    if margin:
        labels = batch["labels"]
        valid = labels != IGNORE
        margin_sum, margin_pos, margin_neg = [], [], []
    for s in range(1, n_max + 1):
        step = torch.full((B,), s, dtype=torch.long, device=device)
        with autocast(device, bf16):
            if readouts and readout == "cycle":
                (y, z), logits, q, l_u = backbone.forward_readouts((y, z), tokens, step, emb)
            else:
                (y, z), logits, q, _ = split_backbone_output(backbone((y, z), tokens, step, emb))
        if readouts and readout == "step":
            l_u, l_prev = l_prev, logits
        l_w = torch.lerp(l_u.float(), logits.float(), float(guidance)) if guided else logits
        live = ~halted
        pred = l_w.argmax(-1)
        if preds_all:
            unchanged = torch.where((pred == preds_all[-1]).all(-1), unchanged + 1, torch.zeros_like(unchanged))
            pred = torch.where(live[:, None], pred, preds_all[-1])  # a halted slot keeps its answer
        preds_all.append(pred)
        if margin:
            m = advantage_margin(l_u, logits, l_w, labels)
            margin_sum.append(torch.where(valid & live[:, None], m, torch.zeros_like(m)).sum(-1))
            margin_pos.append(((m > MARGIN_TOL) & valid & live[:, None]).sum(-1))
            margin_neg.append(((m < -MARGIN_TOL) & valid & live[:, None]).sum(-1))
        q_last = torch.where(live, q[:, 0].float(), q_last)
        steps = steps + live.long()
        tokens = rule.next_tokens(pred, inputs)
        if uses_answer:
            conf = probabilities(l_w, rule.loss).amax(-1).mean(-1)
            answer = Answer(logits=l_w, confidence=conf, unchanged=unchanged)
            halted = halted | halting.halt(steps, q.float(), training=False, generator=generator, answer=answer)
        else:
            halted = halted | halting.halt(steps, q.float(), training=False, generator=generator)
        if bool(halted.all()):
            break
    preds = torch.stack(preds_all, 1)  # (B, steps run, L)
    if preds.shape[1] < n_max:  # pad with the final answer so every record has N frames
        preds = torch.cat([preds, preds[:, -1:].expand(-1, n_max - preds.shape[1], -1)], 1)
    out = Rollout(preds=preds, q_halt=q_last, steps=steps)
    if margin:
        pad = n_max - len(margin_sum)
        m_sum = torch.nn.functional.pad(torch.stack(margin_sum, 1), (0, pad))
        m_pos = torch.nn.functional.pad(torch.stack(margin_pos, 1), (0, pad))
        m_neg = torch.nn.functional.pad(torch.stack(margin_neg, 1), (0, pad))
        out = attrs.evolve(out, margin=m_sum, margin_positive=m_pos, margin_negative=m_neg, cells=valid.sum(-1))
    return out


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

    def reduce(self, all_reduce_sum) -> dict[str, float]:
        """A collective: every rank calls it at the same step."""
        names = [f.name for f in attrs.fields(TrainStats)]
        values = torch.stack([torch.as_tensor(getattr(self, k), dtype=torch.float64).cpu() for k in names])
        t = dict(zip(names, all_reduce_sum(values).tolist()))
        # NaN when every step of the interval was skipped as non-finite (`train.on_nonfinite`).
        out = {"train/loss": t["loss_sum"] / t["slots"] if t["slots"] else float("nan")}
        if t["finished"]:
            out |= {"train/accuracy": t["accuracy_sum"] / t["finished"], "train/exact_accuracy": t["exact_sum"] / t["finished"],
                    "train/steps": t["steps_sum"] / t["finished"]}
        return out
