"""Helpers for evaluators: tallies that merge across ranks, and the prediction each example ends on.

An evaluator's `state()` is gathered from every rank and `compute` adds the states up. A
`Tally` holds exactly such a state: named numbers, and per-step lists (index s-1 = step s) that
add element-wise and may differ in length (a rank whose examples all halted early has shorter
lists). Its state is a plain dict of Python numbers and lists, so it pickles small.

    tally = Tally("count", "valid")
    tally.add(count=len(preds), valid=ok.sum(), valid_at=ok_each.sum(0), ran_at=ran.sum(0))
    ...
    total = Tally.merged(states)
    {"valid_rate": total.ratio("valid", "count"), **total.per_step("valid", "valid_at", "ran_at")}
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

from dis_core.contract.compat import headline_of
from dis_core.contract.interfaces import EvalRecord


def _plain(value: Any) -> Any:
    """Tensors and numpy values as Python numbers / lists (what pickles small)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _plus(a: Any, b: Any) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        a, b = (v if isinstance(v, list) else [] for v in (a, b))  # a fresh name starts as 0 or []
        out = list(a) + [0] * max(0, len(b) - len(a))
        for i, v in enumerate(b):
            out[i] += v
        return out
    return a + b


class Tally:
    """Named sums: numbers, and per-step lists added element-wise. Names given to the
    constructor start at 0, so `state()` always has them; others appear when first added."""

    def __init__(self, *names: str):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, Any] = dict.fromkeys(self.names, 0)

    def add(self, **amounts: Any) -> None:
        """Add numbers or 1-D sequences (tensors and arrays are converted) to the named sums."""
        for name, amount in amounts.items():
            self.values[name] = _plus(self.values.get(name, 0), _plain(amount))

    def __getitem__(self, name: str) -> Any:
        return self.values.get(name, 0)

    def state(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.values.items()}

    @classmethod
    def merged(cls, states: Iterable[dict[str, Any]]) -> "Tally":
        """The sum of several `state()`s (one per rank)."""
        total = cls()
        for st in states:
            total.add(**st)
        return total

    def ratio(self, num: str, den: str) -> float:
        """num / den, 0.0 when den is 0."""
        return self[num] / self[den] if self[den] else 0.0

    def per_step(self, prefix: str, num: str, den: str) -> dict[str, float]:
        """{f"{prefix}@{s}": num[s-1] / den[s-1]} for every step s with den[s-1] > 0."""
        sums, counts = self[num] or [], self[den] or []
        return {f"{prefix}@{s + 1}": sums[s] / c for s, c in enumerate(counts) if c}


def final_and_ran(record: EvalRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) prediction after each example's last step run (`record.steps`), and (B, N) bool:
    whether the example ran step s (column s-1)."""
    preds = record.preds  # (B, N, L)
    n = preds.shape[1]
    last = record.steps.long().clamp(1, n) - 1  # (B,)
    final = preds[torch.arange(preds.shape[0]), last]
    ran = torch.arange(n)[None, :] <= last[:, None]  # (B, N)
    return final, ran


def is_per_step(key: str) -> bool:
    """`exact/hamming@3` is one point of a per-step series (kept in metrics.jsonl, off the
    console); `arc/pass@2` is a headline metric, not a step. A guidance sweep's suffix does not
    change that: `exact/hamming@3@w=0.5` is per step, `exact/accuracy@w=0.5` is not."""
    key = re.sub(r"@w=[^@/]*$", "", key)
    name, at, step = key.rpartition("/")[2].partition("@")
    return bool(at) and step.isdigit() and name != "pass"


def on_console(key: str, evaluators: dict) -> bool:
    """Whether the console shows metric `key` of an evaluation: the plain metrics and, of a
    guidance sweep, only each evaluator's headline per w (metrics.jsonl has them all); per-step
    rows are for files and plots. `evaluators`: the recipe's {name: evaluator}."""
    if is_per_step(key):
        return False
    if "@w=" not in key:
        return True
    name, _, metric = key.partition("@w=")[0].partition("/")
    return name in evaluators and metric == headline_of(evaluators[name])
