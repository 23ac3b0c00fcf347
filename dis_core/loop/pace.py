"""How fast a training session goes, as its progress bar shows it: examples/s, the share of time
spent evaluating, and the ETA with the evaluations still ahead (a rate of steps, tqdm's, cannot
know of them). `now` is the clock of the ETA and of checkpoints by time (tests replace it)."""

from __future__ import annotations

import time

from dis_core.loop.preflight import evaluations

now = time.monotonic


class Pace:
    """One session of a run, from its first step (`state`, the TrainState, as it goes on)."""

    def __init__(self, state, *, total_steps: int, eval_interval: int, world: int, eval_estimate_s: float):
        self.state, self.total_steps, self.eval_interval, self.world = state, total_steps, eval_interval, world
        self.eval_estimate_s = eval_estimate_s  # one evaluation, by the preflight, until one is timed
        self.start, self.eval_s, self.evals = now(), 0.0, 0
        self.first_step, self.first_examples = state.step, state.ledger.examples

    def evaluated(self, seconds: float) -> None:
        self.eval_s += seconds
        self.evals += 1

    def eta(self) -> float | None:
        """Seconds to the end: the steps left at this session's pace, and the evaluations left."""
        steps = self.state.step - self.first_step
        if not steps:
            return None
        per_step = (now() - self.start - self.eval_s) / steps
        step, interval = self.state.step, self.eval_interval
        left = evaluations(self.total_steps, interval) - (step // interval if interval else 0)
        each = self.eval_s / self.evals if self.evals else self.eval_estimate_s
        return (self.total_steps - step) * per_step + left * each

    def postfix(self) -> dict[str, str]:
        """The bar's examples/s (fresh examples, all processes) and evaluation share."""
        elapsed = max(now() - self.start, 1e-9)
        examples = (self.state.ledger.examples - self.first_examples) * self.world  # each rank counts its own; they load equally
        return {"examples/s": f"{examples / max(elapsed - self.eval_s, 1e-9):.3g}", "eval": f"{100 * self.eval_s / elapsed:.0f}%"}
