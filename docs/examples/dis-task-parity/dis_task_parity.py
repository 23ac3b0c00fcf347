"""Task `parity` and evaluator `parity`: running parity of a short bit string.

The question is a string of `length` bits; the answer at position i is the parity (XOR) of
bits 0..i. Tokens: PAD 0 (unused), bit 0 -> 1, bit 1 -> 2, for questions and answers alike,
so a target generator can move from the question to the answer cell by cell.

Every string of `length` bits is one example. One seeded permutation of all 2**length strings
is cut into a test part and a train part, so the splits never overlap, nothing is stored but
the permutation, and `get` is a pure function of the indices.

Walked through in docs/tutorial_task.md.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch

from dis_core import hookimpl
from dis_core.errors import CapabilityError, UserError
from dis_core.interfaces import EvalRecord, TaskSpec
from dis_core.reveal import ranked_reveal

PAD, ZERO, ONE = 0, 1, 2


# ----------------------------------------------------------------------------- task


@attrs.frozen(kw_only=True)
class ParityConfig:
    # Bits per example. 20 at most: the permutation of all 2**length strings is kept in memory.
    length: int = attrs.field(default=12, validator=[attrs.validators.ge(2), attrs.validators.le(20)])
    num_train: int = attrs.field(default=2000, validator=attrs.validators.ge(1))
    num_test: int = attrs.field(default=500, validator=attrs.validators.ge(1))
    seed: int = 0  # data seed (which strings are train, which test), apart from the run seed

    def __attrs_post_init__(self):
        if self.num_train + self.num_test > 2**self.length:
            raise ValueError(
                f"num_train + num_test = {self.num_train + self.num_test} exceeds the "
                f"{2**self.length} distinct strings of length {self.length}"
            )


class ParitySplit:
    """A split: the integer codes of its strings; example i is the bits of codes[i]."""

    def __init__(self, codes: np.ndarray, length: int):
        self.codes, self.length = codes, length

    def __len__(self) -> int:
        return len(self.codes)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        bits = (self.codes[idx][:, None] >> np.arange(self.length)) & 1  # (K, L) 0/1
        parity = np.cumsum(bits, axis=1) % 2  # (K, L) running XOR
        return {
            "inputs": bits + ZERO,  # bit b -> token b + 1
            "labels": parity + ZERO,  # every cell supervised
            "puzzle_ids": np.zeros(len(idx), dtype=np.int64),  # one puzzle family, no per-puzzle embedding
            "example_ids": idx.copy(),
        }


class ParityTask:
    def __init__(self, config: ParityConfig):
        self.config = config
        self.spec = TaskSpec(vocab_size=3, seq_len=config.length, num_puzzle_ids=1, pad_id=PAD)
        codes = np.random.default_rng(config.seed).permutation(2**config.length)
        test, train = codes[: config.num_test], codes[config.num_test : config.num_test + config.num_train]
        self._splits = {"train": ParitySplit(train, config.length), "test": ParitySplit(test, config.length)}

    def dataset(self, split: str) -> ParitySplit:
        if split not in self._splits:
            raise UserError(f"task parity has splits 'train' and 'test', not {split!r}")
        return self._splits[split]

    def solver_trajectory(self, batch, n_sup: int) -> torch.Tensor:
        """(B, n_sup, L): the cells to change, fixed left to right, as a person computing the
        running XOR would (the optional capability the `solver_edits` generator uses)."""
        inputs, labels = batch["inputs"], batch["labels"]
        rank = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)  # position = solve order
        return ranked_reveal(inputs, labels, rank, n_sup)


def build_parity(config: ParityConfig, ctx) -> ParityTask:
    """Running parity of a short bit string (a tutorial task; generated, no files)."""
    return ParityTask(config)


# ----------------------------------------------------------------------------- evaluator


@attrs.frozen(kw_only=True)
class ParityEvalConfig:
    """No options."""


class ParityEvaluator:
    """`parity_accuracy`: share of examples whose last cell (the parity of the whole string) is
    right; `sequence_accuracy`: share with every cell right; `parity@s`: parity_accuracy after
    supervision step s. Scores the prediction after the last step each example ran."""

    headline = "parity_accuracy"  # the metric `dis compare` shows by default

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._st = {"count": 0, "parity": 0, "sequence": 0, "parity_by_step": []}

    def update(self, record: EvalRecord) -> None:
        labels = record.batch["labels"]  # (B, L)
        preds = record.preds  # (B, N, L); frames after an example's last step repeat its answer
        last_right = preds[:, :, -1] == labels[:, None, -1]  # (B, N)
        st = self._st
        st["count"] += len(labels)
        st["parity"] += int(last_right[:, -1].sum())
        st["sequence"] += int((preds[:, -1] == labels).all(-1).sum())
        by_step = last_right.sum(0).tolist()
        st["parity_by_step"] = [a + b for a, b in zip(st["parity_by_step"], by_step)] or by_step

    def state(self) -> dict:
        return dict(self._st)  # plain numbers and lists: pickles small, merges by addition

    def compute(self, states: list[dict], out_dir: Path | None) -> dict[str, float]:
        count = sum(s["count"] for s in states)
        if not count:
            return {"count": 0.0}
        by_step = np.sum([s["parity_by_step"] for s in states if s["parity_by_step"]], axis=0)
        out = {
            "count": float(count),
            "parity_accuracy": sum(s["parity"] for s in states) / count,
            "sequence_accuracy": sum(s["sequence"] for s in states) / count,
        }
        out.update({f"parity@{i + 1}": float(v) / count for i, v in enumerate(by_step)})
        return out


def build_parity_evaluator(config: ParityEvalConfig, ctx) -> ParityEvaluator:
    """Whole-string parity and running-parity accuracy."""
    if not isinstance(ctx.task, ParityTask):
        raise CapabilityError(f"{ctx.component or 'evaluator parity'}: scores running-parity answers; use it with task 'parity'")
    return ParityEvaluator()


# ----------------------------------------------------------------------------- hooks


@hookimpl
def register_tasks(register):
    register("parity", ParityConfig, build_parity)


@hookimpl
def register_evaluators(register):
    register("parity", ParityEvalConfig, build_parity_evaluator)
