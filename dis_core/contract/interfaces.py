"""Interfaces of the component kinds, as Protocols that state shapes, dtypes and ownership.

Notation (see docs/concepts.md for the map to TRM/HRM names):
  B batch, L task sequence length (the answer grid, flattened), P prefix length (puzzle-embedding
  positions), S = P + L, D hidden size, V vocabulary, N = n_sup supervision steps.

A *batch* is a `dict[str, torch.Tensor]` with at least:
  "inputs"       (B, L) int64   the question x~ as tokens
  "labels"       (B, L) int64   y*; IGNORE (-100) where a cell is not supervised
  "puzzle_ids"   (B,)   int64   row of the puzzle-embedding table; 0 is the blank identifier
  "example_ids"  (B,)   int64   index of the example in its split (stable, used to key plans/votes)
Tasks may add keys of their own (any tensor whose first dimension is B); the trainer carries
them along untouched. A Dataset may return token arrays in any integer dtype (uint8 keeps ARC
batches small); `dis_core.step.data.to_torch` widens every integer array narrower than 64 bits to int64,
so components always see int64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NoReturn, Protocol, runtime_checkable

import attrs
import numpy as np
import torch

from dis_core.contract.errors import PluginError, UserError

IGNORE = -100
"""Label value of cells that are not supervised (the torch cross-entropy convention)."""

Batch = dict[str, torch.Tensor]
NumpyBatch = dict[str, np.ndarray]


@attrs.frozen(kw_only=True)
class TaskSpec:
    """What a backbone and a target generator need to know about a task's encoding."""

    vocab_size: int  # V: number of token ids, including PAD/EOS where the task has them
    seq_len: int  # L: tokens per example (flattened grid)
    num_puzzle_ids: int = 1  # rows of the puzzle-embedding table, the blank id 0 included
    pad_id: int = 0  # token of padding cells in `inputs`
    grid_shape: tuple[int, int] | None = None  # (rows, cols) when the sequence is a grid


def _int64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


@attrs.frozen(kw_only=True, eq=False)
class PuzzleGroups:
    """A training split's puzzles and groups, for the group sampler (`train.sampler`), in the
    CSR style of the reference's puzzle_indices/group_indices. A *puzzle* is a run of examples
    that share a puzzle identifier (one augmented variant); a *group* is an original puzzle and
    its variants. Puzzle p holds the dataset indices [puzzle_start[p], puzzle_start[p] +
    puzzle_size[p]); group g holds the puzzles [group_offsets[g], group_offsets[g+1]). Indices
    that no puzzle holds are never drawn by that sampler."""

    puzzle_start: np.ndarray = attrs.field(converter=_int64)  # (P,) first dataset index of each puzzle
    puzzle_size: np.ndarray = attrs.field(converter=_int64)  # (P,) examples of each puzzle, >= 1
    group_offsets: np.ndarray = attrs.field(converter=_int64)  # (G + 1,) rising from 0 to P, each group >= 1 puzzle


@runtime_checkable
class Dataset(Protocol):
    """An indexable split. `get` is a pure function of the indices: the same indices always
    give the same arrays, so on-the-fly augmentation is deterministic and resumable.

    Optional: a training split whose examples come in puzzles and groups (an original puzzle and
    its augmented variants) may also define `groups() -> PuzzleGroups | None`. Then
    `train.sampler = "auto"` (the default) orders training like the reference TRM/DIS code:
    per pass, every group once in a random order, each showing one random member puzzle with all
    its examples together (dis_core.step.data.GroupStream). Without it, examples are shuffled singly.
    """

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> NumpyBatch:
        """Arrays for `indices` (K,): the batch keys above as numpy arrays, first dim K.
        `example_ids` must equal `indices`."""
        ...


@runtime_checkable
class Task(Protocol):
    """A puzzle family: its encoding (`spec`) and its splits. Owns no model state."""

    spec: TaskSpec

    def dataset(self, split: str) -> Dataset:
        """The split "train" or "test" (built or loaded on first call, then cached). Optional
        (contract 1.4): "valid", held out of training and distinct from test, built only when
        asked for (`eval.split = "valid"`, `dis study`); a task without one raises `UserError`
        saying so."""
        ...


@runtime_checkable
class Stream(Protocol):
    """The endless order in which one rank takes training examples (`train.sampler`;
    dis_core.step.data.make_stream builds it). Owned by the trainer; a checkpoint holds its position."""

    sampler: str  # the order's name: "examples" or "groups" (run.json; resuming checks it)

    def take(self, k: int) -> np.ndarray:
        """The next k (K,) int64 indices of the training split, in this rank's order."""
        ...

    def epochs_done(self) -> float:
        """Passes over the training split by all ranks together (`train/epoch`)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class SolverTrajectoryTask(Protocol):
    """Optional capability: a task that can produce solver-ordered intermediate answers."""

    def solver_trajectory(self, batch: Batch, n_sup: int) -> torch.Tensor:
        """(B, n_sup, L) int64 intermediate answers, frame n_sup-1 == labels."""
        ...


# Optional capabilities. The core checks for them with isinstance (never getattr), so a
# component that offers one offers all of that Protocol's members.


@runtime_checkable
class GroupedDataset(Protocol):
    """A training split that declares puzzle groups (ARC): `train.sampler = "groups"`."""

    def groups(self) -> Any:
        """A `PuzzleGroups`, or None when this split has none."""
        ...


@runtime_checkable
class PuzzleIO(Protocol):
    """A task whose puzzles `dis predict` reads and answers in the task's own format."""

    def encode_inputs(self, puzzles: list) -> NumpyBatch:
        """Puzzles as JSON gives them -> numpy arrays with at least "inputs" (K, L)."""
        ...

    def decode(self, tokens: np.ndarray, puzzle: Any) -> Any:
        """(L,) answer tokens -> the answer in the puzzle's own form."""
        ...


@runtime_checkable
class AnswerCheckingTask(Protocol):
    """A task that can tell whether an answer solves its question (`dis predict`'s `valid`)."""

    def check_answers(self, inputs: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """inputs, answers (K, L) int64 tokens -> (K,) bool: answer k is a valid solution of
        question k (every rule of the puzzle kept, every given kept), not only the one label."""
        ...


@runtime_checkable
class GivensCheckingTask(Protocol):
    """A task whose questions can contradict themselves (`dis predict`'s `givens_consistent`)."""

    def check_givens(self, inputs: np.ndarray) -> np.ndarray:
        """inputs (K, L) int64 tokens -> (K,) bool: no two givens of question k break a rule of
        the puzzle (two given queens attacking, a digit given twice in a unit). True does not
        promise a solution exists."""
        ...


@runtime_checkable
class RenderableTask(Protocol):
    """A task that draws its grids for trajectory pictures (else a token-colour grid)."""

    def render_grid(self, tokens: np.ndarray, question: np.ndarray | None) -> Any:
        """(L,) tokens -> (H, W, 3) uint8 RGB, or a dict with "rgb" and optional "text",
        "text_rgb", "boxes" (see dis_core/outputs/trajectories.py)."""
        ...


@runtime_checkable
class AnswerAwareHalting(Protocol):
    """A halting strategy that, when `uses_answer`, also sees the step's answer at evaluation."""

    uses_answer: bool


@runtime_checkable
class StepReadout(Protocol):
    """A backbone that decodes any y (guidance and the Advantage Margin, readout "step")."""

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, L, V) logits over the task positions."""
        ...


@runtime_checkable
class CycleReadout(Protocol):
    """A backbone that also returns the logits before its last y-update (readout "cycle")."""

    def forward_readouts(self, state, tokens, step, puzzle_emb=None):
        ...


@runtime_checkable
class TargetGenerator(Protocol):
    """Builds the per-step targets y_1^+ .. y_N^+ for a batch.

    Called once when a slot is (re)filled with an example; the result is kept with the slot
    for all its supervision steps. Must consume randomness only from `generator`.
    """

    monotone: bool  # declared: Hamming distance to y* never increases along the frames

    def __call__(self, batch: Batch, n_sup: int, generator: torch.Generator) -> torch.Tensor:
        """(B, n_sup, L) int64 targets, IGNORE where unsupervised; frame n_sup-1 is the final
        target (normally == labels)."""
        ...


@runtime_checkable
class HaltingStrategy(Protocol):
    """Decides after each supervision step which slots are done.

    The trainer owns the carry (slot states, step counters); the strategy only decides.

    `uses_continue_loss` and `continue_loss` were added in contract 1.1 and stay optional: a
    strategy without them has no Q-continue loss (`dis_core.contract.compat.uses_continue_loss`).

    Optional (`AnswerAwareHalting`): `uses_answer = True` makes evaluation call
    `halt(..., answer=answer)` with a `dis_core.step.guidance.Answer` (the step's logits, mean
    top-class probability, steps the argmax has not changed), for rules that stop on the answer
    itself (`fixed`'s `eval_halt`).
    """

    max_steps: int  # no slot runs more supervision steps than this
    uses_q_head: bool  # whether q-logits feed the decision and the loss
    uses_continue_loss: bool  # whether `continue_loss` is added (costs one more no-grad forward)

    def halt(self, steps: torch.Tensor, q_logits: torch.Tensor, *, training: bool, generator: torch.Generator) -> torch.Tensor:
        """steps (B,) int64 steps done so far (>= 1), q_logits (B, 2) fp32 [halt, continue], or
        None when the backbone has no q-head (only for a strategy whose `uses_q_head` is False)
        -> (B,) bool, True where the slot halts now."""
        ...

    def loss(self, q_logits: torch.Tensor, seq_correct: torch.Tensor) -> torch.Tensor:
        """Per-slot halting loss (B,) fp32 (zeros when the head is unused)."""
        ...

    def continue_loss(self, q_logits: torch.Tensor, next_q_logits: torch.Tensor, is_last: torch.Tensor) -> torch.Tensor:
        """Per-slot Q-continue loss (B,) fp32 against the bootstrapped target from
        `next_q_logits` (B, 2), the no-grad forward of the next step; only called when
        `uses_continue_loss`."""
        ...


@runtime_checkable
class Backbone(Protocol):
    """The network: one `forward` call is one supervision step.

    A plain nn.Module that knows nothing of ranks or DeepSpeed. It owns its parameters and
    its fixed init buffers; the trainer owns the state carried between calls (the carry), and
    the core never looks inside it. The state is whatever the backbone chooses: (y, z) each
    (B, S, D) for `trm` and `hrm`, one tensor, or None for a backbone that carries nothing from
    one step to the next (a plain Transformer). Every tensor of it has the slots (B) as its first
    dimension, and `forward` returns a state of the structure and shapes `initial_state` gives.
    A halting head is optional (`HaltingHead`); the building blocks of `trm` and `hrm` are public
    (`dis_plugins.backbones.layers`, docs/hooks.md).
    """

    hidden_size: int  # D
    prefix_len: int  # P: puzzle-embedding positions prepended to the L task positions
    # Width E of the per-puzzle vector forward expects; 0 = none. The trainer owns the table
    # (one row per puzzle id, sign-SGD) and passes the batch's rows.
    puzzle_emb_ndim: int

    def initial_state(self, batch_size: int) -> Any:
        """The state a freshly filled slot starts from: (y, z) each (B, S, D) for trm/hrm, a
        tensor (B, ...), or None (nothing carried)."""
        ...

    def forward(self, state: Any, tokens: torch.Tensor, step: torch.Tensor, puzzle_emb: torch.Tensor | None = None) -> tuple:
        """state as `initial_state` or the previous call gave it; tokens (B, L) int64; step (B,)
        int64 1-based step index; puzzle_emb (B, E) or None -> (new state (not detached), logits
        (B, L, V), q_logits (B, 2) fp32 [halt, continue], or None without a q-head), optionally
        followed by a dict {name: (B,) per-slot loss} of extra losses that the supervision step
        adds to the token loss (a loss on z, say; not named "ce", "halt" or "continue")."""
        ...

    def calls_per_step(self) -> tuple[int, int]:
        """(network calls per supervision step, of which with gradient)."""
        ...

    def flops_per_call(self, seq_len: int) -> float:
        """Forward FLOPs of one network call for one example at sequence length S."""
        ...

    # Optional, for guidance (paper Eq. 5) and the Advantage Margin (Prop. 4.1) at evaluation
    # (dis_core.step.guidance; `trm` and `hrm` have both; the core never trains with them):
    #   decode(y) -> (B, L, V): f_O of an answer state (readout "step", `StepReadout`)
    #   forward_readouts(state, tokens, step, puzzle_emb=None) -> (state, logits, q_logits,
    #       logits of y just before the step's last y-update) (readout "cycle", `CycleReadout`)


@runtime_checkable
class HaltingHead(Protocol):
    """A backbone with a halting head, whose forward returns its q-logits. A halting strategy
    with `uses_q_head` needs one (the step refuses the pair otherwise, before training); when
    the strategy does not use it, the supervision step freezes it, so that no optimizer touches
    a head that gets no gradient."""

    q_head: torch.nn.Module  # D -> 2 [halt, continue]


@attrs.frozen(kw_only=True)
class EvalRecord:
    """What an evaluator sees for each (real, non-padding) test example batch."""

    batch: Batch  # the batch as the task produced it (CPU tensors)
    preds: torch.Tensor  # (B, N, L) int64 argmax after each supervision step
    q_halt: torch.Tensor  # (B,) fp32 halting logit after the last step (confidence proxy)
    steps: torch.Tensor  # (B,) int64 supervision steps actually run


@runtime_checkable
class Evaluator(Protocol):
    """Accumulates over the test split on each rank; rank 0 merges the states.

    `update` sees CPU tensors. `state` must be picklable (it is gathered across ranks).
    `compute` runs on rank 0 only and returns metrics without the evaluator prefix
    (the trainer names them `<evaluator>/<metric>`). `out_dir` is where files such as
    `submission.json` go; it may not exist yet: an evaluator that writes creates it (so that
    evaluators that write nothing leave no empty folders behind).

    `headline` names the one metric that answers "how well does it solve the task" (without the
    prefix, e.g. "valid_solution_rate", "pass@2"): the trainer records it in run.json
    (`headline_metrics`) and `dis compare` plots the first evaluator's headline by default.
    Added in contract 1.1, required from 2.0: an evaluator without it still works, with a
    `DisContractWarning`; the core reads it as `dis_core.contract.compat.headline_of(evaluator)`, None
    for such an evaluator, and compare then falls back to a validity or exact-match metric.
    """

    headline: str

    def reset(self) -> None: ...

    def update(self, record: EvalRecord) -> None: ...

    def state(self) -> Any: ...

    def compute(self, states: list[Any], out_dir: Path | None) -> dict[str, float]: ...


OptimizerFactory = Callable[[list], torch.optim.Optimizer]


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker fed by the trainer on rank 0 (`[[loggers]]`; dis_core/outputs/loggers.py).
    It sees what the run writes, as it is written; the run directory stays the record. An
    exception in `start` stops the run (exit status 2); a later one drops the logger with a
    warning, and the run goes on."""

    def start(self, run_dir: Path, recipe: dict, info: dict) -> None:
        """Once, before the first step: the run directory, the resolved recipe (recipe.toml as a
        dict) and run.json's content (both files exist by then)."""
        ...

    def log(self, row: dict) -> None:
        """Each row of metrics.jsonl as it is appended: `step`, `split` and the metrics."""
        ...

    def images(self, step: int, paths: list[Path]) -> None:
        """The trajectory PNGs an evaluation at `step` wrote (`train.eval_trajectories`)."""
        ...

    def finish(self, summary: dict | None) -> None:
        """Once, at the end: summary.json's content, or None when the run stopped early."""
        ...


@attrs.frozen(kw_only=True)
class BuildContext:
    """Handed to every factory. Components are built in the order of the slot table
    (dis_core/contract/slots.py), the task first; every later factory sees it as `task` and its encoding
    as `spec`. `build` makes further components through the registry and `fail` reports a
    problem against the component's recipe path."""

    seed: int
    n_sup: int
    data_dir: Path  # where tasks may cache prepared data
    task: Any = None  # the built Task (None while the task itself is being built)
    _spec: TaskSpec | None = attrs.field(default=None, alias="spec")  # default: task.spec
    component: str = ""  # recipe path of the component being built ("$.evaluators[0]")
    config_path: str = ""  # recipe path of its config table, when not `<component>.config` (see `build`)
    source: str = ""  # the recipe file
    # The process's place in a distributed run (contract 1.3): rank 0 of world_size 1 when it
    # runs alone. A factory may shard data or quiet its output on rank != 0.
    rank: int = 0
    world_size: int = 1
    # The dis_core.wiring.registry.Registry that `build` uses. The core always passes one; a context
    # made by hand has none, and `build` then refuses (dis_core.testing.context passes one).
    registry: Any = attrs.field(default=None, repr=False, eq=False)

    @property
    def spec(self) -> TaskSpec:
        """The task's encoding: set for every component built after the task."""
        if self._spec is not None:
            return self._spec
        if self.task is not None:
            return self.task.spec
        raise PluginError(
            f"{self.component or 'a factory'}: ctx.spec is read while the task itself is being built (or in a "
            f"BuildContext made without task or spec): the task defines the spec, and every component built "
            f"after it sees it"
        )

    def fail(self, message: str, *, at: str = "", error: type[UserError] = UserError) -> NoReturn:
        """Raise `error` (a UserError) as `<recipe> @ <component path>[.<at>]: <message>`; `at`
        is relative to the component ("config.mask_token": a key of its config table)."""
        if self.config_path and (at == "config" or at.startswith("config.")):
            where = self.config_path + at[len("config"):]
        else:
            where = ".".join(p for p in (self.component, at) if p)
        prefix = " @ ".join(p for p in (self.source, where) if p)
        raise error(f"{prefix}: {message}" if prefix else message)

    def build(self, kind: str, name: str, config: dict | None = None, *, at: str = "", config_at: str | None = None) -> Any:
        """Component `name` of `kind`, built through the registry from a raw `config` table:
        looked up, structured into its config class, its factory called (with this context,
        its `component` moved to `at`) and its result checked. `at` is where the name stands
        relative to this component ("config.fallback"), `config_at` where the table stands
        (default `<at>.config`); an unknown name or a bad table is reported there."""
        if self.registry is None:
            # No silent fallback to the installed plugins: which registry builds is the caller's
            # choice, and the contract layer does not load plugins.
            raise PluginError(
                f"{self.component or 'a factory'}: ctx.build({kind!r}, {name!r}) needs the BuildContext's registry, "
                f"and this one has none. Pass it: BuildContext(..., registry=dis_core.wiring.plugins.load_registry()); in "
                f"a plugin's tests, dis_core.testing.context(task) makes a context with the installed plugins' "
                f"registry (or pass registry=load_registry(extra_plugins=(MyPlugin(),)))"
            )
        return self.registry.build(kind, name, config, self, at=at, config_at=config_at)
