"""Using a trained model: `dis_core.load(run_dir_or_checkpoint)` -> `Model`.

A `Model` holds the run's resolved recipe (its `recipe.toml`, with any `--set` overrides), the
components built from it and the checkpoint's weights: the EMA weights (`ema_weights.pt`) when
the run kept them, else the trained ones, read from the DeepSpeed file `mp_rank_00_model_states.pt`
(its `module` entry; the puzzle table comes from the client state saved beside it). No optimizer
and no DeepSpeed engine are built.

Prediction and evaluation go through the code training uses: `dis_core.supervision.rollout`
runs the supervision steps and `dis_core.evaluation.evaluate` scores a split (sliced over the
processes of a `torchrun` launch, merged on rank 0), so `dis eval` on a finished run gives the
metrics of the run's final evaluation exactly (same batch size, limit and precision).

    model = dis_core.load("runs/nqueens_quick")
    answers = model.predict([["Q.......", "........", ...]])      # the task's own input format
    metrics = model.evaluate(out_dir="runs/nqueens_quick/eval-again")
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import structlog
import torch

from dis_core import checkpoint as ckpt
from dis_core import engine as dist
from dis_core.errors import CheckpointError, DataError, UserError
from dis_core.interfaces import IGNORE, Batch, PuzzleIO
from dis_core.supervision import Rollout, StepRule, rollout

log = structlog.get_logger()
MODEL_FILE = "mp_rank_00_model_states.pt"
EMA_FILE = "ema_weights.pt"


# ------------------------------------------------------------------ finding the files


def locate(source: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its newest complete
    checkpoint), its `checkpoints/` folder, or one `checkpoints/step_N/`."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
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


def read_checkpoint(ckpt_dir: Path) -> dict:
    """{"module": state dict, "ema": state dict or None, "puzzle_emb": state dict or None,
    "step": int}, read without DeepSpeed."""
    model_file = ckpt_dir / MODEL_FILE
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # truncated, corrupted: torch raises many kinds
        raise CheckpointError(f"{model_file}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(saved, dict) or "module" not in saved:
        raise CheckpointError(f"{model_file}: not a DeepSpeed model-states file (no 'module' entry)")
    ema = None
    if (ckpt_dir / EMA_FILE).is_file():
        try:
            ema = torch.load(ckpt_dir / EMA_FILE, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"{ckpt_dir / EMA_FILE}: cannot be read ({type(exc).__name__})") from None
    return {"module": saved["module"], "ema": ema, "puzzle_emb": saved.get("puzzle_emb"), "step": saved.get("step")}


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


# ------------------------------------------------------------------ the model


class Model:
    """A trained model ready to predict and evaluate; see `load`."""

    def __init__(self, *, resolved, registry, components, saved: dict, run_dir: Path, checkpoint: Path,
                 device: torch.device, data_dir: Path, overrides: tuple[str, ...], weights: str):
        from dis_core.puzzle_embedding import PuzzleEmbedding

        self.resolved, self.registry, self.components = resolved, registry, components
        self.recipe = resolved.recipe
        self.run_dir, self.checkpoint, self.device, self.data_dir = run_dir, checkpoint, device, data_dir
        self.overrides, self._saved = overrides, saved
        self.task, self.spec = components.task, components.task.spec
        self.halting, self.evaluators = components.halting, components.evaluators
        self.rule = StepRule.of(self.recipe.supervision)
        self.step = saved["step"]
        self.bf16 = dist.resolve_precision(self.recipe.train.precision, device) == "bf16"
        use_ema = weights == "ema" or (weights == "auto" and saved["ema"] is not None)
        if use_ema and saved["ema"] is None:
            raise CheckpointError(f"{checkpoint}: no {EMA_FILE} (the run trained without train.ema)")
        self.weights = "ema" if use_ema else "trained"
        self.backbone = components.backbone
        _load_into(self.backbone, _backbone_state(saved["ema"] if use_ema else saved["module"]), checkpoint,
                   EMA_FILE if use_ema else f"{MODEL_FILE} module")
        self.backbone.to(device).eval()
        ndim = self.backbone.puzzle_emb_ndim
        self.puzzle_emb = None
        if ndim:
            if saved["puzzle_emb"] is None:
                raise CheckpointError(f"{checkpoint}: the backbone uses a puzzle embedding but the checkpoint holds no puzzle table")
            self.puzzle_emb = PuzzleEmbedding(self.spec.num_puzzle_ids, ndim)
            _load_into(self.puzzle_emb, saved["puzzle_emb"], checkpoint, "puzzle table")
            self.puzzle_emb.to(device).eval()

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
        batch = {k: v.to(self.device) for k, v in batch.items()}
        emb = self.puzzle_emb(batch["puzzle_ids"]) if self.puzzle_emb is not None else None
        with torch.inference_mode():
            return rollout(self.backbone, batch, self.rule, self.halting, puzzle_emb=emb,
                           max_steps=self.check_steps(steps), bf16=self.bf16, guidance=guidance,
                           readout=self.recipe.eval.readout)

    def encode(self, puzzles: Sequence[Any]) -> dict[str, np.ndarray]:
        """The task's `encode_inputs(puzzles)`, or, for a task without it, lists of L token ids."""
        if isinstance(puzzles, (str, bytes, dict)) or not isinstance(puzzles, Sequence):
            raise DataError("the inputs must be a list of puzzles (a JSON array)")
        if not len(puzzles):
            raise DataError("no puzzles to answer: the input list is empty")
        if isinstance(self.task, PuzzleIO):
            arrays = dict(self.task.encode_inputs(list(puzzles)))
        else:
            arrays = {"inputs": _token_rows(puzzles, self.spec.seq_len, self.recipe.task.name)}
        return complete_batch(arrays, self.spec)

    def decode(self, tokens: np.ndarray, puzzle: Any) -> Any:
        return self.task.decode(tokens, puzzle) if isinstance(self.task, PuzzleIO) else [int(t) for t in tokens]

    def predict(self, inputs: Sequence[Any], steps: int | None = None, *, batch_size: int | None = None,
                guidance: float = 1.0) -> list[dict]:
        """Answers for new puzzles in the task's input format (see the task's `encode_inputs`;
        without one, lists of L token ids). One dict per puzzle: `answer` (after the last step
        run), `trajectory` (the answer after each step run), `changed` (cells changed by each
        step), `steps` run and `q_halt` (the halting head's logit after the last step)."""
        steps = self.check_steps(steps)
        puzzles = list(inputs) if not isinstance(inputs, (str, bytes, dict)) else inputs
        arrays = self.encode(puzzles)
        from dis_core.data import to_torch

        size, out = len(arrays["inputs"]), []
        chunk = batch_size or self.eval_batch_size()
        for lo in range(0, size, chunk):
            part = to_torch({k: v[lo: lo + chunk] for k, v in arrays.items()})
            result = self.rollout(part, steps, guidance)
            preds, ran = result.preds.cpu().numpy(), result.steps.cpu().tolist()
            q, question = result.q_halt.cpu().tolist(), part["inputs"].numpy()
            for i in range(len(preds)):
                puzzle, frames = puzzles[lo + i], preds[i, : ran[i]]
                previous = np.concatenate([question[i: i + 1], frames[:-1]])
                out.append({
                    "input": puzzle,
                    "answer": self.decode(frames[-1], puzzle),
                    "steps": ran[i],
                    "q_halt": q[i],
                    "changed": (frames != previous).sum(-1).tolist(),
                    "trajectory": [self.decode(f, puzzle) for f in frames],
                })
        return out

    def evaluate(self, test_set=None, *, set_overrides: Iterable[str] = (), limit: int | None = None,
                 out_dir: str | Path | None = None, batch_size: int | None = None, trajectories: int = 0) -> dict[str, float]:
        """Every evaluator of the recipe over `test_set` (default: the task's test split, with
        the recipe's `train.eval_limit` unless `limit`), batched as the run's evaluations were.
        Metrics on rank 0 ({} on the others). With `out_dir`, rank 0 writes `metrics.json`, the
        evaluators' files under `out_dir/<evaluator>/` and, with `trajectories` N, pictures of the
        first N test examples under `out_dir/trajectories/`."""
        from dis_core import evaluation

        overrides = tuple(set_overrides)
        if overrides:
            return self.with_overrides(overrides).evaluate(test_set, limit=limit, out_dir=out_dir, batch_size=batch_size,
                                                           trajectories=trajectories)
        dataset = test_set if test_set is not None else self.task.dataset("test")
        train = self.recipe.train
        out = Path(out_dir) if out_dir is not None else None
        rank = dist.rank()

        def ev_dir(name: str) -> Path | None:
            return None if out is None else out / name  # created by an evaluator that writes

        started = time.perf_counter()
        metrics = evaluation.evaluate(
            self.backbone, self.puzzle_emb, dataset, self.evaluators, self.rule, self.halting,
            batch_size=batch_size or self.eval_batch_size(), limit=limit if limit is not None else train.eval_limit,
            device=self.device, generator=torch.Generator().manual_seed(train.seed), out_dir=ev_dir, bf16=self.bf16,
            **evaluation.options(self.recipe.eval),
        )
        if rank == 0 and out is not None:
            import json

            from dis_core.rundir import atomic_write

            out.mkdir(parents=True, exist_ok=True)
            record = {"checkpoint": str(self.checkpoint), "step": self.step, "weights": self.weights,
                      "overrides": list(self.overrides), "world_size": dist.world_size(),
                      "wall_time_s": time.perf_counter() - started, "metrics": metrics}
            atomic_write(out / "metrics.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
            if trajectories:
                self.draw_trajectories(trajectories, out / "trajectories", dataset=dataset)
        return metrics

    def draw_trajectories(self, n: int, out_dir: str | Path, *, dataset=None, title: str = "") -> list[Path]:
        """PNGs of the first `n` examples of `dataset` (default: the test split), step by step,
        and an index.html; see `dis_core.trajectories`."""
        from dis_core import trajectories

        dataset = dataset if dataset is not None else self.task.dataset("test")
        batch, result = trajectories.run_examples(
            self.backbone, self.puzzle_emb, dataset, self.rule, self.halting, n, device=self.device, bf16=self.bf16)
        title = title or f"{self.run_dir.name} · {self.checkpoint.name} · {self.weights} weights"
        return trajectories.draw(self.task, batch, result, Path(out_dir), title=title)


def complete_batch(arrays: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    """Fill in the keys a rollout reads that an input encoder may leave out (`labels` all
    IGNORE, `puzzle_ids` 0, `example_ids` 0..K-1) and check `inputs` against the spec."""
    if "inputs" not in arrays:
        raise DataError("the task's encode_inputs returned no 'inputs'")
    x = np.asarray(arrays["inputs"])
    if x.ndim != 2 or x.shape[1] != spec.seq_len:
        raise DataError(f"encoded inputs have shape {tuple(x.shape)}, the model needs (K, {spec.seq_len})")
    if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
        bad = int(np.argmax(((x < 0) | (x >= spec.vocab_size)).any(1)))
        raise DataError(f"puzzle {bad}: a token outside 0..{spec.vocab_size - 1}")
    k = len(x)
    out = dict(arrays)
    out["inputs"] = x.astype(np.int64)
    out.setdefault("labels", np.full_like(out["inputs"], IGNORE))
    out.setdefault("puzzle_ids", np.zeros(k, dtype=np.int64))
    out.setdefault("example_ids", np.arange(k, dtype=np.int64))
    ids = np.asarray(out["puzzle_ids"])
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_puzzle_ids):
        raise DataError(f"a puzzle id outside 0..{spec.num_puzzle_ids - 1}")
    return out


def _token_rows(puzzles: Sequence[Any], length: int, task: str) -> np.ndarray:
    rows = []
    for i, p in enumerate(puzzles):
        if not isinstance(p, (list, tuple)) or len(p) != length or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise DataError(f"puzzle {i}: task {task!r} has no input parser (encode_inputs), so each puzzle must be "
                            f"a list of {length} token ids")
        rows.append(p)
    return np.array(rows, dtype=np.int64)


def _build(run_dir: Path, ckpt_dir: Path, saved: dict, registry, overrides: tuple[str, ...], data_dir: Path,
           device: torch.device, weights: str) -> Model:
    from dis_core.build import build_components
    from dis_core.recipe import load_recipe

    # The run's [[loggers]] are left out: evaluating or predicting reports to no tracker.
    resolved = load_recipe(run_dir / "recipe.toml", registry, ["loggers=[]", *overrides])
    torch.manual_seed(resolved.recipe.train.seed)  # as the trainer: a component that draws at build time draws the same
    components = build_components(resolved, registry, data_dir)
    return Model(resolved=resolved, registry=registry, components=components, saved=saved, run_dir=run_dir,
                 checkpoint=ckpt_dir, device=device, data_dir=data_dir, overrides=overrides, weights=weights)


def load(source: str | Path, *, set_overrides: Iterable[str] = (), data_dir: str | Path = "data",
         device: str | torch.device | None = None, weights: str = "auto", registry=None) -> Model:
    """A trained model from a run directory (its newest complete checkpoint) or a checkpoint
    directory (`RUN_DIR/checkpoints/step_N`). `set_overrides` are `--set KEY=VALUE` strings
    applied to the run's recipe.toml (e.g. another test source); `weights` is "auto" (EMA when
    saved), "ema" or "trained". Raises `CheckpointError` (exit status 2 in the CLI) naming the
    tensors when the checkpoint does not fit the model the recipe builds."""
    if weights not in ("auto", "ema", "trained"):
        raise UserError(f"weights must be 'auto', 'ema' or 'trained', not {weights!r}")
    run_dir, ckpt_dir = locate(source)
    if registry is None:
        from dis_core.plugins import load_registry

        registry = load_registry()
    device = torch.device(device) if device is not None else dist.pick_device()
    _init_processes(device)
    saved = read_checkpoint(ckpt_dir)
    model = _build(run_dir, ckpt_dir, saved, registry, tuple(set_overrides), Path(data_dir), device, weights)
    threads = model.recipe.train.threads
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)  # as the trainer did: the same kernels, the same sums
    return model
