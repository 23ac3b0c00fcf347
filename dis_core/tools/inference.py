"""Using a trained model: `dis_core.load(run_dir_or_checkpoint)` -> `Model`.

A `Model` holds the run's resolved recipe (its `recipe.toml`, with any `--set` overrides), the
components built from it and the checkpoint's weights: the EMA weights (`ema_weights.pt`) when
the run kept them, else the trained ones, read from the DeepSpeed file `mp_rank_00_model_states.pt`
(its `module` entry; the puzzle table comes from the client state saved beside it). No optimizer
and no DeepSpeed engine are built.

Prediction and evaluation go through the code training uses: the recipe's `Solver`
(dis_core.step.solver: the components, puzzle table, rule, device and precision, built as training
builds them) runs the supervision steps and `dis_core.loop.evaluation.evaluate` scores a split (sliced over the
processes of a `torchrun` launch, merged on rank 0), so `dis eval` on a finished run gives the
metrics of the run's final evaluation exactly (same batch size, limit and precision).

A run still training prunes old checkpoints as it writes new ones (`train.keep_checkpoints`): the
checkpoint chosen is read at once, and when a file of it disappears during the read the then
newest one is read instead (`locate_and_read`).

    model = dis_core.load("runs/nqueens_quick")
    answers = model.predict([["Q.......", "........", ...]])      # the task's own input format
    for rows in model.predict_batches(many_boards, batch_size=1024): ...   # one batch in memory
    metrics = model.evaluate(out_dir="runs/nqueens_quick/eval-again")
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import structlog
import torch

from dis_core.loop import checkpoint as ckpt
from dis_core.loop import engine as dist
from dis_core.contract.errors import CheckpointError, DataError, PluginError, UserError
from dis_core.contract.interfaces import IGNORE, AnswerCheckingTask, Batch, GivensCheckingTask, PuzzleIO
from dis_core.step.supervision import Rollout

log = structlog.get_logger()
MODEL_FILE = "mp_rank_00_model_states.pt"
EMA_FILE = "ema_weights.pt"
PORTABLE_FILE = "model.safetensors"  # a portable folder's weights (dis_core/tools/checkpoint_io.py)


# ------------------------------------------------------------------ finding the files


def locate(source: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its newest complete
    checkpoint), its `checkpoints/` folder, or one `checkpoints/step_N/`."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    if (path / PORTABLE_FILE).is_file():  # a portable model folder (dis export --format portable)
        if not (path / "recipe.toml").is_file():
            raise UserError(f"{path}: holds {PORTABLE_FILE} but no recipe.toml, so the model cannot be rebuilt")
        return path, path
    if (path / MODEL_FILE).is_file():
        ckpt_dir = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        root = path if path.name == "checkpoints" else path / "checkpoints"
        run_dir = root.parent
        if not (run_dir / "recipe.toml").is_file() and not root.is_dir():
            raise UserError(f"{path}: not a dis run directory (no recipe.toml, no checkpoints/) and not a checkpoint "
                            f"(no {MODEL_FILE}); pass RUN_DIR or RUN_DIR/checkpoints/step_N")
        tags = [t for t in ckpt.candidates(root, 1) if (root / t / MODEL_FILE).is_file()] if root.is_dir() else []
        if not tags:
            raise CheckpointError(f"{run_dir}: no complete checkpoint under {root} (a run writes one at its end and "
                                  f"every train.checkpoint_interval steps)")
        ckpt_dir = root / tags[0]
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{ckpt_dir}: the run directory {run_dir} that holds this checkpoint has no recipe.toml, "
                        f"so the model cannot be rebuilt")
    return run_dir, ckpt_dir


class _Vanished(Exception):
    """A file of the checkpoint disappeared while it was being read: a run still training
    removed it (train.keep_checkpoints) after writing a newer one."""


def read_checkpoint(ckpt_dir: Path) -> dict:
    """{"module": state dict, "ema": state dict or None, "puzzle_emb": state dict or None,
    "step": int}, read without DeepSpeed. Raises `_Vanished` when a file disappears meanwhile."""
    if (ckpt_dir / PORTABLE_FILE).is_file():
        return read_portable(ckpt_dir)
    model_file = ckpt_dir / MODEL_FILE
    saved = _torch_load(model_file)
    if not isinstance(saved, dict) or "module" not in saved:
        raise CheckpointError(f"{model_file}: not a DeepSpeed model-states file (no 'module' entry)")
    ema = None
    # The client state holds the EMA shadow when the run kept one, so a checkpoint of such a run
    # without ema_weights.pt is one being removed (its files go one by one), not one without EMA.
    if "ema" in saved or (ckpt_dir / EMA_FILE).is_file():
        ema = _torch_load(ckpt_dir / EMA_FILE)
    return {"module": saved["module"], "ema": ema, "puzzle_emb": saved.get("puzzle_emb"), "step": saved.get("step")}


def read_portable(folder: Path) -> dict:
    """`read_checkpoint`'s dict for a portable folder: model.safetensors holds `backbone.*` and
    `puzzle_emb.weights` (written by dis_core/tools/checkpoint_io.py, `dis export --format portable`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / PORTABLE_FILE
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own kinds
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    module = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    puzzle = {"weights": tensors["puzzle_emb.weights"]} if "puzzle_emb.weights" in tensors else None
    return {"module": module, "ema": None, "puzzle_emb": puzzle, "step": int(meta.get("step", 0))}


def _torch_load(path: Path):
    # mmap: the tensors stay readable even if the file is unlinked once it is open.
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise _Vanished(path) from None
    except Exception as exc:  # truncated, corrupted: torch raises many kinds
        if not path.is_file():  # removed while torch read it
            raise _Vanished(path) from None
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {first})") from None


READ_ATTEMPTS = 5  # a run would have to write and prune this many checkpoints during one read


def locate_and_read(source: str | Path) -> tuple[Path, Path, dict]:
    """(run directory, checkpoint directory, `read_checkpoint`'s dict) for `source`, as `locate`
    finds it. A run still training removes old checkpoints as it writes new ones: when the
    checkpoint picked disappears while being read, the then-newest one is read instead."""
    tried: list[Path] = []
    for _ in range(READ_ATTEMPTS):
        run_dir, ckpt_dir = locate(source)
        try:
            return run_dir, ckpt_dir, read_checkpoint(ckpt_dir)
        except _Vanished as exc:
            gone = exc.args[0]
            if ckpt_dir == Path(source):  # named on the command line: no other one will do
                raise CheckpointError(f"{gone}: removed while being read (a run still training prunes its old "
                                      f"checkpoints, train.keep_checkpoints); pass the run directory to read its "
                                      f"newest checkpoint") from None
            if ckpt_dir in tried:  # still the newest, still missing a file: not a prune in progress
                raise CheckpointError(f"{gone}: missing from {ckpt_dir}, the newest complete checkpoint (deleted by "
                                      f"hand?); name an older one, RUN_DIR/checkpoints/step_N") from None
            tried.append(ckpt_dir)
            log.info("checkpoint removed while being read; reading the newest again", checkpoint=str(ckpt_dir))
    raise CheckpointError(f"{source}: the newest checkpoint was removed while being read {READ_ATTEMPTS} times "
                          f"({', '.join(p.name for p in tried)}); try again")


def _backbone_state(module_state: dict) -> dict:
    """The backbone's tensors out of the saved `SupervisedStep` state (keys `backbone.*`)."""
    prefix = "backbone."
    if any(k.startswith(prefix) for k in module_state):
        return {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
    return dict(module_state)


def _load_into(module: torch.nn.Module, state: dict, where: Path, what: str) -> None:
    detail = ckpt.tensor_differences(module.state_dict(), state)
    if detail:
        raise CheckpointError(f"checkpoint {where} ({what}) does not fit the model this recipe builds: {detail}. "
                              f"Evaluate it with the recipe it was trained with (drop --set keys that change the backbone)")
    module.load_state_dict(state)


def _init_processes(device: torch.device) -> None:
    """Join the process group of a `torchrun`/`deepspeed` launch; nothing for a lone process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_distributed(device)


def _check_same_checkpoint(ckpt_dir: Path, saved: dict, device: torch.device) -> None:
    """Under a launcher every process reads the checkpoint itself; a run still training may
    write a newer one between their reads. Every process sees the same sums, so all stop or
    none does."""
    if dist.world_size() == 1:
        return
    step = float(saved["step"] if isinstance(saved["step"], int) else -1)
    sums = dist.all_reduce_sum(torch.tensor([step, step * step, 1.0], dtype=torch.float64, device=device))
    total, squares, world = sums.tolist()
    if squares * world != total * total:  # the steps are not all equal
        raise CheckpointError(f"{ckpt_dir.parent}: the processes read different checkpoints (a run still training "
                              f"wrote a newer one meanwhile); run again, or name one: {ckpt_dir}")


# ------------------------------------------------------------------ the model


class Model:
    """A trained model ready to predict and evaluate; see `load`. Its `solver` (the components,
    puzzle table, step rule, device and precision the recipe builds) holds the checkpoint's weights."""

    def __init__(self, *, solver, resolved, registry, saved: dict, run_dir: Path, checkpoint: Path, data_dir: Path,
                 overrides: tuple[str, ...], weights: str):
        self.solver, self.resolved, self.registry = solver, resolved, registry
        self.recipe = resolved.recipe
        self.run_dir, self.checkpoint, self.data_dir = run_dir, checkpoint, data_dir
        self.overrides, self._saved = overrides, saved
        self.step = saved["step"]
        use_ema = weights == "ema" or (weights == "auto" and saved["ema"] is not None)
        if use_ema and saved["ema"] is None:
            raise CheckpointError(f"{checkpoint}: no {EMA_FILE} (the run trained without train.ema)")
        self.weights = "ema" if use_ema else "trained"
        _load_into(solver.backbone, _backbone_state(saved["ema"] if use_ema else saved["module"]), checkpoint,
                   EMA_FILE if use_ema else f"{MODEL_FILE} module")
        if solver.puzzle_emb is not None:
            if saved["puzzle_emb"] is None:
                raise CheckpointError(f"{checkpoint}: the backbone uses a puzzle embedding but the checkpoint holds no puzzle table")
            _load_into(solver.puzzle_emb, saved["puzzle_emb"], checkpoint, "puzzle table")
        for module in (solver.backbone, solver.puzzle_emb):
            if module is not None:
                module.eval()

    # What the solver is made of, under the names `Model` has always had.
    components = property(lambda self: self.solver.components)
    task = property(lambda self: self.solver.task)
    spec = property(lambda self: self.solver.spec)
    halting = property(lambda self: self.solver.halting)
    evaluators = property(lambda self: self.solver.evaluators)
    rule = property(lambda self: self.solver.rule)
    backbone = property(lambda self: self.solver.backbone)
    puzzle_emb = property(lambda self: self.solver.puzzle_emb)
    device = property(lambda self: self.solver.device)
    bf16 = property(lambda self: self.solver.bf16)

    def __repr__(self) -> str:
        return (f"Model({self.recipe.task.name}/{self.recipe.backbone.name}, checkpoint={str(self.checkpoint)!r}, "
                f"step={self.step}, weights={self.weights!r}, device={str(self.device)!r})")

    # -------------------------------------------------------------- variants

    def with_overrides(self, overrides: Iterable[str]) -> "Model":
        """The same weights under more `--set` overrides (another test source, evaluator options,
        `halting.config.honour_head_at_eval`, ...); the backbone must still fit the weights."""
        overrides = tuple(overrides)
        if not overrides:
            return self
        return _build(self.run_dir, self.checkpoint, self._saved, self.registry, (*self.overrides, *overrides),
                      self.data_dir, self.device, self.weights if self.weights == "ema" else "trained")

    # -------------------------------------------------------------- running

    def eval_batch_size(self) -> int:
        train = self.recipe.train
        return train.eval_batch_size or train.global_batch_size

    def check_steps(self, steps: int | None) -> int:
        n_max = self.halting.max_steps
        if steps is None:
            return n_max
        if not 1 <= steps <= n_max:
            raise UserError(f"--steps {steps}: the model was trained for 1..{n_max} supervision steps")
        return steps

    def rollout(self, batch: Batch, steps: int | None = None, guidance: float = 1.0) -> Rollout:
        """`supervision.rollout` on a batch of tensors (moved to the model's device); `guidance`
        is the paper's w (Eq. 5): answers from (1 - w) l_u + w l_c, the recipe's `eval.readout`."""
        check_guidance(guidance)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            return self.solver.rollout(batch, max_steps=self.check_steps(steps), guidance=guidance,
                                       readout=self.recipe.eval.readout)

    def encode(self, puzzles: Sequence[Any], *, offset: int = 0) -> dict[str, np.ndarray]:
        """The task's `encode_inputs(puzzles)`, or, for a task without it, lists of L token ids.
        Errors name each puzzle by its index plus `offset` (its place in the whole input)."""
        if isinstance(puzzles, (str, bytes, dict)) or not isinstance(puzzles, Sequence):
            raise DataError("the inputs must be a list of puzzles (a JSON array)")
        if not len(puzzles):
            raise DataError("no puzzles to answer: the input list is empty")
        if isinstance(self.task, PuzzleIO):
            try:
                arrays = dict(self.task.encode_inputs(list(puzzles)))
            except DataError as exc:
                raise self._renumbered(puzzles, offset, exc) from None
            if len(np.asarray(arrays.get("inputs", ()))) != len(puzzles):
                raise PluginError(f"task {self.recipe.task.name!r}: encode_inputs returned "
                                  f"{len(np.asarray(arrays.get('inputs', ())))} rows of inputs for {len(puzzles)} puzzles")
        else:
            arrays = {"inputs": _token_rows(puzzles, self.spec.seq_len, self.recipe.task.name, offset)}
        return complete_batch(arrays, self.spec, offset=offset)

    def _renumbered(self, puzzles: Sequence[Any], offset: int, error: DataError) -> DataError:
        """The task's error for the first bad puzzle of a slice, named by its place in the whole
        input: tasks number the puzzles of the list they are given from 0."""
        for j, puzzle in enumerate(puzzles):
            try:
                self.task.encode_inputs([puzzle])
            except DataError as exc:
                text = re.sub(r"^puzzle 0\b:?\s*", "", str(exc))
                return DataError(f"puzzle {offset + j}: {text}")
        return DataError(f"puzzles {offset}..{offset + len(puzzles) - 1}: {error}") if offset else error

    def decode(self, tokens: np.ndarray, puzzle: Any) -> Any:
        return self.task.decode(tokens, puzzle) if isinstance(self.task, PuzzleIO) else [int(t) for t in tokens]

    def predict(self, inputs: Sequence[Any], steps: int | None = None, *, batch_size: int | None = None,
                guidance: float = 1.0) -> list[dict]:
        """Answers for new puzzles in the task's input format (see the task's `encode_inputs`;
        without one, lists of L token ids), one dict per puzzle: `answer` (after the last step
        run), `valid` (whether it solves the puzzle, None for a task that cannot tell),
        `givens_consistent` (whether the puzzle's givens break no rule, None for a task that
        cannot tell), `steps` run, `q_halt` (the halting head's logit after the last step),
        `changed` (cells changed by each step) and `trajectory` (the answer after each step
        run). All of them in memory: for many puzzles use `predict_batches`."""
        return [row for rows in self.predict_batches(inputs, steps, batch_size=batch_size, guidance=guidance) for row in rows]

    def predict_batches(self, inputs: Sequence[Any], steps: int | None = None, *, batch_size: int | None = None,
                        guidance: float = 1.0) -> Iterator[list[dict]]:
        """`predict`'s answers, one list per batch of `batch_size` puzzles (default: the run's
        evaluation batch), in order, so that memory holds one batch's steps. Every puzzle is
        checked before the first batch runs: a malformed one raises `DataError` naming its index
        and nothing is answered."""
        steps = self.check_steps(steps)
        check_guidance(guidance)
        puzzles = inputs if isinstance(inputs, (str, bytes, dict)) else list(inputs)
        chunk = batch_size or self.eval_batch_size()
        if isinstance(puzzles, list) and len(puzzles) > chunk:  # a single batch is checked as it is encoded
            for lo in range(0, len(puzzles), chunk):
                self.encode(puzzles[lo: lo + chunk], offset=lo)
        else:
            self.encode(puzzles)  # the type and emptiness errors
        return self._answer_batches(puzzles, steps, chunk, guidance)

    def _answer_batches(self, puzzles: list, steps: int, chunk: int, guidance: float) -> Iterator[list[dict]]:
        from dis_core.step.data import to_torch

        checks_answers, checks_givens = isinstance(self.task, AnswerCheckingTask), isinstance(self.task, GivensCheckingTask)
        for lo in range(0, len(puzzles), chunk):
            part = to_torch(self.encode(puzzles[lo: lo + chunk], offset=lo))
            result = self.rollout(part, steps, guidance)
            preds, ran = result.preds.cpu().numpy(), result.steps.cpu().numpy()  # (B, N, L), (B,)
            q, question = result.q_halt.cpu().tolist(), part["inputs"].numpy()
            final = preds[np.arange(len(preds)), ran - 1]  # (B, L) the answer after each one's last step
            valid = self.task.check_answers(question, final).tolist() if checks_answers else [None] * len(preds)
            givens = self.task.check_givens(question).tolist() if checks_givens else [None] * len(preds)
            rows = []
            for i in range(len(preds)):
                puzzle, frames = puzzles[lo + i], preds[i, : ran[i]]
                previous = np.concatenate([question[i: i + 1], frames[:-1]])
                rows.append({
                    "input": puzzle,
                    "answer": self.decode(frames[-1], puzzle),
                    "valid": None if valid[i] is None else bool(valid[i]),
                    "givens_consistent": None if givens[i] is None else bool(givens[i]),
                    "steps": int(ran[i]),
                    "q_halt": q[i],
                    "changed": (frames != previous).sum(-1).tolist(),
                    "trajectory": [self.decode(f, puzzle) for f in frames],
                })
            yield rows

    def evaluate(self, test_set=None, *, set_overrides: Iterable[str] = (), limit: int | None = None,
                 out_dir: str | Path | None = None, batch_size: int | None = None, trajectories: int = 0,
                 examples=None, tasks=None, num_aug: int | None = None, resumable: bool = False,
                 report=None) -> dict[str, float]:
        """Every evaluator of the recipe over `test_set` (default: the task's test split, with
        the recipe's `train.eval_limit` unless `limit`), batched as the run's evaluations were.
        Metrics on rank 0 ({} on the others). With `out_dir`, rank 0 writes `metrics.json`, the
        evaluators' files under `out_dir/<evaluator>/` and, with `trajectories` N, pictures of N
        test examples chosen by `examples` (see `draw_trajectories`) under `out_dir/trajectories/`.

        `tasks` / `num_aug` evaluate part of the split, through the task's `eval_subset` (ARC: test
        tasks by id or the first N, the original plus `num_aug` augmentations of each test pair);
        the metrics then hold `coverage/*` and metrics.json the task ids. `resumable` (with
        `out_dir`, the same on every rank): per-batch partial results under `out_dir/partial/`,
        reused by a rerun with the same weights, settings and number of processes (see
        `evaluation.PartialResults`);
        `report(line)` is told the size of the job and its time estimate."""
        from dis_core.loop import evaluation

        overrides = tuple(set_overrides)
        if overrides:
            return self.with_overrides(overrides).evaluate(test_set, limit=limit, out_dir=out_dir, batch_size=batch_size,
                                                           trajectories=trajectories, examples=examples, tasks=tasks,
                                                           num_aug=num_aug, resumable=resumable, report=report)
        dataset = test_set if test_set is not None else self.task.dataset("test")
        train = self.recipe.train
        out = Path(out_dir) if out_dir is not None else None
        rank = dist.rank()
        limit = limit if limit is not None else train.eval_limit
        batch_size = batch_size or self.eval_batch_size()
        coverage = None
        if tasks is not None or num_aug is not None:
            pick = getattr(self.task, "eval_subset", None)
            if pick is None:
                raise UserError(f"task {self.recipe.task.name!r} cannot evaluate a subset (--tasks, --num-aug): it has no "
                                f"eval_subset method; use --limit for the first K examples")
            indices, coverage = pick(dataset, tasks=tasks, num_aug=num_aug)
            dataset = evaluation.Subset(dataset, indices)
        size = len(dataset) if limit is None else min(len(dataset), limit)
        coverage = {**(coverage or {"examples_total": len(dataset)}), "examples": size}
        partial = None
        if resumable and out is not None:  # every rank: each keeps its own slices of the batches
            partial = evaluation.PartialResults(out / "partial", self._identity(dataset, size, batch_size, limit), device=self.device)

        def ev_dir(name: str) -> Path | None:
            return None if out is None else out / name  # created by an evaluator that writes

        started = time.perf_counter()
        metrics = evaluation.evaluate(
            self.solver, dataset, batch_size=batch_size,
            limit=limit, generator=torch.Generator().manual_seed(train.seed),
            out_dir=ev_dir, **evaluation.options(self.recipe.eval), partial=partial, report=report,
        )
        # Only a subset says what it covered in the metrics: a whole split's metrics stay exactly
        # the run's own final evaluation (metrics.json's `coverage` block says it either way).
        if rank == 0 and (tasks is not None or num_aug is not None):
            metrics["coverage/examples"] = float(size)
            if "tasks" in coverage:
                metrics["coverage/tasks"] = float(len(coverage["tasks"]))
                metrics["coverage/variants_max"] = float(coverage["variants_per_pair"]["max"])
        if rank == 0 and out is not None:
            import json

            from dis_core.outputs.rundir import atomic_write

            out.mkdir(parents=True, exist_ok=True)
            record = {"checkpoint": str(self.checkpoint), "step": self.step, "weights": self.weights,
                      "overrides": list(self.overrides), "world_size": dist.world_size(), "precision": self.solver.precision,
                      "wall_time_s": time.perf_counter() - started, "coverage": coverage,
                      "resumed_batches": partial.reused if partial is not None else 0, "metrics": metrics}
            atomic_write(out / "metrics.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
            if trajectories:
                self.draw_trajectories(trajectories, out / "trajectories", dataset=dataset, examples=examples)
        return metrics

    def weights_digest(self) -> str:
        """sha256 of the tensors evaluated (backbone and puzzle table, as loaded): what a
        partial result must come from to be merged, wherever the checkpoint was read from."""
        import hashlib

        digest = hashlib.sha256()
        for part, module in (("backbone", self.backbone), ("puzzle_emb", self.puzzle_emb)):
            if module is None:
                continue
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
                if t.numel():  # the buffer itself: a full ARC puzzle table is GBs, not to be copied
                    digest.update(t.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def _identity(self, dataset, size: int, batch_size: int, limit: int | None) -> dict:
        """What a batch's result depends on, for `evaluation.PartialResults`: the weights, the
        recipe as resolved, the batching (and the number of processes, which slices each batch),
        and the examples themselves (their ids and inputs)."""
        import hashlib

        # Every example of a small split; of a large one (rendering all would take minutes) the
        # first 2048 and 2048 spread over the rest, enough to tell another split or subset.
        sample = np.arange(size) if size <= 4096 else np.unique(np.r_[np.arange(2048), np.linspace(2048, size - 1, 2048).astype(np.int64)])
        examples = hashlib.sha256()
        for lo in range(0, len(sample), 512):
            arrays = dataset.get(sample[lo: lo + 512])
            for key in ("example_ids", "puzzle_ids", "inputs", "labels"):
                if key in arrays:
                    examples.update(np.ascontiguousarray(arrays[key]).tobytes())
        recipe = hashlib.sha256((self.run_dir / "recipe.toml").read_bytes() + repr(self.overrides).encode()).hexdigest()
        # `world_size` only under a launcher: a lone process's manifests, written before it was kept, still match.
        world = {"world_size": dist.world_size()} if dist.world_size() > 1 else {}
        return {**world, "weights_sha256": self.weights_digest(), "step": self.step, "weights": self.weights,
                "recipe_sha256": recipe, "overrides": list(self.overrides), "precision": self.solver.precision,
                "device": self.device.type, "batch_size": batch_size, "limit": limit, "examples": size,
                "examples_sha256": examples.hexdigest(), "evaluators": sorted(self.evaluators),
                "eval": {k: list(v) if isinstance(v, tuple) else v for k, v in evaluation_options(self.recipe.eval).items()}}

    def draw_trajectories(self, n: int, out_dir: str | Path, *, dataset=None, title: str = "", examples=None) -> list[Path]:
        """PNGs of `n` examples of `dataset` (default: the test split) chosen by `examples`
        (`random` by default, `failures`, `hardest`, `first`, `ids:...`), step by step, with the
        task's verdict and the per-step targets, and an index.html; see `dis_core.outputs.trajectories`."""
        from dis_core.outputs import trajectories

        return trajectories.for_model(self, n, Path(out_dir), examples=examples, dataset=dataset, title=title)


def evaluation_options(eval_cfg) -> dict:
    from dis_core.loop import evaluation

    return evaluation.options(eval_cfg)


def check_guidance(w: float) -> None:
    """The guidance scale w must be a number: NaN or inf would turn every answer into noise."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise UserError(f"the guidance scale w must be a finite number, got {w!r}")


def complete_batch(arrays: dict[str, np.ndarray], spec, *, offset: int = 0) -> dict[str, np.ndarray]:
    """Fill in the keys a rollout reads that an input encoder may leave out (`labels` all
    IGNORE, `puzzle_ids` 0, `example_ids` 0..K-1) and check `inputs` against the spec; errors
    name puzzles by their index plus `offset`."""
    if "inputs" not in arrays:
        raise DataError("the task's encode_inputs returned no 'inputs'")
    x = np.asarray(arrays["inputs"])
    if x.ndim != 2 or x.shape[1] != spec.seq_len:
        raise DataError(f"encoded inputs have shape {tuple(x.shape)}, the model needs (K, {spec.seq_len})")
    if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
        bad = int(np.argmax(((x < 0) | (x >= spec.vocab_size)).any(1)))
        raise DataError(f"puzzle {offset + bad}: a token outside 0..{spec.vocab_size - 1}")
    k = len(x)
    out = dict(arrays)
    out["inputs"] = x.astype(np.int64)
    out.setdefault("labels", np.full_like(out["inputs"], IGNORE))
    out.setdefault("puzzle_ids", np.zeros(k, dtype=np.int64))
    out.setdefault("example_ids", np.arange(k, dtype=np.int64))
    ids = np.asarray(out["puzzle_ids"])
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_puzzle_ids):
        bad = offset + int(np.argmax((ids < 0) | (ids >= spec.num_puzzle_ids)))
        raise DataError(f"puzzle {bad}: a puzzle id outside 0..{spec.num_puzzle_ids - 1}")
    return out


def _token_rows(puzzles: Sequence[Any], length: int, task: str, offset: int = 0) -> np.ndarray:
    rows = []
    for i, p in enumerate(puzzles):
        if not isinstance(p, (list, tuple)) or len(p) != length or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise DataError(f"puzzle {offset + i}: task {task!r} has no input parser (encode_inputs), so each puzzle must be "
                            f"a list of {length} token ids")
        rows.append(p)
    return np.array(rows, dtype=np.int64)


def run_precision(run_dir: Path) -> list[str]:
    """The precision the run trained in (run.json), as a `--set` override: `train.precision =
    "auto"` resolves by the device (`devices.resolve_precision`), and a run trained in bf16 on one
    machine is evaluated in bf16 on another, and an fp32 run in fp32. [] when run.json is missing
    or unreadable (the recipe's own value then applies)."""
    import json

    try:
        chosen = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("precision")
    except (OSError, ValueError, AttributeError):
        return []
    return [f'train.precision="{chosen}"'] if chosen in ("fp32", "bf16") else []


def _build(run_dir: Path, ckpt_dir: Path, saved: dict, registry, overrides: tuple[str, ...], data_dir: Path,
           device: torch.device, weights: str) -> Model:
    from dis_core.wiring.recipe import load_recipe
    from dis_core.step.solver import Solver

    # The run's [[loggers]] are left out: evaluating or predicting reports to no tracker. The
    # run's precision comes first, so that a `--set train.precision=...` still wins.
    resolved = load_recipe(run_dir / "recipe.toml", registry, ["loggers=[]", *run_precision(run_dir), *overrides])
    solver = Solver.build(resolved, registry, data_dir, device=device)
    return Model(solver=solver, resolved=resolved, registry=registry, saved=saved, run_dir=run_dir, checkpoint=ckpt_dir,
                 data_dir=data_dir, overrides=overrides, weights=weights)


def load(source: str | Path, *, set_overrides: Iterable[str] = (), data_dir: str | Path = "data",
         device: str | torch.device | None = None, weights: str = "auto", registry=None) -> Model:
    """A trained model from a run directory (its newest complete checkpoint) or a checkpoint
    directory (`RUN_DIR/checkpoints/step_N`). `set_overrides` are `--set KEY=VALUE` strings
    applied to the run's recipe.toml (e.g. another test source); `weights` is "auto" (EMA when
    saved), "ema" or "trained". Raises `CheckpointError` (exit status 2 in the CLI) naming the
    tensors when the checkpoint does not fit the model the recipe builds."""
    if weights not in ("auto", "ema", "trained"):
        raise UserError(f"weights must be 'auto', 'ema' or 'trained', not {weights!r}")
    # Read right after choosing: the registry and the device take seconds, in which a run still
    # training may prune the checkpoint chosen.
    run_dir, ckpt_dir, saved = locate_and_read(source)
    if registry is None:
        from dis_core.wiring.plugins import load_registry

        registry = load_registry()
    device = torch.device(device) if device is not None else dist.pick_device()
    _init_processes(device)
    _check_same_checkpoint(ckpt_dir, saved, device)
    return _build(run_dir, ckpt_dir, saved, registry, tuple(set_overrides), Path(data_dir), device, weights)
